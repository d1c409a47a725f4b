"""Send batches through a Dispatcher, check and log each answer.

One stream per round on the dispatcher's native window (``as_completed``; no
Task or coroutine per batch). Retry policy, the same everywhere batchgate
retries on its own (``run``, ``analyze_restaurants``, ``process_batches``):

- transient HTTP failures (transport errors, 408/429/500/502/503/504) are
  retried by the dispatcher's engine, ``max_retries`` times with exponential
  backoff and Retry-After; a request that still fails ends its batch as
  failed: it is never sent again by the answer loop (no retries stacked on
  retries);
- an answer that is not a valid count is resent, as the original did, while
  the batch has made fewer than ``1 + max_retries`` requests; then the batch is
  failed. Failed batches are reported, never counted as zero.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

from .._native import BatchgateError, Result
from .._redact import redact
from ..config import Config
from ..dispatcher import Dispatcher, _messages_json
from .batches import Batch, priority_order
from .batchlog import BatchLog
from .prompt import ANSWER_MAX_TOKENS, AnswerError, parse_answer, render_prompt


@dataclass
class DispatchStats:
    sent: int = 0               # batches handed to the dispatcher
    ok: int = 0
    failed: int = 0
    not_sent: int = 0           # interrupted before going on the wire (again)
    unfinished: int = 0         # cancelled in flight by the interruption
    answer_retries: int = 0
    prompt_tokens_est: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    peak_in_flight: int = 0
    peak_in_flight_tokens: Optional[int] = None
    token_cap: Optional[int] = None
    wall: float = 0.0
    interrupted: bool = False
    priority_queue: bool = False
    unfinished_keys: List[str] = field(default_factory=list)


def make_dispatcher(base_url: str, *, api_key: Optional[str] = None, model: Optional[str] = None,
                    max_concurrent: int,
                    max_inflight_tokens: Optional[Union[int, Literal["auto"]]] = None,
                    max_retries: int, timeout: float = 600.0, backoff: float = 0.5) -> Dispatcher:
    return Dispatcher(base_url, api_key, model, max_concurrent=max_concurrent,
                      max_inflight_tokens=max_inflight_tokens, max_retries=max_retries,
                      timeout=timeout, backoff=backoff)


class _PeakSampler:
    """Peak estimated tokens reserved under the token cap, sampled every few ms
    from the dispatcher's token semaphore (the engine keeps the request peak
    itself). Reserved = on the wire plus waiting there for a request slot, so
    it bounds the tokens on the wire from above; None without a token cap."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.peak: Optional[int] = None
        self._task: Optional[asyncio.Task] = None

    def sample(self) -> None:
        cap = self.d.max_inflight_tokens
        free = self.d.stats().get("tokens_free", -1)
        if cap and free >= 0:
            v = int(cap - free)
            self.peak = v if self.peak is None else max(self.peak, v)

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.005)

    def start(self) -> None:
        if self.d.max_inflight_tokens:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


async def dispatch_batches(dispatcher: Dispatcher, batches: Sequence[Batch], template: str, *,
                           log: BatchLog, max_retries: int, max_tokens: int = ANSWER_MAX_TOKENS,
                           params: Optional[Dict[str, Any]] = None,
                           window: Optional[int] = None, chat: bool = False,
                           progress: Optional[Callable[[DispatchStats], None]] = None,
                           stop: Optional[asyncio.Event] = None,
                           priority: Optional[bool] = None) -> DispatchStats:
    """Send each batch (one prompt), parse and log its answer (policy above).

    ``chat`` sends the prompt as one user message to /v1/chat/completions.
    ``priority`` (default Config.VLLM_USE_PRIORITY_QUEUE): send in priority
    order (see ``priority_order``) with vLLM's ``priority`` field on each
    request. Setting ``stop`` cancels what is in flight; what finished is in
    the log, the rest is counted as unfinished or not sent, never as failed.
    """
    if priority is None:
        priority = Config.VLLM_USE_PRIORITY_QUEUE
    body: Dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0}
    body.update(params or {})
    st = DispatchStats(priority_queue=bool(priority))
    todo: List[Batch] = priority_order(batches) if priority else list(batches)
    used: Dict[str, int] = {}     # requests made per batch key
    sampler = _PeakSampler(dispatcher)
    t0 = time.monotonic()
    base_requests = int(dispatcher.stats().get("attempts", 0))
    max_requests = 1 + max(0, max_retries)
    retry: List[Batch] = []
    done_keys: set = set()

    def finish(b: Batch, r: Any) -> None:
        rec: Dict[str, Any] = {"key": b.key, "restaurant_id": b.restaurant, "batch": b.index,
                               "n_reviews": len(b.texts), "lines": [b.lines[0], b.lines[-1]],
                               "est_prompt_tokens": b.tokens}
        if priority:
            rec["priority"] = b.priority
        n = used.get(b.key, 0) + max(1, int(getattr(r, "attempts", 1) or 1))
        used[b.key] = n
        if isinstance(r, BaseException):
            rec.update(status="failed", error=redact(f"{type(r).__name__}: {r}"), attempts=n)
        else:
            usage = r.usage or {}
            st.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            st.completion_tokens += int(usage.get("completion_tokens") or 0)
            try:
                pos, neg = parse_answer(r.text, len(b.texts))
            except AnswerError as e:
                if n < max_requests:
                    st.answer_retries += 1
                    retry.append(b)
                    return
                rec.update(status="failed", error=f"unusable answer: {e}", attempts=n)
            else:
                rec.update(status="ok", positive_count=pos, negative_count=neg, attempts=n,
                           latency=round(r.latency, 4))
        done_keys.add(b.key)
        if rec["status"] == "ok":
            st.ok += 1
        else:
            st.failed += 1
        log.append(rec)
        if progress is not None:
            progress(st)

    def source(round_batches: List[Batch]) -> Any:
        for b in round_batches:
            if b.key not in used:
                st.sent += 1
                st.prompt_tokens_est += b.tokens
            prompt = render_prompt(template, b.texts)
            yield (_messages_json([{"role": "user", "content": prompt}], None) if chat
                   else prompt)

    async def stream_round(round_batches: List[Batch]) -> None:
        async for chunk in dispatcher._chunks(chat, source(round_batches), True, window, body):
            for i, r in chunk:
                finish(round_batches[i], r)

    async def priority_round(round_batches: List[Batch]) -> None:
        # vLLM's `priority` differs per request, and a request template is per
        # call: a few workers (not one per batch) send one request each.
        it = iter(round_batches)
        prompts = source(round_batches)

        async def worker() -> None:
            for b in it:
                prompt = next(prompts)
                r: Union[Result, BatchgateError]
                try:
                    if chat:
                        r = await dispatcher._one(True, prompt, dict(body, priority=b.priority))
                    else:
                        r = await dispatcher.generate(prompt, priority=b.priority, **body)
                except BatchgateError as e:
                    r = e
                finish(b, r)

        n = min(len(round_batches), window or 2 * dispatcher.max_concurrent)
        await asyncio.gather(*(worker() for _ in range(n)))

    sampler.start()
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        while todo and not st.interrupted:
            retry.clear()
            runner = asyncio.ensure_future((priority_round if priority else stream_round)(todo))
            waiters = [runner] + ([stopper] if stopper is not None else [])
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not runner.done():
                # On the wire right now: those are cancelled in flight; every
                # other unfinished batch was never sent (or not sent again).
                on_wire = int(dispatcher.stats().get("in_flight", 0))
                runner.cancel()
                try:
                    await runner
                except asyncio.CancelledError:
                    pass
                st.interrupted = True
                left = [b for b in todo if b.key not in done_keys]
                st.unfinished = min(on_wire, len(left))
                st.not_sent = len(left) - st.unfinished
                st.unfinished_keys = [b.key for b in left]
                break
            runner.result()  # a bug in finish() surfaces here
            todo = list(retry)
    finally:
        if stopper is not None:
            stopper.cancel()
        await sampler.stop()
    s = dispatcher.stats()
    st.requests = int(s.get("attempts", 0)) - base_requests
    st.peak_in_flight = int(s.get("max_in_flight", 0))
    st.peak_in_flight_tokens = sampler.peak
    st.token_cap = dispatcher.max_inflight_tokens
    st.wall = time.monotonic() - t0
    return st
