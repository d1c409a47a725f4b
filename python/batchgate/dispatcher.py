"""batchgate.Dispatcher: send prompts to a vLLM (OpenAI-compatible) server from
asyncio, with the HTTP, JSON and concurrency work done in C off the GIL.

The heavy lifting is in ``batchgate._native._Dispatcher`` (a libcurl multi
engine thread). This module binds it to the running event loop (one wakeup fd
per dispatcher, watched with ``loop.add_reader``), turns keyword params into a
request template once per distinct set, and offers the awaitable API.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import threading
import weakref
from typing import (Any, AsyncIterator, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple, Union)

from . import _native
from ._native import (BatchgateError, ClosedError, HTTPStatusError, MalformedResponseError,
                      Result, TimeoutError, TransportError)
from .config import Config

__all__ = [
    "Dispatcher", "Result", "BatchgateError", "HTTPStatusError", "TransportError",
    "TimeoutError", "MalformedResponseError", "ClosedError", "vllm_generate",
    "process_batches", "default_dispatcher",
]

log = logging.getLogger("batchgate")

Prompt = Union[str, Sequence[str]]

_live: "weakref.WeakSet[Dispatcher]" = weakref.WeakSet()


#: max_concurrent under max_inflight_tokens="auto" when none is given: the KV
#: limit and the server's waiting queue decide; this only bounds connections.
AUTO_MAX_CONCURRENT = 512


def _header_lines(headers: Optional[Mapping[str, str]]) -> List[str]:
    lines = []
    for k, v in (headers or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"header {k!r} must map str to str")
        if any(c in k + v for c in "\r\n\0") or ":" in k or not k:
            raise ValueError(f"invalid header {k!r}")
        lines.append(f"{k}: {v}")
    return lines


def _redact(url: str) -> str:
    """The URL without user:password (for messages)."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rpartition("@")[2]
    return scheme + sep + host + slash + path


def _server_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def _probe_admission(base_url: str, api_key: Optional[str], model: Optional[str],
                     hdr_lines: List[str], verify: bool, connect_timeout: Optional[float],
                     metrics_url: Optional[str], interval: float, stale_after: float,
                     target: float, high: float) -> Optional[Dict[str, Any]]:
    """Ask the server for its KV cache (/metrics) and max_model_len
    (/v1/models). None, with a logged warning, when it does not say."""
    for name, v in (("metrics_interval", interval), ("metrics_stale_after", stale_after),
                    ("kv_target", target), ("kv_high", high)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name} must be a number, not {type(v).__name__}")
    if not 0.01 <= interval <= 60:
        raise ValueError(f"metrics_interval must be in 0.01..60 seconds, got {interval!r}")
    if not stale_after > interval:
        raise ValueError(f"metrics_stale_after ({stale_after!r}) must be longer than "
                         f"metrics_interval ({interval!r})")
    if not 0 < target <= high <= 1:
        raise ValueError(f"need 0 < kv_target <= kv_high <= 1, got {target!r}, {high!r}")
    if metrics_url is None:
        metrics_url = _server_root(base_url) + "/metrics"
    elif not isinstance(metrics_url, str) or not metrics_url.startswith(("http://", "https://")):
        raise ValueError(f"metrics_url must be an http:// or https:// URL, got {metrics_url!r}")
    timeout = min(10.0, connect_timeout or 5.0)
    try:
        info = _native._Dispatcher.probe(metrics_url, base_url.rstrip("/") + "/models",
                                         api_key, hdr_lines, verify, timeout, model)
    except BatchgateError as e:
        log.warning("max_inflight_tokens='auto': %s; falling back to the static caps "
                    "(max_concurrent, no KV budget)",
                    str(e).replace(metrics_url, _redact(metrics_url)))
        return None
    info.update(metrics_url=metrics_url, model=model, interval=float(interval),
                stale_after=float(stale_after), target=float(target), high=float(high))
    log.info("max_inflight_tokens='auto': KV cache of %d blocks x %d tokens, max_model_len %s; "
             "watching %s every %.0f ms", info["kv_blocks"], info["block_size"],
             info["max_model_len"] if info["max_model_len"] > 0 else "unknown",
             _redact(metrics_url), interval * 1000)
    return info


def _admission_tick(ref: "weakref.ref[Dispatcher]") -> None:
    d = ref()  # the timer must not keep a forgotten dispatcher alive
    if d is not None:
        d._log_admission()


class Dispatcher:
    """Concurrency-capped client for ``/v1/completions`` and ``/v1/chat/completions``.

    ``base_url`` follows the openai client's convention (``http://host:8000/v1``).
    In-flight requests never exceed ``max_concurrent`` (or the permits of a
    ``batchgate.Semaphore`` passed as ``semaphore``, shared with other code);
    with ``max_inflight_tokens`` the estimated prompt tokens + ``max_tokens`` of
    the requests in flight stay under that budget too. ``max_inflight_tokens=
    "auto"`` closes the loop on the server's own numbers: the KV cache size
    from vLLM's ``/metrics`` (``vllm:cache_config_info``), a limit on the KV
    blocks in flight that follows ``vllm:kv_cache_usage_perc``, the waiting
    queue and preemptions (scraped every ``metrics_interval`` seconds by the
    native engine), and output lengths learned from answers (see
    ``stats()["admission"]``). Without usable metrics it falls back to the
    static caps, with a logged warning. Use it from one event
    loop at a time; close it with ``await d.aclose()`` or ``async with``.
    """

    def __init__(self, base_url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 *, max_concurrent: Optional[int] = None,
                 max_inflight_tokens: Union[int, str, None] = None,
                 timeout: Optional[float] = 600.0, connect_timeout: Optional[float] = 10.0,
                 max_retries: Optional[int] = None,
                 headers: Optional[Mapping[str, str]] = None, verify: bool = True,
                 max_response_bytes: Optional[int] = 64 << 20,
                 semaphore: Any = None, window: Optional[int] = None, backoff: float = 0.5,
                 max_backoff: float = 30.0, max_retry_after: float = 60.0,
                 retry_timeouts: bool = False, max_connections: int = 0,
                 default_max_tokens: int = 16, metrics_url: Optional[str] = None,
                 metrics_interval: float = 0.2, metrics_stale_after: float = 2.0,
                 kv_target: float = 0.85, kv_high: float = 0.92) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError("api_key must be a str or None")
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a str or None, not {type(model).__name__}")
        hdr_lines = _header_lines(headers)
        admission = None
        if isinstance(max_inflight_tokens, str):
            if max_inflight_tokens != "auto":
                raise ValueError(f"max_inflight_tokens must be an int, None or 'auto', "
                                 f"got {max_inflight_tokens!r}")
            admission = _probe_admission(
                base_url, api_key, model, hdr_lines, bool(verify), connect_timeout,
                metrics_url, metrics_interval, metrics_stale_after, kv_target, kv_high)
            max_inflight_tokens = None
            if admission is not None and max_concurrent is None:
                # The KV limit and the server's queue govern; the count cap
                # only bounds open connections.
                max_concurrent = AUTO_MAX_CONCURRENT
        if max_concurrent is None:
            max_concurrent = Config.VLLM_MAX_CONCURRENT_BATCHES
        if max_retries is None:
            max_retries = Config.MAX_RETRIES
        if window is None:
            # Enough queued past the cap to keep it busy between loop turns.
            window = min(4096, max(256, 4 * max_concurrent))
        for name, v in (("max_concurrent", max_concurrent), ("max_retries", max_retries),
                        ("window", window), ("max_connections", max_connections),
                        ("default_max_tokens", default_max_tokens)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        for name, t in (("timeout", timeout), ("connect_timeout", connect_timeout),
                        ("backoff", backoff), ("max_backoff", max_backoff),
                        ("max_retry_after", max_retry_after)):
            if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool)):
                raise TypeError(f"{name} must be a number, not {type(t).__name__}")
            if t is not None and not t >= 0:
                raise ValueError(f"{name} must be >= 0, got {t!r}")
        if max_response_bytes is not None and max_response_bytes < 0:
            raise ValueError(f"max_response_bytes must be >= 0, got {max_response_bytes}")
        if max_inflight_tokens is not None:
            if not isinstance(max_inflight_tokens, int) or isinstance(max_inflight_tokens, bool):
                raise TypeError("max_inflight_tokens must be an int, 'auto' or None")
            if max_inflight_tokens < 1:
                raise ValueError(f"max_inflight_tokens must be >= 1, got {max_inflight_tokens}")
        if semaphore is not None and not isinstance(semaphore, _native.Semaphore):
            t = type(semaphore)
            raise TypeError(f"semaphore must be a batchgate.Semaphore (shared natively), "
                            f"not {t.__module__}.{t.__qualname__}")
        if semaphore is None:
            # Our own cap, still a real batchgate.Semaphore: Python code can
            # share it with `async with dispatcher.semaphore:`.
            semaphore = _native.Semaphore(max_concurrent)
        self._core = _native._Dispatcher(
            base_url, api_key, max_concurrent, semaphore, max_inflight_tokens or 0,
            float(timeout or 0), float(connect_timeout or 0), max_retries, hdr_lines,
            bool(verify), int(max_response_bytes or 0), float(backoff), float(max_backoff),
            float(max_retry_after), bool(retry_timeouts), max_connections, default_max_tokens,
            admission)
        self.base_url = base_url
        self.model = model
        self.semaphore = semaphore
        self.max_concurrent = max_concurrent
        self.max_inflight_tokens = max_inflight_tokens
        #: The closed-loop admission settings in use (None: static caps only).
        self.admission: Optional[Dict[str, Any]] = None
        if admission is not None:
            self.admission = dict(admission, metrics_url=_redact(admission["metrics_url"]))
        self._admission_timer: Optional[asyncio.TimerHandle] = None
        self._admission_logged = 0
        self.window = window
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._watcher: Optional[threading.Thread] = None
        self._templates: Dict[str, Any] = {}
        self._pid = os.getpid()
        self._closed = False
        _live.add(self)

    def __repr__(self) -> str:  # the API key is never shown
        state = "closed" if self._closed else f"live={self._core.live}"
        return (f"<batchgate.Dispatcher {self.base_url} model={self.model!r} "
                f"max_concurrent={self.max_concurrent} {state}>")

    # ---- plumbing -------------------------------------------------------
    def _check(self) -> None:
        if os.getpid() != self._pid:
            raise BatchgateError("this Dispatcher was created before fork(); "
                                 "create a new one in the child process")
        if self._closed:
            raise ClosedError("the Dispatcher is closed")

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._check()
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return loop
        if self._loop is not None:
            if self._core.live and not self._loop.is_closed():
                raise RuntimeError(f"{self!r} has requests pending on another event loop")
            self._unbind()
        fd = self._core.fileno()
        self._core.bind(loop)
        self._loop = loop
        try:
            loop.add_reader(fd, self._core._on_readable)
        except NotImplementedError:
            # e.g. the Windows proactor loop: a thread waits on the fd instead.
            self._start_watcher(loop)
        except BaseException:
            self._loop = None
            self._core.bind(None)
            raise
        if self.admission is not None:
            self._admission_timer = loop.call_later(0.5, _admission_tick, weakref.ref(self))
        return loop

    def _log_admission(self) -> None:
        """Log the admission limit's big moves (recorded natively) at INFO."""
        self._admission_timer = None
        if self._closed or self._loop is None:
            return
        for t, old, new, reason in self._core.admission_events():
            bs = self.admission["block_size"] if self.admission else 1
            if reason == "stale":
                log.warning("admission: no metrics from %s for %.1f s; admitting nothing new "
                            "until they return", self.admission["metrics_url"],
                            self.admission["stale_after"])
            elif reason == "fresh":
                log.info("admission: metrics are back; limit %d KV blocks (%d tokens)", new,
                         new * bs)
            else:
                log.info("admission: KV limit %d -> %d blocks (%d tokens): %s", old, new,
                         new * bs, reason)
        self._admission_timer = self._loop.call_later(0.5, _admission_tick, weakref.ref(self))

    def _start_watcher(self, loop: asyncio.AbstractEventLoop) -> None:
        core = self._core

        ran = threading.Event()

        def deliver() -> None:
            try:
                core._on_readable()
            finally:
                ran.set()

        def watch() -> None:
            while not core.closed and not loop.is_closed() and self._loop is loop:
                if not core.wait(200):
                    continue
                # The fd stays readable until deliver() drains it: wait for that.
                ran.clear()
                try:
                    loop.call_soon_threadsafe(deliver)
                except RuntimeError:  # loop closed
                    return
                while not ran.wait(0.2):
                    if core.closed or loop.is_closed():
                        return

        self._watcher = threading.Thread(target=watch, name="batchgate-dispatcher-watch",
                                         daemon=True)
        self._watcher.start()

    def _unbind(self) -> None:
        if self._admission_timer is not None:
            self._admission_timer.cancel()
            self._admission_timer = None
        loop, self._loop = self._loop, None
        self._core.bind(None)
        if loop is not None and self._watcher is None and not loop.is_closed():
            try:
                loop.remove_reader(self._core.fileno())
            except Exception:  # closed core or loop: nothing left to remove
                pass
        self._watcher = None

    def _template(self, params: Dict[str, Any]) -> Any:
        key = json.dumps(params, separators=(",", ":"), allow_nan=False) if params else ""
        t = self._templates.get(key)
        if t is None:
            if len(self._templates) > 256:
                self._templates.clear()
            t = self._core.template(self.model, key or None)
            self._templates[key] = t
        return t

    # ---- single requests ------------------------------------------------
    async def generate(self, prompt: Prompt, **params: Any) -> Result:
        """POST /v1/completions with one prompt (or a list sent as one request);
        ``params`` are body fields (max_tokens, temperature, guided_json, ...)."""
        return await self._one(False, prompt, params)

    async def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Result:
        """POST /v1/chat/completions with ``messages``."""
        return await self._one(True, _messages_json(messages, None), params)

    async def _one(self, chat: bool, payload: Any, params: Dict[str, Any]) -> Result:
        loop = self._bind()
        fut = loop.create_future()
        job = self._core.submit(_native.JOB_ONE, chat, payload, self._template(params), fut, 1,
                                False)
        try:
            return await fut
        except asyncio.CancelledError:
            job.cancel()
            raise

    # ---- bulk -----------------------------------------------------------
    async def map(self, prompts: Iterable[Prompt], *, return_exceptions: bool = False,
                  window: Optional[int] = None, **params: Any) -> List[Any]:
        """Results in input order. Prompts are pulled from the iterable a window
        at a time, so a huge (or lazy) input never lives in flight all at once.
        Without ``return_exceptions`` the first failure is raised and the rest
        is cancelled; with it, failures take their item's place in the list."""
        return await self._map(False, prompts, return_exceptions, window, params)

    async def chat_map(self, conversations: Iterable[Sequence[Mapping[str, Any]]], *,
                       return_exceptions: bool = False, window: Optional[int] = None,
                       **params: Any) -> List[Any]:
        """``map`` for chat: one request per messages list."""
        src = (_messages_json(m, i) for i, m in enumerate(conversations))
        return await self._map(True, src, return_exceptions, window, params)

    async def _map(self, chat: bool, src: Iterable[Any], return_exceptions: bool,
                   window: Optional[int], params: Dict[str, Any]) -> List[Any]:
        loop = self._bind()
        fut = loop.create_future()
        job = self._core.submit(_native.JOB_MAP, chat, src, self._template(params), fut,
                                window or self.window, bool(return_exceptions))
        try:
            return await fut
        except BaseException:
            job.cancel()
            raise

    async def as_completed(self, prompts: Iterable[Prompt], *, return_exceptions: bool = False,
                           window: Optional[int] = None,
                           **params: Any) -> AsyncIterator[Tuple[int, Any]]:
        """Yield ``(index, result)`` as requests finish (any order). Without
        ``return_exceptions`` a failure is raised from the iteration."""
        async for pair in self._stream(False, prompts, return_exceptions, window, params):
            yield pair

    async def _stream(self, chat: bool, src: Iterable[Any], return_exceptions: bool,
                      window: Optional[int], params: Dict[str, Any]
                      ) -> AsyncIterator[Tuple[int, Any]]:
        loop = self._bind()
        job = self._core.submit(_native.JOB_STREAM, chat, src, self._template(params), None,
                                window or self.window, True)
        try:
            while True:
                chunk = job.take()
                if chunk is None:
                    return
                if not chunk:
                    fut = loop.create_future()
                    job.arm(fut)
                    await fut
                    continue
                for i, r in chunk:
                    if i < 0:  # the job itself failed (bad input, closed)
                        raise r
                    if not return_exceptions and isinstance(r, BaseException):
                        raise r
                    yield i, r
        finally:
            job.cancel()

    # ---- lifecycle ------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Engine counters: submitted, completed, attempts, retries, in_flight,
        max_in_flight, permits_free, ...; with ``max_inflight_tokens="auto"``
        also ``admission``: limit_blocks / limit_tokens (the current KV limit),
        kv_usage, peak_kv_usage, running, waiting, preemptions_seen,
        reserved_output_tokens and output_tokens_p50 (learned), prompt_ratio,
        cuts, stale, scrapes, scrape_errors, ..."""
        return self._core.stats()

    async def aclose(self, *, wait: bool = False) -> None:
        """Stop and join the engine thread. By default what is still pending is
        cancelled (each awaiting call gets ClosedError); with ``wait=True`` the
        requests already submitted finish first."""
        if wait and not self._closed:
            while self._core.live:
                await asyncio.sleep(0.005)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        if os.getpid() != self._pid:
            self._core.close(True)
            return
        loop = self._loop
        deliver = loop is not None and not loop.is_closed()
        self._unbind()
        self._core.close(not deliver)

    async def __aenter__(self) -> "Dispatcher":
        self._check()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._closed = True
                self._core.close(True)
        except Exception:
            pass


def _messages_json(messages: Any, index: Optional[int]) -> str:
    where = "messages" if index is None else f"conversations[{index}]"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"{where} must be a non-empty list of message dicts, "
                        f"not {type(messages).__name__}")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"{where}[{k}] must be a dict with a str 'role'")
    return json.dumps(list(messages), separators=(",", ":"), ensure_ascii=False)


@atexit.register
def _close_all() -> None:
    # Join engine threads before interpreter finalization; no loop to deliver to.
    for d in list(_live):
        try:
            d._closed = True
            d._core.close(True)
        except Exception:
            pass


def _after_fork_in_child() -> None:
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- drop-in helpers for code shaped like the original pipeline ----------

_default: Optional[Dispatcher] = None


def default_dispatcher() -> Dispatcher:
    """A process-wide Dispatcher configured from the environment:
    VLLM_BASE_URL (default http://127.0.0.1:8000/v1), VLLM_API_KEY, VLLM_MODEL,
    and Config.VLLM_MAX_CONCURRENT_BATCHES / Config.MAX_RETRIES."""
    global _default
    if _default is None or _default._closed or _default._pid != os.getpid():
        _default = Dispatcher(os.getenv("VLLM_BASE_URL", "http://127.0.0.1:8000/v1"),
                              api_key=os.getenv("VLLM_API_KEY") or None,
                              model=os.getenv("VLLM_MODEL") or None)
    return _default


def _join_batch(batch: Any) -> str:
    if isinstance(batch, str):
        return batch
    return "\n".join(str(x) for x in batch)


async def vllm_generate(batch: Any, *, dispatcher: Optional[Dispatcher] = None,
                        build_prompt: Optional[Callable[[Any], str]] = None,
                        **params: Any) -> str:
    """Text of one completion for a batch (a prompt string, or items turned into
    one prompt by ``build_prompt``, default: joined by newlines)."""
    d = dispatcher or default_dispatcher()
    prompt = build_prompt(batch) if build_prompt else _join_batch(batch)
    return (await d.generate(prompt, **params)).text


async def process_batches(batches: Iterable[Any], build_prompt: Callable[[Any], str],
                          parse: Optional[Callable[[str], Any]] = None, *,
                          dispatcher: Optional[Dispatcher] = None,
                          **params: Any) -> List[Any]:
    """Run every batch through the dispatcher (capped like the original's
    ``async with semaphore``), results in batch order. A failed batch does not
    sink the rest: its slot holds the exception (logged), as in the original's
    per-batch try/except. ``parse(text)`` post-processes each answer; a parse
    error is isolated the same way."""
    d = dispatcher or default_dispatcher()
    batches = list(batches)
    prompts = []
    out: List[Any] = [None] * len(batches)
    index = []
    for i, b in enumerate(batches):
        try:
            p = build_prompt(b)
            if not isinstance(p, str):
                raise TypeError(f"build_prompt returned {type(p).__name__}, not str")
        except Exception as e:  # isolated per batch
            log.warning("batch %d: build_prompt failed: %r", i, e)
            out[i] = e
            continue
        prompts.append(p)
        index.append(i)
    results = await d.map(prompts, return_exceptions=True, **params)
    for i, r in zip(index, results):
        if isinstance(r, BaseException):
            log.warning("batch %d failed: %s", i, r)
            out[i] = r
            continue
        if parse is None:
            out[i] = r.text
            continue
        try:
            out[i] = parse(r.text)
        except Exception as e:
            log.warning("batch %d: parse failed: %r", i, e)
            out[i] = e
    return out
