"""batchgate on Ray Data: each actor of a ``map_batches`` pool owns native
Dispatchers, and the per-server caps are cluster-wide.

    import ray, batchgate.ray

    ds = ray.data.read_parquet("reviews.parquet")
    out = ds.map_batches(
        batchgate.ray.Generate,
        fn_constructor_kwargs=dict(base_url=["http://a:8000/v1", "http://b:8000/v1"],
                                   model="Qwen/Qwen2.5-7B-Instruct", prompt_column="prompt",
                                   output_column="text", concurrency=4,
                                   max_concurrent=32, max_tokens=128, temperature=0),
        concurrency=4, batch_size=256, num_cpus=0.25)

or ``batchgate.ray.generate(ds, base_url=..., concurrency=4, ...)``, which passes the same
``concurrency`` to both places.

Caps: ``max_concurrent`` and ``max_inflight_tokens`` mean what they mean for one
``Dispatcher`` (requests / estimated tokens in flight *per server*), but summed over the
whole actor pool: each actor gets ``total // concurrency`` for each server. The actor
learns the pool size from ``concurrency`` in its constructor kwargs (for an autoscaling
pool ``(min, max)`` the max is used, so the sum never exceeds the total). A shared Ray actor
holding the budget was not chosen: taking a permit from it would cost a Ray call per request
and make one actor a single point of failure for the whole job, while a static split costs
nothing and can only under-use the servers when fewer actors than ``concurrency`` run.
``max_inflight_tokens="auto"`` (when the installed Dispatcher supports it) is passed to every
actor unsplit: the closed-loop controller reads each server's own metrics, so actors sharing
a server back off together.

Rows: one request per row (``prompt_column`` for /v1/completions, or ``messages_column``
for /v1/chat/completions). A row that fails gets ``status="error"`` and its message in
``error_column``; it never fails the batch. Rows that failed on one server with a transport
error, a timeout or a retryable status (429/5xx, after the Dispatcher's own retries, which
honour Retry-After) are sent once to each other server before they count as failed; a server
that refused connections is skipped for a cool-down that doubles while it stays down.

This module imports neither ray nor numpy at import time; ``import batchgate`` never does.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from typing import (Any, AsyncIterator, Dict, List, Literal, Mapping, Optional, Sequence, Set,
                    Tuple, Union, overload)

from .config import Config
from .dispatcher import Dispatcher, HTTPStatusError, Result, TimeoutError, TransportError

__all__ = ["Generate", "generate", "split_cap"]

log = logging.getLogger("batchgate.ray")

# Statuses worth trying on another server once the Dispatcher's retries are spent.
_RETRY_ELSEWHERE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_DISPATCHER_KWARGS = frozenset(
    p for p in inspect.signature(Dispatcher.__init__).parameters
    if p not in ("self", "base_url", "model", "max_concurrent", "max_inflight_tokens"))
_COOLDOWN_START_S = 1.0
_COOLDOWN_MAX_S = 30.0


@overload
def split_cap(total: int, actors: int, name: str) -> int: ...
@overload
def split_cap(total: None, actors: int, name: str) -> None: ...
@overload
def split_cap(total: Optional[int], actors: int, name: str) -> Optional[int]: ...
def split_cap(total: Optional[int], actors: int, name: str) -> Optional[int]:
    """One actor's share of a cluster-wide cap (floor, so the shares never sum past it)."""
    if total is None:
        return None
    if not isinstance(total, int) or isinstance(total, bool):
        raise TypeError(f"{name} must be an int, not {type(total).__name__}")
    share = total // actors
    if share < 1:
        raise ValueError(f"{name}={total} cannot be split over {actors} actors "
                         f"(each would get less than 1); raise it or lower concurrency")
    return share


def _pool_size(concurrency: Any) -> int:
    if isinstance(concurrency, (tuple, list)) and len(concurrency) in (2, 3):
        n = concurrency[1]  # (min, max[, initial]): the most that can run at once
    else:
        n = concurrency
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError("concurrency must be the same value passed to map_batches "
                         f"(an int >= 1 or a (min, max) tuple), got {concurrency!r}")
    return n


def _urls(base_url: Any) -> List[str]:
    urls = [base_url] if isinstance(base_url, str) else list(base_url or ())
    if not urls:
        raise ValueError("base_url must be a URL or a non-empty list of URLs")
    for u in urls:
        if not isinstance(u, str) or not u.startswith(("http://", "https://")):
            raise ValueError(f"base_url must hold http:// or https:// URLs, got {u!r}")
    if len(set(urls)) != len(urls):
        raise ValueError("base_url lists the same server twice")
    return urls


class _Endpoint:
    """One server as seen by one actor: its Dispatcher and whether it is cooling down."""

    __slots__ = ("url", "dispatcher", "down_until", "cooldown")

    def __init__(self, url: str, dispatcher: Dispatcher) -> None:
        self.url = url
        self.dispatcher = dispatcher
        self.down_until = 0.0
        self.cooldown = _COOLDOWN_START_S

    def mark_down(self, now: float) -> None:
        self.down_until = now + self.cooldown
        log.warning("batchgate.ray: %s refused connections; skipped for %.0f s",
                    _redact(self.url), self.cooldown)
        self.cooldown = min(_COOLDOWN_MAX_S, self.cooldown * 2)

    def mark_up(self) -> None:
        self.cooldown = _COOLDOWN_START_S


class _Pull:
    """One endpoint's view of the rows still to send: the Dispatcher pulls from it a
    window at a time, so a fast server takes more rows than a slow one. It records which
    row each pulled item was, since map() answers in pull order."""

    __slots__ = ("queue", "tried", "name", "taken")

    def __init__(self, queue: List[int], tried: List[Set[str]], name: str) -> None:
        self.queue = queue
        self.tried = tried
        self.name = name
        self.taken: List[int] = []

    def __iter__(self) -> "_Pull":
        return self

    def __next__(self) -> int:
        q = self.queue
        # Skip rows this server already failed (they wait for another one).
        for k in range(len(q) - 1, -1, -1):
            row = q[k]
            if self.name not in self.tried[row]:
                del q[k]
                self.taken.append(row)
                return row
        raise StopIteration


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    return scheme + sep + host + slash + path


def _retry_elsewhere(e: BaseException) -> bool:
    if isinstance(e, (TransportError, TimeoutError)):
        return True
    return isinstance(e, HTTPStatusError) and getattr(e, "status", 0) in _RETRY_ELSEWHERE_STATUS


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _to_list(values: Any) -> List[Any]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _plain(x: Any) -> Any:
    """Arrow/numpy containers (list<struct> becomes an array of dicts) back to JSON types."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class Generate:
    """Callable class for ``Dataset.map_batches``: one request per row, answers in
    ``output_column``; ``status`` / ``error`` columns say which rows failed.

    Constructor keywords: ``base_url`` (one URL or a list of servers), ``model``,
    ``prompt_column`` or ``messages_column`` (chat), ``output_column``,
    ``concurrency`` (the pool size, as given to map_batches), ``max_concurrent`` and
    ``max_inflight_tokens`` (per server, for the whole pool; an int or ``"auto"``),
    ``status_column`` / ``error_column`` (``None`` drops them), ``usage_columns``
    (``prompt_tokens``, ``completion_tokens``, ``latency_s``, ``attempts``). Other
    Dispatcher options (api_key, timeout, max_retries, backoff, max_retry_after, ...)
    go to each Dispatcher; every remaining keyword is a request body field
    (max_tokens, temperature, response_format, ...).
    """

    def __init__(self, base_url: Union[str, Sequence[str]], model: Optional[str] = None, *,
                 prompt_column: Optional[str] = "prompt",
                 messages_column: Optional[str] = None,
                 output_column: str = "text",
                 status_column: Optional[str] = "status",
                 error_column: Optional[str] = "error",
                 usage_columns: bool = False,
                 concurrency: Any = None,
                 max_concurrent: Optional[int] = None,
                 max_inflight_tokens: Optional[Union[int, Literal["auto"]]] = None,
                 **kwargs: Any) -> None:
        urls = _urls(base_url)
        if concurrency is None:
            raise ValueError(
                "pass concurrency= in fn_constructor_kwargs too (the same value as "
                "map_batches' concurrency), so that max_concurrent and "
                "max_inflight_tokens can be split over the actors; or use "
                "batchgate.ray.generate(), which passes it to both")
        actors = _pool_size(concurrency)
        self.chat = messages_column is not None
        self.input_column = messages_column if self.chat else prompt_column
        if not isinstance(self.input_column, str) or not self.input_column:
            raise ValueError("prompt_column (or messages_column for chat) must name a column")
        for name, col in (("output_column", output_column), ("status_column", status_column),
                          ("error_column", error_column)):
            if col is not None and (not isinstance(col, str) or not col):
                raise ValueError(f"{name} must be a column name, got {col!r}")
        self.output_column = output_column
        self.status_column = status_column
        self.error_column = error_column
        self.usage_columns = bool(usage_columns)
        if max_concurrent is None:
            max_concurrent = Config.VLLM_MAX_CONCURRENT_BATCHES
        self.max_concurrent = split_cap(max_concurrent, actors, "max_concurrent")
        if max_inflight_tokens == "auto":
            tokens: Any = "auto"  # closed loop per server: not split (see module doc)
        else:
            tokens = split_cap(max_inflight_tokens, actors, "max_inflight_tokens")
        self.max_inflight_tokens = tokens
        dkw = {k: kwargs.pop(k) for k in list(kwargs) if k in _DISPATCHER_KWARGS}
        self.params: Dict[str, Any] = kwargs  # request body fields
        try:
            json.dumps(self.params, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"request parameters must be JSON values: {e}") from None
        self.endpoints: List[_Endpoint] = []
        try:
            for u in urls:
                self.endpoints.append(_Endpoint(u, self._dispatcher(u, model, tokens, dkw)))
        except BaseException:
            self.close()
            raise
        # Enough queued per server to keep its cap busy between loop turns, small
        # enough that the servers share a batch's rows by speed.
        self.window = self.max_concurrent + max(2, self.max_concurrent // 2)

    def _dispatcher(self, url: str, model: Optional[str], tokens: Any,
                    dkw: Dict[str, Any]) -> Dispatcher:
        try:
            return Dispatcher(url, model=model, max_concurrent=self.max_concurrent,
                              max_inflight_tokens=tokens, **dkw)
        except (TypeError, ValueError) as e:
            if tokens == "auto" and "max_inflight_tokens" in str(e):
                raise ValueError("max_inflight_tokens='auto' needs a batchgate whose "
                                 "Dispatcher supports it (this one does not): pass a "
                                 "token budget as an int") from None
            raise

    def __repr__(self) -> str:  # no URL passwords
        return (f"<batchgate.ray.Generate {[_redact(e.url) for e in self.endpoints]} "
                f"max_concurrent={self.max_concurrent}/server>")

    # ---- Ray Data entry point --------------------------------------------------
    async def __call__(self, batch: Any) -> AsyncIterator[Any]:
        # An async generator, the form of async UDF Ray Data has accepted longest
        # (plain coroutines came later). Ray runs it on the actor's own event loop,
        # up to 4 batches at a time (RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY).
        yield await self.process(batch)

    async def process(self, batch: Any) -> Any:
        """The output batch for one input batch (numpy dict, pandas or pyarrow)."""
        columns, rebuild = _columns(batch)
        if self.input_column not in columns:
            raise KeyError(f"batchgate.ray.Generate: the batch has no column "
                           f"{self.input_column!r} (columns: {sorted(columns)})")
        values = _to_list(columns[self.input_column])
        results = await self.run(values)
        out = dict(columns)
        ok = [not isinstance(r, BaseException) for r in results]
        out[self.output_column] = [None if isinstance(r, BaseException) else r.text
                                   for r in results]
        if self.status_column:
            out[self.status_column] = ["ok" if k else "error" for k in ok]
        if self.error_column:
            out[self.error_column] = [_error_text(r) if isinstance(r, BaseException) else None
                                      for r in results]
        if self.usage_columns:
            usage = [{} if isinstance(r, BaseException) else (r.usage or {}) for r in results]
            out["prompt_tokens"] = [u.get("prompt_tokens") for u in usage]
            out["completion_tokens"] = [u.get("completion_tokens") for u in usage]
            out["latency_s"] = [None if isinstance(r, BaseException) else r.latency
                                for r in results]
            out["attempts"] = [getattr(r, "attempts", None) if isinstance(r, BaseException)
                               else r.attempts for r in results]
        return rebuild(out)

    # ---- the work, usable without Ray too ---------------------------------------
    async def run(self, values: Sequence[Any]) -> List[Union[Result, BaseException]]:
        """One Result or one exception per value, in input order."""
        n = len(values)
        out: List[Any] = [None] * n
        payloads: List[Any] = [None] * n
        pending: List[int] = []
        for i, v in enumerate(values):
            try:
                payloads[i] = self._payload(v, i)
                pending.append(i)
            except (TypeError, ValueError) as err:  # this row only
                out[i] = err
        tried: List[Set[str]] = [set() for _ in range(n)]
        while pending:
            now = time.monotonic()
            untried = [e for e in self.endpoints if any(e.url not in tried[i] for i in pending)]
            if not untried:
                break
            # Servers cooling down are used only when no other can take these rows.
            live = [e for e in untried if e.down_until <= now] or untried
            queue = pending[::-1]  # popped from the end: input order
            pulls = [_Pull(queue, tried, e.url) for e in live]
            answers = await asyncio.gather(*(self._send(e, p, payloads)
                                             for e, p in zip(live, pulls)))
            pending = queue[::-1]  # rows no live server could take this round
            now = time.monotonic()
            for e, p, res in zip(live, pulls, answers):
                refused = False
                for row, r in zip(p.taken, res):
                    tried[row].add(e.url)
                    out[row] = r
                    if isinstance(r, BaseException) and _retry_elsewhere(r):
                        refused = refused or isinstance(r, TransportError)
                        if len(tried[row]) < len(self.endpoints):
                            pending.append(row)
                if refused:
                    e.mark_down(now)
                elif res:
                    e.mark_up()
            pending.sort()
        return out

    async def _send(self, ep: _Endpoint, pull: _Pull, payloads: List[Any]) -> List[Any]:
        src = (payloads[i] for i in pull)
        d = ep.dispatcher
        try:
            if self.chat:
                return await d.chat_map(src, return_exceptions=True, window=self.window,
                                        **self.params)
            return await d.map(src, return_exceptions=True, window=self.window,
                               **self.params)
        except Exception as e:  # the job as a whole failed: each of its rows gets it
            return [e] * len(pull.taken)

    def _payload(self, v: Any, row: int) -> Any:
        if self.chat:
            msgs = _plain(v)
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise TypeError(f"row {row}: {self.input_column!r} must be a non-empty list "
                                f"of message dicts with a str 'role', got {type(v).__name__}")
            return msgs
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if not isinstance(v, str):
            raise TypeError(f"row {row}: {self.input_column!r} must be a str, "
                            f"got {type(v).__name__}")
        return v

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Each server's Dispatcher counters, keyed by its URL (password hidden)."""
        return {_redact(e.url): e.dispatcher.stats() for e in self.endpoints}

    def close(self) -> None:
        for e in self.endpoints:
            e.dispatcher.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _columns(batch: Any) -> Tuple[Dict[str, Any], Any]:
    """The batch's columns as a dict, and how to turn output columns back into the
    batch's own format (numpy dict, pandas, pyarrow)."""
    if isinstance(batch, Mapping):
        import numpy as np

        def to_numpy(cols: Dict[str, Any]) -> Dict[str, Any]:
            res = {}
            for k, v in cols.items():
                if isinstance(v, list):
                    arr = np.empty(len(v), dtype=object)
                    arr[:] = v
                    v = arr
                res[k] = v
            return res
        return dict(batch), to_numpy
    mod = type(batch).__module__
    if mod.startswith("pandas"):
        import pandas as pd  # type: ignore[import-untyped, unused-ignore]
        return {c: batch[c] for c in batch.columns}, \
            lambda cols: pd.DataFrame(cols, index=batch.index)
    if mod.startswith("pyarrow"):
        import pyarrow as pa  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return batch.to_pydict(), pa.Table.from_pydict
    raise TypeError(f"batchgate.ray.Generate takes numpy-dict, pandas or pyarrow batches, "
                    f"not {type(batch).__name__}")


def generate(ds: Any, *, base_url: Union[str, Sequence[str]], concurrency: Any,
             batch_size: Optional[int] = 256, num_cpus: float = 0.25,
             map_batches_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Any:
    """``ds.map_batches(Generate, ...)`` with ``concurrency`` given to the actor pool
    and to every actor (for the cap split). ``kwargs`` are Generate's keywords."""
    kwargs = dict(kwargs, base_url=base_url, concurrency=concurrency)
    return ds.map_batches(Generate, fn_constructor_kwargs=kwargs, concurrency=concurrency,
                          batch_size=batch_size, num_cpus=num_cpus,
                          **(map_batches_kwargs or {}))
