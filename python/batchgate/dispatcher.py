"""batchgate.Dispatcher: send prompts to a vLLM (OpenAI-compatible) server from
asyncio, with the HTTP, JSON and concurrency work done in C off the GIL.

The heavy lifting is in ``batchgate._native._Dispatcher`` (a libcurl multi
engine thread). This module binds it to the running event loop (completions
arrive through the loop's one native bridge, shared with batchgate.Semaphore:
one wakeup fd per loop), turns keyword params into a
request template once per distinct set, and offers the awaitable API.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import os
import threading
import weakref
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from . import _native, _options, _tokens
from ._native import (BatchgateError, ClosedError, HTTPStatusError, MalformedResponseError,
                      Result, TimeoutError, TransportError)
from ._redact import check_header_value, redact, redact_url, secrets_of
from .config import Config
# Bulk calls (map, as_completed, count_tokens) live in dispatcher_bulk.
from .dispatcher_bulk import Prompt as Prompt, _messages_json as _messages_json
from .dispatcher_bulk import _BulkCalls, _end_ride, _wake_rider

__all__ = [
    "Dispatcher", "Result", "BatchgateError", "HTTPStatusError", "TransportError",
    "TimeoutError", "MalformedResponseError", "ClosedError", "default_dispatcher",
]

log = logging.getLogger("batchgate")

_live: "weakref.WeakSet[Dispatcher]" = weakref.WeakSet()


#: max_concurrent under max_inflight_tokens="auto" when none is given: the KV
#: limit and the server's waiting queue decide; this only bounds connections.
AUTO_MAX_CONCURRENT = 512


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
                    str(e).replace(metrics_url, redact_url(metrics_url)))
        return None
    info.update(metrics_url=metrics_url, model=model, interval=float(interval),
                stale_after=float(stale_after), target=float(target), high=float(high))
    log.info("max_inflight_tokens='auto': KV cache of %d blocks x %d tokens, max_model_len %s; "
             "watching %s every %.0f ms", info["kv_blocks"], info["block_size"],
             info["max_model_len"] if info["max_model_len"] > 0 else "unknown",
             redact_url(metrics_url), interval * 1000)
    return info


def _admission_tick(ref: "weakref.ref[Dispatcher]") -> None:
    d = ref()  # the timer must not keep a forgotten dispatcher alive
    if d is not None:
        d._log_admission()


class Dispatcher(_BulkCalls):
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
    static caps, with a logged warning. With ``exact_prompt_tokens=True`` (and
    a token cap, static or auto) ``generate``/``map``/``chat``/``chat_map``
    first count their prompts with the server's own ``/tokenize``
    (``count_tokens``, cached) and charge those counts instead of the
    estimator's. Use it from one event
    loop at a time; close it with ``await d.aclose()`` or ``async with``.

    ``base_url`` may be a list of several replicas' URLs: each gets its own
    engine and caps, bulk calls are pulled by whichever has room, single calls
    go to the least loaded, and a replica that refuses connections or answers
    5xx is ejected and probed back (see ``batchgate.replicas``).
    """

    #: Counts kept by count_tokens() (an LRU; 0 keeps none). Set before the first call.
    token_cache_size: int = _tokens.DEFAULT_CACHE_SIZE

    def __new__(cls, base_url: Any = None, *args: Any, **kwargs: Any) -> "Dispatcher":
        # Several endpoints: batchgate.replicas routes over one Dispatcher each.
        if cls is Dispatcher and isinstance(base_url, (list, tuple)) and len(base_url) != 1:
            from .replicas import ReplicaDispatcher
            return super().__new__(ReplicaDispatcher)
        return super().__new__(cls)

    def __init__(self, base_url: Union[str, Sequence[str], None] = None,
                 api_key: Optional[str] = None,
                 model: Optional[str] = None,
                 *, max_concurrent: Optional[int] = None,
                 max_inflight_tokens: Optional[Union[int, Literal["auto"]]] = None,
                 timeout: _options.Timeout = 600.0, connect_timeout: Optional[float] = 10.0,
                 max_retries: Optional[int] = None,
                 headers: Optional[Mapping[str, str]] = None, verify: bool = True,
                 max_response_bytes: Optional[int] = 64 << 20,
                 semaphore: Any = None, window: Optional[int] = None, backoff: float = 0.5,
                 max_backoff: float = 30.0, max_retry_after: float = 60.0,
                 retry_timeouts: bool = False, max_connections: int = 0,
                 default_max_tokens: int = 16, metrics_url: Optional[str] = None,
                 metrics_interval: float = 0.1, metrics_stale_after: float = 2.0,
                 kv_target: float = 0.85, kv_high: float = 0.92,
                 exact_prompt_tokens: bool = False) -> None:
        if isinstance(base_url, (list, tuple)) and len(base_url) == 1:
            base_url = base_url[0]  # one endpoint: the plain engine
        if base_url is not None and not isinstance(base_url, str):
            raise TypeError(f"base_url must be a str or a list of str, not "
                            f"{type(base_url).__name__}")
        # openai-compat: VLLM_* / OPENAI_* environment (see _options.resolve_connection).
        base_url, api_key = _options.resolve_connection(base_url, api_key)
        if model is None:  # Config.LLM_MODEL (the original's; may be set in code), then env
            model = Config.LLM_MODEL or _options.env_model()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// URL, "
                             f"got {redact_url(base_url)!r}")
        check_header_value("base_url", base_url)
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError("api_key must be a str or None")
        if api_key is not None:
            check_header_value("api_key", api_key)
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a str or None, not {type(model).__name__}")
        if model is not None:
            check_header_value("model", model)
        hdr_lines: List[str] = []
        for k, hv in (headers or {}).items():
            if not isinstance(k, str) or not isinstance(hv, str):
                raise TypeError(f"header {k!r} must map str to str")
            if any(c in k for c in "\r\n\0") or ":" in k or not k.strip():
                raise ValueError(f"invalid header name {k!r}")
            check_header_value(f"header {k!r}", hv)
            hdr_lines.append(f"{k}: {hv}")
        if not any(k.lower() == "user-agent" for k in (headers or {})):
            hdr_lines.append(f"User-Agent: {user_agent()}")
        # An httpx.Timeout (openai-python's habit) brings its own connect part,
        # which the admission probe below already uses.
        attempt_timeout: Optional[float]
        if timeout is None or isinstance(timeout, (int, float)):
            attempt_timeout = timeout
        else:  # an httpx.Timeout (checked there, else a TypeError naming it)
            attempt_timeout, connect_timeout = _options.timeout_parts(timeout)
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
        for name, t in (("timeout", attempt_timeout), ("connect_timeout", connect_timeout),
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
            cls = type(semaphore)
            raise TypeError(f"semaphore must be a batchgate.Semaphore (shared natively), "
                            f"not {cls.__module__}.{cls.__qualname__}")
        if semaphore is None:
            # Our own cap, still a real batchgate.Semaphore: Python code can
            # share it with `async with dispatcher.semaphore:`.
            semaphore = _native.Semaphore(max_concurrent)
        # Tasks holding its permits get requests that ride on them (see _ride).
        semaphore._track_holders()
        self._core = _native._Dispatcher(
            base_url=base_url, api_key=api_key, max_concurrent=max_concurrent,
            semaphore=semaphore, max_inflight_tokens=max_inflight_tokens or 0,
            timeout=float(attempt_timeout or 0), connect_timeout=float(connect_timeout or 0),
            max_retries=max_retries, headers=hdr_lines, verify=bool(verify),
            max_response_bytes=int(max_response_bytes or 0), backoff=float(backoff),
            max_backoff=float(max_backoff), max_retry_after=float(max_retry_after),
            retry_timeouts=bool(retry_timeouts), max_connections=max_connections,
            default_max_tokens=default_max_tokens, admission=admission)
        self.base_url = redact_url(base_url)  # shown in repr/logs; the engine has the real one
        self._url = base_url  # the real one, for the model lookup only
        self.model = model
        self.semaphore = semaphore
        self.max_concurrent = max_concurrent
        #: Seconds per attempt and to connect (None: none), as the engine has them.
        self.timeout: Optional[float] = float(attempt_timeout) if attempt_timeout else None
        self.connect_timeout: Optional[float] = (float(connect_timeout) if connect_timeout
                                                 else None)
        self.max_inflight_tokens: Optional[int] = max_inflight_tokens
        #: The closed-loop admission settings in use (None: static caps only).
        self.admission: Optional[Dict[str, Any]] = None
        if admission is not None:
            self.admission = dict(admission, metrics_url=redact_url(admission["metrics_url"]))
        self._admission_timer: Optional[asyncio.TimerHandle] = None
        self._admission_logged = 0
        self.window = window
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._templates: Dict[Any, Any] = {}
        self._closed = False
        # openai-compat: with_options() views share this root's engine and state.
        self._root: Dispatcher = self
        self._defaults: Dict[str, Any] = {}
        self._model_explicit = model is not None
        self._resolved_model: Optional[str] = None
        self._model_checked = False
        self._model_error: Optional[BaseException] = None
        self._model_lock = threading.Lock()
        self._headers = dict(headers or {})
        self._api_key = api_key
        self._verify = bool(verify)
        self._token_cache: Optional[_tokens.TokenCountCache] = None  # count_tokens()
        if not isinstance(exact_prompt_tokens, bool):
            raise TypeError(f"exact_prompt_tokens must be a bool, not "
                            f"{type(exact_prompt_tokens).__name__}")
        #: generate()/map() charge the token cap with the server's /tokenize
        #: counts instead of the estimator (only when a token cap is in use).
        self.exact_prompt_tokens = exact_prompt_tokens and (
            self.max_inflight_tokens is not None or self.admission is not None)
        _live.add(self)

    def __repr__(self) -> str:  # the API key is never shown
        state = "closed" if self._closed else f"live={self._core.live}"
        return (f"<batchgate.Dispatcher {self.base_url} model={self.model!r} "
                f"max_concurrent={self.max_concurrent} {state}>")

    # ---- plumbing -------------------------------------------------------
    def _forked(self) -> bool:
        # The engine's fork generation (bumped by pthread_atfork in every
        # child): no getpid() system call on each submit.
        return bool(self._core.forked)

    def _check(self) -> None:
        if self._forked():
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
        # Completions come through the loop's bridge (add_reader, or a
        # watcher thread on loops without it), made once per loop in C.
        self._core.bind(loop)
        self._loop = loop
        if self.admission is not None:
            self._admission_timer = loop.call_later(0.5, _admission_tick, weakref.ref(self))
        return loop

    def _log_admission(self) -> None:
        """Log the admission limit's big moves (recorded natively) at INFO."""
        self._admission_timer = None
        if self._closed or self._loop is None:
            return
        adm = self.admission or {}  # events come only from an admission-enabled engine
        for t, old, new, reason in self._core.admission_events():
            bs = adm["block_size"] if adm else 1
            if reason == "stale":
                log.warning("admission: no metrics from %s for %.1f s; admitting nothing new "
                            "until they return", adm["metrics_url"], adm["stale_after"])
            elif reason == "fresh":
                log.info("admission: metrics are back; limit %d KV blocks (%d tokens)", new,
                         new * bs)
            else:
                log.info("admission: KV limit %d -> %d blocks (%d tokens): %s", old, new,
                         new * bs, reason)
        self._admission_timer = self._loop.call_later(0.5, _admission_tick, weakref.ref(self))

    def _unbind(self) -> None:
        if self._admission_timer is not None:
            self._admission_timer.cancel()
            self._admission_timer = None
        self._loop = None
        self._core.bind(None)

    def _template(self, params: Dict[str, Any]) -> Any:
        """The native template for one call's keywords: body fields and the
        reserved per-call options (see _options), cached per distinct set."""
        opts = _options.call_options(self._defaults, params)
        body = params
        if opts.extra_body:
            body = {**params, **opts.extra_body}  # openai-python: extra_body wins
        key = _options.body_json(body) if body else ""
        model = self.model if self.model is not None else self._root._resolved_model
        ckey = (key, model, opts.native)
        root = self._root
        t = root._templates.get(ckey)
        if t is None:
            if len(root._templates) > 256:
                root._templates.clear()
            t = root._core.template(model, key or None, opts.native)
            root._templates[ckey] = t
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
        await self._ensure_model(params)
        rec = self.semaphore._held()
        if rec is not None:
            return await self._ride(loop, rec, chat, payload, params)
        counts = None
        if self.exact_prompt_tokens:
            counts = await _tokens.prompt_counts(self, [payload], chat)
        fut = loop.create_future()
        job = self._core.submit(_native.JOB_ONE, chat, payload, self._template(params), fut, 1,
                                False, False, counts)
        try:
            return await fut
        except asyncio.CancelledError:
            job.cancel()
            raise

    async def _ride(self, loop: asyncio.AbstractEventLoop, rec: List[Any], chat: bool,
                    payload: Any, params: Dict[str, Any]) -> Result:
        # The calling task holds rec[0] permits of our semaphore (`async with
        # sem: await d.generate()`): its requests ride on them, at most rec[0]
        # at once (rec[1] riding; the rest wait in rec[2] for a rider to end),
        # instead of asking for a second permit it may never get.
        while rec[1] >= rec[0] > 0:
            if rec[2] is None:
                rec[2] = collections.deque()
            w = loop.create_future()
            rec[2].append(w)
            try:
                await w
            except asyncio.CancelledError:
                if w.done() and not w.cancelled():
                    _wake_rider(rec)  # woken, then cancelled: pass the turn on
                else:
                    try:
                        rec[2].remove(w)
                    except ValueError:
                        pass
                raise
        preheld = rec[0] > 0  # else the permits went back meanwhile: ask as usual
        if preheld:
            rec[1] += 1
        try:
            fut = loop.create_future()
            job = self._core.submit(_native.JOB_ONE, chat, payload, self._template(params),
                                    fut, 1, False, preheld)
            try:
                return await fut
            except asyncio.CancelledError:
                job.cancel()
                raise
        finally:
            if preheld:
                rec[1] -= 1
                _wake_rider(rec)

    # ---- openai-compat: per-call defaults and the server's model ----------
    def with_options(self, **options: Any) -> "Dispatcher":
        """A view with other defaults for the per-call options (``timeout``,
        ``max_retries``, ``extra_headers``/``default_headers``,
        ``extra_query``/``default_query``, ``extra_body``, ``raw``) and/or
        ``model``, sharing this dispatcher's engine, caps and connections, like
        openai-python's ``client.with_options(...)``. Closing a view closes the
        shared engine."""
        defaults = dict(self._defaults)
        model = options.pop("model", self.model)
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a str or None, not {type(model).__name__}")
        for k, v in options.items():
            name = _options.ALIASES.get(k, k)
            if name not in _options.RESERVED:
                raise TypeError(f"with_options() got an unexpected keyword {k!r} "
                                f"(options: model, {', '.join(_options.RESERVED)})")
            v = _options.check_option(name, v)
            if isinstance(v, dict) and isinstance(defaults.get(name), dict):
                v = {**defaults[name], **v}
            defaults[name] = v
        return _OptionsView(self._root, defaults, model)

    async def _ensure_model(self, params: Mapping[str, Any]) -> None:
        root = self._root
        if "model" in params or "model" in (params.get("extra_body") or ()) or \
                "model" in (self._defaults.get("extra_body") or ()):
            return  # the call names its model (openai-python habit)
        if self.model is not None or root._model_explicit or root._model_checked:
            if root._model_error is not None and self.model is None:
                raise root._model_error
            return
        await asyncio.get_running_loop().run_in_executor(None, root._lookup_model)
        if root._model_error is not None:
            raise root._model_error

    def _lookup_model(self) -> None:
        """Once per dispatcher: GET {base_url}/models; use the only model the
        server offers. Blocking (runs in an executor thread, or directly from
        SyncDispatcher), serialized by a lock so concurrent first calls share it."""
        with self._model_lock:
            if self._model_checked:
                return
            try:
                ids = _fetch_model_ids(self._url, self._api_key, self._headers,
                                       self._verify)
            except Exception as e:  # the server may not list models: let it choose
                log.warning("could not list the server's models (%s: %s); sending requests "
                            "without a model (the server's default)", type(e).__name__,
                            redact(str(e), secrets_of(self._url)))
                ids = []
            if len(ids) == 1:
                self._resolved_model = ids[0]
            elif len(ids) > 1:
                self._model_error = ValueError(
                    f"the server at {self.base_url} offers several models "
                    f"({', '.join(ids[:10])}); pass Dispatcher(model=...) or set LLM_MODEL / "
                    f"VLLM_MODEL")
            self._model_checked = True

    # ---- lifecycle ------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Engine counters: submitted, completed, attempts, retries, in_flight,
        max_in_flight, permits_free, ...; with ``max_inflight_tokens="auto"``
        also ``admission``: limit_blocks / limit_tokens (the current KV limit),
        ceiling_blocks (its current bound) and used_share (the measured share
        of the charged blocks the server holds, -1 until measured),
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
        if self._forked():
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


class _OptionsView(Dispatcher):
    """Dispatcher.with_options(): other per-call defaults over a shared root."""

    def __init__(self, root: Dispatcher, defaults: Dict[str, Any],  # noqa: super not called
                 model: Optional[str]) -> None:
        self.__dict__.update(_root=root, _defaults=defaults, model=model)

    def __getattr__(self, name: str) -> Any:  # everything else is the root's
        return getattr(self.__dict__["_root"], name)

    def __repr__(self) -> str:
        return f"<batchgate.Dispatcher view of {self._root!r} options={sorted(self._defaults)}>"

    def _bind(self) -> asyncio.AbstractEventLoop:
        return self._root._bind()

    def close(self) -> None:
        self._root.close()

    async def aclose(self, *, wait: bool = False) -> None:
        await self._root.aclose(wait=wait)

    async def __aenter__(self) -> "Dispatcher":
        self._root._check()
        return self

    def __del__(self) -> None:
        pass


def user_agent() -> str:
    from . import __version__
    return f"batchgate/{__version__} libcurl/{_native.libcurl_version}"


def _fetch_model_ids(base_url: str, api_key: Optional[str], headers: Mapping[str, str],
                     verify: bool) -> List[str]:
    import base64
    import ssl
    import urllib.parse
    import urllib.request

    u = urllib.parse.urlsplit(base_url)
    basic = None
    if u.username is not None:  # user:password@ in the URL: a header, never in messages
        basic = base64.b64encode(f"{urllib.parse.unquote(u.username)}:"
                                 f"{urllib.parse.unquote(u.password or '')}".encode()).decode()
        host = u.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        u = u._replace(netloc=host + (f":{u.port}" if u.port else ""))
    req = urllib.request.Request(urllib.parse.urlunsplit(u).rstrip("/") + "/models",
                                 method="GET")
    for k, v in headers.items():
        req.add_header(k, v)
    req.add_header("User-Agent", user_agent())
    req.add_header("Accept", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    elif basic:
        req.add_header("Authorization", f"Basic {basic}")
    ctx = None
    if base_url.startswith("https://") and not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    # OpenerDirector.open() takes no context: an unverified one goes in its handler.
    handlers: List[Any] = [urllib.request.ProxyHandler({})]
    if ctx is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(req, timeout=10) as f:
        doc = json.loads(f.read(1 << 20))
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ValueError("no \"data\" list in the answer")
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


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

# One default Dispatcher per event loop: a Dispatcher serves one loop at a
# time, and code like the original pipeline may run asyncio.run() in several
# threads at once. Entries of closed loops are closed and dropped on the next
# call (and at exit), so finished loops do not pin engine threads.
_defaults_by_loop: Dict[int, Tuple["weakref.ref[asyncio.AbstractEventLoop]", Dispatcher]] = {}
_defaults_lock = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The running event loop's default Dispatcher, configured from the
    environment: base URL and key from VLLM_BASE_URL / VLLM_API_KEY, else
    OPENAI_BASE_URL / OPENAI_API_KEY (default http://127.0.0.1:8000/v1), model
    from LLM_MODEL / VLLM_MODEL or the server's only model, caps from
    Config.VLLM_MAX_CONCURRENT_BATCHES / Config.MAX_RETRIES."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("default_dispatcher() is per event loop: call it from a coroutine "
                           "(or use batchgate.SyncDispatcher outside asyncio)") from None
    stale = []
    with _defaults_lock:
        for key, (ref, old) in list(_defaults_by_loop.items()):
            lp = ref()
            if lp is None or lp.is_closed() or old._closed or old._forked():
                stale.append(old)
                del _defaults_by_loop[key]
        entry = _defaults_by_loop.get(id(loop))
        d = entry[1] if entry and entry[0]() is loop else None
        if d is None:
            base = None
            if not os.getenv("VLLM_BASE_URL", "").strip() and \
                    not os.getenv("OPENAI_BASE_URL", "").strip():
                base = "http://127.0.0.1:8000/v1"
            d = Dispatcher(base)
            _defaults_by_loop[id(loop)] = (weakref.ref(loop), d)
    for old in stale:
        old.close()
    return d


def _close_defaults() -> None:
    """Close every loop's default dispatcher (tests, and code that reconfigures)."""
    with _defaults_lock:
        olds = [d for _, d in _defaults_by_loop.values()]
        _defaults_by_loop.clear()
    for d in olds:
        d.close()


def __getattr__(name: str) -> Any:
    # Moved to batchgate.compat; old imports keep working.
    if name in ("vllm_generate", "process_batches"):
        from . import compat
        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
