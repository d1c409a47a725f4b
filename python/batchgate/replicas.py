"""Several vLLM replicas behind one Dispatcher: routing, health and failover.

``Dispatcher(base_url=["http://a:8000/v1", "http://b:8000/v1"])`` builds one
ordinary single-URL Dispatcher per endpoint (each its own native engine, count
cap, token budget and, with ``max_inflight_tokens="auto"``, its own KV
controller reading that server's ``/metrics``) and spreads the work over them.

Routing. Bulk calls (map, chat_map, as_completed) are pull-based: every
healthy endpoint runs one native stream job whose source is a small iterator
over one shared input, so an endpoint takes a new prompt only when its own
window has room. A replica twice as fast pulls twice as many prompts; nothing
is split in advance, and memory stays bounded by the windows (each job keeps
only its not-yet-answered items, to map its local indices back to the input's
and to move them elsewhere on failure). Single calls (generate, chat) go to
the endpoint with the lowest load score
``max(in_flight / count_cap, kv_held / kv_limit, waiting / 5)`` (the last two
only with ``auto`` metrics), ties broken round-robin.

Why least-loaded and not power-of-two-choices: vLLM's and SGLang's routers
(round_robin, random, consistent_hash, power_of_two, cache_aware) and
LiteLLM's router (simple-shuffle, least-busy, usage-based, latency-based)
sit between many clients and the replicas and see load only through polled,
stale numbers; power-of-two-choices is what keeps such routers from herding
onto the one endpoint that looked idle a moment ago. Here the router is the
client itself: the in-flight count of every endpoint is exact and current on
the event loop, so picking the minimum is the better choice (it is
join-shortest-queue, the policy two choices approximate); the server's own
waiting queue and KV usage (llm-d's ``max(queue/5, kv/0.8)`` utilization
score, here against the controller's own limit) add what other clients put
there. Prefix-cache-aware routing (SGLang's cache_aware) would need the
prompts' shared prefixes; batch jobs rarely share long ones, so it is left
out.

Caps and options are per endpoint: ``max_concurrent``, ``max_inflight_tokens``
(a number, or ``"auto"`` on each server's own metrics) and ``window`` (by
default each endpoint's cap plus half of it, at least 8, where under
``"auto"`` the cap is taken as KV tokens / 256: what an endpoint
holds unsent is what a faster one cannot take at the end of a job). A
``semaphore`` passed in is shared by every endpoint's engine (a total cap);
without one, ``d.semaphore`` is None (the per-endpoint semaphores are each
endpoint's own).

Health. A refused connection (seen in a result, or found by a TCP probe when
an endpoint's requests keep retrying without finishing) ejects the endpoint
at once; a streak of ``EJECT_STREAK`` failures (transport errors, timeouts or
5xx after the endpoint's own retries) ejects it too. Ejecting cancels its jobs
and its single calls and moves every one of their unanswered items to the
other endpoints; an item that failed with such an error moves as well. An
ejected endpoint is probed (``GET /health``, any answer below 500) after 1 s,
then after doubling waits up to 30 s, and pulls work again once it answers, on
probation: one request at a time until one succeeds, and its first failure
ejects it again (a server whose /health says 200 while it answers 500 costs
one request per probe).
Every item ends in exactly one result or one exception: it fails only when
every healthy endpoint failed it, or none is left.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
import urllib.parse
import urllib.request
from typing import Any, AsyncIterator, Deque, Dict, Iterable, Iterator, List, Optional, Set

from . import _native
from ._native import BatchgateError, HTTPStatusError, Result, TimeoutError, TransportError
from .dispatcher import Dispatcher

__all__ = ["ReplicaDispatcher", "EJECT_STREAK"]

log = logging.getLogger("batchgate")

#: Consecutive failures (transport, timeout, 5xx after retries) that eject an endpoint.
EJECT_STREAK = 5
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 30.0
#: How often the health monitor looks at the engines (and wakes bulk calls).
TICK_S = 0.1
_CURLE_COULDNT_CONNECT = 7


def _fails_over(e: BaseException) -> bool:
    """Errors another replica may not have: the transport, the server's 5xx."""
    if isinstance(e, (TransportError, TimeoutError)):
        return True
    return isinstance(e, HTTPStatusError) and (getattr(e, "status", 0) or 0) >= 500


def _refused(e: BaseException) -> bool:
    return isinstance(e, TransportError) and getattr(e, "curl_code", 0) == _CURLE_COULDNT_CONNECT


def _check_prompt(x: Any, index: int) -> None:
    # The native job names its own (local) index in errors; check here so the
    # message names the input's.
    if isinstance(x, str):
        return
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"prompts[{index}] is an empty list")
        for k, p in enumerate(x):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{index}][{k}] must be str, not {type(p).__name__}")
        return
    raise TypeError(f"prompts[{index}] must be str or a list of str, not {type(x).__name__}")


class _Endpoint:
    """One replica: its Dispatcher and what the router knows about it."""

    def __init__(self, index: int, url: str, d: Dispatcher) -> None:
        self.index = index
        self.url = url  # the real one (probes); shown redacted
        self.d = d
        self.cap = max(1, d.max_concurrent)
        self.healthy = True
        self.streak = 0
        self.down_until = 0.0
        self.backoff = PROBE_FIRST_S
        self.probing = False
        self.probation = False  # probed back, not yet proven: one request at a time
        self.ejections = 0
        self.failed_over = 0  # items moved from here to another endpoint
        self.delivered = 0  # results and final errors handed to callers from here
        self.last_error: Optional[str] = None
        self.kv_frac = 0.0  # held KV blocks / limit, from the auto controller
        self.waiting = 0.0  # the server's own queue (vllm:num_requests_waiting)
        self.seen = (0, 0)  # (retries, completed) at the last monitor tick
        self.feeds: Set["_Feed"] = set()
        self.singles: Set["asyncio.Task[Any]"] = set()

    def load(self) -> float:
        if self.probation and self.d._core.live:
            return float("inf")
        return max(self.d._core.live / self.cap, self.kv_frac, self.waiting / 5.0)


class _Feed:
    """The source of one endpoint's native stream job: items from the shared
    input (or moved from a failed endpoint), pulled when that job has room.
    ``pending`` maps the job's local indices to [global index, prompt, tried]."""

    __slots__ = ("run", "ep", "pending", "pulled", "done", "job", "window", "__weakref__")

    def __init__(self, run: "_Run", ep: _Endpoint) -> None:
        self.run = run
        self.ep = ep
        self.pending: Dict[int, List[Any]] = {}
        self.pulled = 0
        self.done = False
        self.job: Any = None
        self.window = 0

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self) -> Any:
        run = self.run
        if not self.ep.healthy or (self.window == 1 and self.pulled and self.ep.probation):
            # Ejected; or on probation, whose one request is out (the job
            # refills before we see its answer).
            self.done = True
            raise StopIteration
        item = run.take_moved(self.ep.index)
        if item is None:
            if run.src_done:
                self.done = True
                raise StopIteration
            try:
                x = next(run.src)
            except StopIteration:
                run.src_done = True
                self.done = True
                raise
            gi = run.next_index
            run.next_index += 1
            if not run.chat:
                _check_prompt(x, gi)
            item = [gi, x, None, None]  # index, prompt, endpoints tried, last error
        self.pending[self.pulled] = item
        self.pulled += 1
        return item[1]


class _Run:
    """One bulk call spread over the endpoints."""

    def __init__(self, rs: "ReplicaDispatcher", chat: bool, src: Iterable[Any],
                 window: Optional[int], params: Dict[str, Any]) -> None:
        self.rs = rs
        self.chat = chat
        self.src: Iterator[Any] = iter(src)
        self.src_done = False
        self.next_index = 0
        self.window = window
        self.params = params
        self.feeds: List[_Feed] = []
        self.moved: Deque[List[Any]] = collections.deque()
        self.out: List[Any] = []

    def take_moved(self, ep_index: int) -> Optional[List[Any]]:
        q = self.moved
        for k, item in enumerate(q):
            if item[2] is None or ep_index not in item[2]:
                del q[k]
                return item
        return None

    def start(self, ep: _Endpoint) -> None:
        rs = self.rs
        m = rs._members[ep.index]
        d = ep.d
        # The cap plus a little queued, to send between two loop turns: what
        # one endpoint holds unsent is what a faster one cannot take at the end.
        cap = d.max_concurrent
        if d.admission is not None:
            # "auto": the count cap only bounds connections; size the window
            # on the KV cache instead (about what requests of 256 tokens fill).
            kv = int(d.admission["kv_blocks"]) * int(d.admission["block_size"])
            cap = min(cap, max(8, kv // 256))
        w = self.window or min(d.window, cap + max(8, cap // 2))
        if ep.probation:
            if any(not g.done for g in ep.feeds):
                return  # it already has its one probation request (here or in another call)
            w = 1  # one request until it answers; then a full window joins (rejoin)
        f = _Feed(self, ep)
        f.window = w
        f.job = d._core.submit(_native.JOB_STREAM, self.chat, f, m._template(self.params),
                               None, w, True, False)
        self.feeds.append(f)
        ep.feeds.add(f)

    def drain(self, f: _Feed) -> bool:
        """Settle what f's job delivered; False once the job is over."""
        chunk = f.job.take()
        if chunk is None:
            self.close_feed(f)
            return False
        done = []
        for li, r in chunk:
            if li < 0:  # the job itself failed (bad input, a failing iterator, closed)
                raise r
            done.append((f.pending.pop(li), r))
        # Popped first: a settle below may eject f's endpoint, which moves
        # only what is still pending.
        for item, r in done:
            self.settle(f.ep, item, r)
        return True

    def settle(self, ep: _Endpoint, item: List[Any], r: Any) -> None:
        rs = self.rs
        if isinstance(r, BaseException) and _fails_over(r):
            rs._failure(ep, r)
            tried = item[2]
            if tried is None:
                tried = item[2] = set()
            tried.add(ep.index)
            item[3] = r
            if any(e.healthy and e.index not in tried for e in rs._eps):
                ep.failed_over += 1
                self.moved.append(item)
                return
        elif not isinstance(r, BaseException):
            rs._success(ep)
            if ep.probation:
                ep.probation = False
                for run in list(rs._runs):
                    run.rejoin(ep)
        ep.delivered += 1
        self.out.append((item[0], r))

    def evict(self, f: _Feed) -> None:
        """f's endpoint was ejected: keep what it answered, move the rest."""
        if f not in self.feeds:
            return
        chunk = f.job.take()
        f.job.cancel()
        done = [(f.pending.pop(li), r) for li, r in chunk or () if li in f.pending]
        for li in sorted(f.pending):
            f.ep.failed_over += 1
            self.moved.append(f.pending[li])
        f.pending.clear()
        self.close_feed(f)
        for item, r in done:
            self.settle(f.ep, item, r)

    def close_feed(self, f: _Feed) -> None:
        if f in self.feeds:
            self.feeds.remove(f)
        f.ep.feeds.discard(f)

    def place_moved(self) -> None:
        """Every moved item needs an open job that may take it: start one on
        the least-loaded eligible endpoint, or fail the item if none is left."""
        if not self.moved:
            return
        open_eps = {f.ep.index for f in self.feeds if not f.done}
        keep: Deque[List[Any]] = collections.deque()
        starts: Set[int] = set()
        for item in self.moved:
            tried = item[2] or ()
            ok = [e for e in self.rs._eps if e.healthy and e.index not in tried]
            if not ok:
                self.out.append((item[0], item[3] or BatchgateError(
                    "no healthy endpoint left for this item")))
                continue
            keep.append(item)
            if not any(e.index in open_eps or e.index in starts for e in ok):
                starts.add(min(ok, key=_Endpoint.load).index)
        self.moved = keep
        for i in sorted(starts):
            self.start(self.rs._eps[i])

    def rejoin(self, ep: _Endpoint) -> None:
        """ep was probed back: let it pull again."""
        if not self.src_done and ep.healthy and \
                not any(f.ep is ep and f.window > 1 and not f.done for f in self.feeds):
            self.start(ep)


async def _tcp_alive(url: str, timeout: float = 2.0) -> bool:
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(u.hostname, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    return True


def _health_ok(url: str, headers: Dict[str, str], api_key: Optional[str],
               timeout: float = 3.0) -> bool:
    """GET {server}/health: any answer below 500 means it serves again."""
    import urllib.error
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    root = url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    req = urllib.request.Request(
        urllib.parse.urlunsplit(urllib.parse.urlsplit(root)._replace(
            netloc=host + (f":{u.port}" if u.port else ""))) + "/health", method="GET")
    for k, v in headers.items():
        req.add_header(k, v)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as f:
            return f.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:
        return False


class ReplicaDispatcher(Dispatcher):
    """What ``Dispatcher(base_url=[...])`` returns: the Dispatcher API over
    several endpoints (see the module doc). Caps are per endpoint."""

    _root: "ReplicaDispatcher"  # views made by with_options() share their root's state

    def __init__(self, base_url: Any = None, api_key: Optional[str] = None,  # noqa: no super
                 model: Optional[str] = None, **kwargs: Any) -> None:
        urls = list(base_url)
        if not urls:
            raise ValueError("base_url is an empty list")
        for k, u in enumerate(urls):
            if not isinstance(u, str):
                raise TypeError(f"base_url[{k}] must be a str, not {type(u).__name__}")
        norm = [u.rstrip("/") for u in urls]
        if len(set(norm)) != len(norm):
            raise ValueError("base_url lists the same endpoint twice")
        self._closed = False
        self._eps: List[_Endpoint] = []
        try:
            for k, u in enumerate(urls):
                self._eps.append(_Endpoint(k, u, Dispatcher(u, api_key, model, **kwargs)))
        except BaseException:
            for ep in self._eps:
                ep.d.close()
            raise
        first = self._eps[0].d
        self._members: List[Dispatcher] = [ep.d for ep in self._eps]
        self._root = self
        self._defaults: Dict[str, Any] = {}
        self.base_url = tuple(ep.d.base_url for ep in self._eps)  # type: ignore[assignment]
        self.model = first.model
        self.semaphore = kwargs.get("semaphore")  # shared by all endpoints if given
        self.max_concurrent = sum(ep.d.max_concurrent for ep in self._eps)
        self.max_inflight_tokens = first.max_inflight_tokens
        self.admission = None
        self.window = first.window
        self.exact_prompt_tokens = first.exact_prompt_tokens
        self._exact_warned = False
        self._rr = 0
        self._active = 0
        self._monitor: Optional["asyncio.Task[None]"] = None
        self._runs: Set[_Run] = set()
        self._tasks: Set["asyncio.Task[Any]"] = set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else \
            f"healthy={sum(e.healthy for e in self._eps)}/{len(self._eps)}"
        return (f"<batchgate.Dispatcher [{', '.join(self.base_url)}] model={self.model!r} "
                f"{state}>")

    def _forked(self) -> bool:
        return self._members[0]._forked()

    def _check(self) -> None:
        Dispatcher._check(self)

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._check()
        for m in self._members:
            m._bind()
        return asyncio.get_running_loop()

    # ---- health ------------------------------------------------------------
    def _success(self, ep: _Endpoint) -> None:
        ep.streak = 0
        ep.backoff = PROBE_FIRST_S

    def _failure(self, ep: _Endpoint, e: BaseException) -> None:
        ep.last_error = f"{type(e).__name__}: {e}"
        ep.streak += 1
        if _refused(e):
            self._eject(ep, "refused a connection")
        elif ep.streak >= EJECT_STREAK:
            self._eject(ep, f"{ep.streak} failures in a row (last: {type(e).__name__})")

    def _eject(self, ep: _Endpoint, why: str) -> None:
        if not ep.healthy:
            return
        ep.healthy = False
        ep.probation = False
        ep.ejections += 1
        ep.down_until = time.monotonic() + ep.backoff
        log.warning("replicas: %s ejected (%s); its work moves to the others; probed again "
                    "in %.1f s", ep.d.base_url, why, ep.backoff)
        ep.backoff = min(PROBE_MAX_S, ep.backoff * 2)
        for f in list(ep.feeds):
            f.run.evict(f)
        for t in list(ep.singles):
            t.cancel()

    def _readmit(self, ep: _Endpoint) -> None:
        # On probation (a circuit breaker's half-open state): /health can say
        # 200 while every request gets a 500, so one more failure ejects it
        # again; a success clears the streak.
        ep.healthy = True
        ep.probation = True
        ep.streak = EJECT_STREAK - 1
        log.warning("replicas: %s answers again; it takes work again", ep.d.base_url)
        for run in list(self._runs):
            run.rejoin(ep)

    async def _probe(self, ep: _Endpoint, back: bool) -> None:
        ep.probing = True
        try:
            if back:
                m = ep.d
                ok = await asyncio.get_running_loop().run_in_executor(
                    None, _health_ok, ep.url, m._headers, m._api_key)
                if self._closed:
                    return
                if ok:
                    self._readmit(ep)
                else:
                    ep.down_until = time.monotonic() + ep.backoff
                    ep.backoff = min(PROBE_MAX_S, ep.backoff * 2)
            elif not await _tcp_alive(ep.url) and not self._closed:
                ep.last_error = "connection refused (probe)"
                self._eject(ep, "refuses connections")
        finally:
            ep.probing = False

    def _tick(self) -> None:
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        for ep in self._eps:
            if ep.probing:
                continue
            if not ep.healthy:
                if now >= ep.down_until:
                    self._spawn(loop, self._probe(ep, True))
                continue
            s: Dict[str, Any] = ep.d._core.stats()
            a = s.get("admission")
            if a:
                lim = a.get("limit_blocks") or 0
                ep.kv_frac = (a.get("held_blocks", 0) / lim) if lim > 0 else 0.0
                ep.waiting = float(a.get("waiting") or 0)
            seen = (s["retries"], s["completed"])
            if seen[0] > ep.seen[0] and seen[1] == ep.seen[1] and s["live"] > 0:
                # Retrying without finishing anything: is it still there?
                self._spawn(loop, self._probe(ep, False))
            ep.seen = seen

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Any) -> "asyncio.Task[Any]":
        # The loop keeps only weak references to tasks: hold them until done
        # (and aclose() waits for them).
        t = loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _watch(self) -> None:
        try:
            while self._active > 0 and not self._closed:
                await asyncio.sleep(TICK_S)
                try:
                    self._tick()
                except Exception:  # a closing engine: the next call sees ClosedError
                    log.debug("replicas: health tick failed", exc_info=True)
        finally:
            if self._monitor is asyncio.current_task():
                self._monitor = None

    def _enter(self) -> None:
        root = self._root  # views share the root's monitor
        root._active += 1
        if root._monitor is None:
            root._tick()  # probe due endpoints now, before routing
            root._monitor = root._spawn(asyncio.get_running_loop(), root._watch())

    def _leave(self) -> None:
        root = self._root
        root._active -= 1
        if root._active == 0 and root._monitor is not None:
            root._monitor.cancel()  # idle: nothing to watch (the next call starts one)
            root._monitor = None

    def _pick(self, tried: Set[int]) -> Optional[_Endpoint]:
        eps = self._eps
        n = len(eps)
        self._rr = (self._rr + 1) % n
        order = [eps[(self._rr + k) % n] for k in range(n)]
        ok = [e for e in order if e.healthy and e.index not in tried]
        if ok:
            return min(ok, key=_Endpoint.load)
        if any(e.healthy for e in eps):
            return None
        # Nothing healthy: try the one due for a probe first rather than fail unsent.
        rest = [e for e in order if e.index not in tried]
        return min(rest, key=lambda e: e.down_until) if rest else None

    # ---- single requests ---------------------------------------------------
    async def _one(self, chat: bool, payload: Any, params: Dict[str, Any]) -> Result:
        loop = self._bind()
        self._enter()
        try:
            tried: Set[int] = set()
            last: Optional[BaseException] = None
            while True:
                ep = self._pick(tried)
                if ep is None:
                    assert last is not None
                    raise last
                task = loop.create_task(self._members[ep.index]._one(chat, payload, params))
                ep.singles.add(task)
                try:
                    await asyncio.wait((task,))
                except asyncio.CancelledError:
                    task.cancel()
                    raise
                finally:
                    ep.singles.discard(task)
                if task.cancelled():  # ejected while in flight: try another
                    ep.failed_over += 1
                    tried.add(ep.index)
                    last = last or TransportError(f"{ep.d.base_url} was ejected")
                    continue
                e = task.exception()
                if e is None:
                    self._success(ep)
                    ep.probation = False
                    ep.delivered += 1
                    return task.result()
                if not _fails_over(e):
                    ep.delivered += 1
                    raise e
                self._failure(ep, e)
                tried.add(ep.index)
                last = e
                if self._pick(tried) is None:
                    ep.delivered += 1
                    raise e
                ep.failed_over += 1
        finally:
            self._leave()

    # ---- bulk ---------------------------------------------------------------
    async def _chunks(self, chat: bool, src: Iterable[Any], return_exceptions: bool,
                      window: Optional[int], params: Dict[str, Any]
                      ) -> AsyncIterator[List[Any]]:
        loop = self._bind()
        await asyncio.gather(*(m._ensure_model(params) for m in self._members))
        if self.exact_prompt_tokens and not self._root._exact_warned:
            self._root._exact_warned = True
            log.warning("exact_prompt_tokens: bulk calls over several replicas charge "
                        "estimated prompt tokens (single calls use exact counts)")
        run = _Run(self, chat, src, window, params)
        self._enter()
        self._runs.add(run)
        try:
            eps = [e for e in self._eps if e.healthy] or list(self._eps)
            for ep in sorted(eps, key=_Endpoint.load):
                run.start(ep)
            while True:
                for f in list(run.feeds):
                    run.drain(f)
                run.place_moved()
                out, run.out = run.out, []
                if out:
                    if not return_exceptions:
                        for k, (_, r) in enumerate(out):
                            if isinstance(r, BaseException):
                                if k:
                                    yield out[:k]
                                raise r
                    yield out
                    continue
                if not run.feeds:
                    for item in run.moved:  # none could start (cannot happen; never lose one)
                        run.out.append((item[0], item[3] or BatchgateError(
                            "no endpoint left for this item")))
                    run.moved.clear()
                    if run.out:
                        continue
                    return
                futs = []
                for f in run.feeds:
                    fut = loop.create_future()
                    f.job.arm(fut)
                    futs.append(fut)
                await asyncio.wait(futs, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED)
                for fut in futs:
                    fut.cancel()
        finally:
            self._runs.discard(run)
            for f in list(run.feeds):
                f.job.cancel()
                run.close_feed(f)
            self._leave()

    async def _map(self, chat: bool, src: Iterable[Any], return_exceptions: bool,
                   window: Optional[int], params: Dict[str, Any]) -> List[Any]:
        out: List[Any] = []
        async for chunk in self._chunks(chat, src, return_exceptions, window, params):
            for i, r in chunk:
                if i >= len(out):
                    out.extend([None] * (i + 1 - len(out)))
                out[i] = r
        return out

    # ---- token counts: every replica serves the same model, ask the least loaded
    def _counter(self) -> Dispatcher:
        ep = self._pick(set())
        return self._members[ep.index if ep is not None else 0]

    async def count_tokens(self, texts: Iterable[str], *,
                           add_special_tokens: bool = True) -> List[int]:
        return await self._counter().count_tokens(texts, add_special_tokens=add_special_tokens)

    async def count_chat_tokens(self, conversations: Iterable[Any], *,
                                add_generation_prompt: bool = True) -> List[int]:
        return await self._counter().count_chat_tokens(
            conversations, add_generation_prompt=add_generation_prompt)

    @property
    def tokenize_url(self) -> str:
        return self._members[0].tokenize_url

    # ---- views, stats, lifecycle ---------------------------------------------
    def with_options(self, **options: Any) -> "Dispatcher":
        view = object.__new__(ReplicaDispatcher)
        view.__dict__.update(self.__dict__)
        view._members = [m.with_options(**options) for m in self._members]
        view.model = view._members[0].model
        view._root = self._root
        return view

    def stats(self) -> Dict[str, Any]:
        """Totals over the endpoints (submitted, completed, attempts, retries,
        live, in_flight, max_in_flight, undelivered), ``healthy`` and ``endpoints``: per endpoint its
        redacted url, healthy, in_flight, completed, failed_over, ejections,
        last_error and its engine's own stats (``admission`` with auto)."""
        root = self._root
        eps = []
        # max_in_flight: the sum of each endpoint's peak (an upper bound of
        # the total's peak).
        totals: Dict[str, Any] = dict.fromkeys(
            ("submitted", "completed", "attempts", "retries", "live", "in_flight",
             "max_in_flight", "undelivered"), 0)
        for ep in root._eps:
            s = ep.d.stats()
            for k in totals:
                totals[k] += s.get(k, 0)
            eps.append(dict(s, url=ep.d.base_url, healthy=ep.healthy, ejections=ep.ejections,
                            failed_over=ep.failed_over, delivered=ep.delivered,
                            max_concurrent=ep.d.max_concurrent, last_error=ep.last_error))
        totals["healthy"] = sum(e.healthy for e in root._eps)
        totals["endpoints"] = eps
        return totals

    def _stop_tasks(self) -> List["asyncio.Task[Any]"]:
        root = self._root
        ts = list(root._tasks)  # probes and the monitor
        root._monitor = None
        try:
            running: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for t in ts:
            lp = t.get_loop()
            if lp is running:
                t.cancel()
            elif not lp.is_closed():
                try:
                    lp.call_soon_threadsafe(t.cancel)
                except RuntimeError:  # closed meanwhile
                    pass
        return [t for t in ts if t.get_loop() is running]

    async def aclose(self, *, wait: bool = False) -> None:
        for ep in self._root._eps:
            await ep.d.aclose(wait=wait)
        self._root._closed = True
        self._closed = True
        mine = self._stop_tasks()
        if mine:  # let them finish here, not at the loop's end
            await asyncio.gather(*mine, return_exceptions=True)

    def close(self) -> None:
        root = self._root
        root._closed = self._closed = True
        for ep in root._eps:
            ep.d.close()
        self._stop_tasks()

    async def __aenter__(self) -> "ReplicaDispatcher":
        self._check()
        return self

    def __del__(self) -> None:
        pass  # each endpoint's Dispatcher closes itself

