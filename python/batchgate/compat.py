"""Drop-ins for code shaped like the original pipeline.

- ``vllm_generate(prompt_or_prompts)``: one text per prompt;
- ``generate_with_vllm(prompts, temperature, max_tokens) -> (responses,
  metrics)``: the original's ``_generate_with_vllm``;
- ``process_batches(batches, build_prompt, parse)``: every batch through the
  dispatcher, bad answers resent, failures marked in what is returned.

Retry policy (the same as ``batchgate run``): transient HTTP failures are
retried by the dispatcher's engine (``max_retries``, backoff, Retry-After) and
a request that still fails is final; an answer that ``parse`` rejects is
resent while the batch has made fewer than ``1 + max_retries`` requests.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ._checks import str_list
from ._native import BatchgateError
from .config import Config
from .dispatcher import Dispatcher, default_dispatcher

__all__ = ["vllm_generate", "generate_with_vllm", "process_batches", "BatchFailed",
           "BatchResults"]

log = logging.getLogger("batchgate")


async def vllm_generate(batch: Any, *, dispatcher: Optional[Dispatcher] = None,
                        build_prompt: Optional[Callable[[Any], str]] = None,
                        **params: Any) -> Any:
    """Completion text per prompt: a str gives a str, a list of prompts a list
    of texts (one per prompt, in order, sent as one request). With
    ``build_prompt`` the batch is first turned into one prompt (-> str)."""
    d = dispatcher or default_dispatcher()
    if build_prompt is not None:
        batch = build_prompt(batch)
        if not isinstance(batch, str):
            raise TypeError(f"build_prompt returned {type(batch).__name__}, not str")
    if isinstance(batch, str):
        return (await d.generate(batch, **params)).text
    prompts = _prompt_list(batch)
    if not prompts:
        return []
    return list((await d.generate(prompts, **params)).texts)


def _prompt_list(prompts: Any) -> List[str]:
    if isinstance(prompts, str):
        return [prompts]
    return str_list(prompts, "prompts", "a str or a list of str")


async def generate_with_vllm(prompts: Any, temperature: float = 0.1, max_tokens: int = 100,
                             *, dispatcher: Optional[Dispatcher] = None,
                             **params: Any) -> Tuple[List[str], Dict[str, Any]]:
    """The original's ``_generate_with_vllm(prompts, temperature, max_tokens)``.

    Returns ``(responses, metrics)``: one text per prompt, and ``{"latency"
    (s, wall), "prompt_tokens", "completion_tokens", "total_tokens",
    "tokens_per_second" (completion tokens / latency), "attempts" (HTTP
    requests made), "num_prompts"}``. The prompts go out as one request; a
    failure raises the dispatcher's exception (HTTPStatusError, ...)."""
    d = dispatcher or default_dispatcher()
    items = _prompt_list(prompts)
    t0 = time.perf_counter()
    if not items:
        return [], {"latency": 0.0, "prompt_tokens": 0, "completion_tokens": 0,
                    "total_tokens": 0, "tokens_per_second": 0.0, "attempts": 0,
                    "num_prompts": 0}
    r = await d.generate(items, temperature=temperature, max_tokens=max_tokens, **params)
    latency = time.perf_counter() - t0
    usage = r.usage or {}
    completion = int(usage.get("completion_tokens") or 0)
    prompt = int(usage.get("prompt_tokens") or 0)
    metrics = {"latency": latency, "prompt_tokens": prompt, "completion_tokens": completion,
               "total_tokens": int(usage.get("total_tokens") or prompt + completion),
               "tokens_per_second": completion / latency if latency > 0 else 0.0,
               "attempts": int(r.attempts), "num_prompts": len(items)}
    return list(r.texts), metrics


class BatchFailed(BatchgateError):
    """A batch of process_batches that did not give a usable answer: ``index``,
    ``attempts`` (requests made), ``cause`` (the last error)."""

    def __init__(self, index: int, attempts: int, cause: BaseException) -> None:
        super().__init__(f"batch {index} failed after {attempts} request(s): "
                         f"{type(cause).__name__}: {cause}")
        self.index = index
        self.attempts = attempts
        self.cause = cause


class BatchResults(list):
    """process_batches' results in batch order; a failed batch's slot holds a
    BatchFailed. ``failed``: their indices; ``ok``: no batch failed."""

    failed: List[int]

    def __init__(self, items: Iterable[Any], failed: List[int]) -> None:
        super().__init__(items)
        self.failed = failed

    @property
    def ok(self) -> bool:
        return not self.failed

    def __repr__(self) -> str:
        return f"BatchResults({len(self)} batches, {len(self.failed)} failed)"


async def process_batches(batches: Iterable[Any], build_prompt: Callable[[Any], str],
                          parse: Optional[Callable[[str], Any]] = None, *,
                          dispatcher: Optional[Dispatcher] = None,
                          max_retries: Optional[int] = None,
                          priority: Optional[bool] = None, progress: Any = None,
                          **params: Any) -> BatchResults:
    """Run every batch through the dispatcher (capped like the original's
    ``async with semaphore``); results in batch order.

    ``parse(text)`` turns an answer into the batch's value; when it raises,
    the batch is resent (retry policy in the module doc). A batch that still
    fails holds a ``BatchFailed`` in its slot, is listed in
    ``results.failed`` and logged: never a silent gap in the counts.
    ``priority`` (default Config.VLLM_USE_PRIORITY_QUEUE): send shortest
    estimated prompt first, with vLLM's ``priority`` field. ``progress``: a
    callable(done, total), a tqdm-style bar or True, advanced per settled batch."""
    from . import _progress
    from .sizing import estimate_many
    d = dispatcher or default_dispatcher()
    retries = Config.MAX_RETRIES if max_retries is None else max_retries
    if priority is None:
        priority = Config.VLLM_USE_PRIORITY_QUEUE
    batches = list(batches)
    out: List[Any] = [None] * len(batches)
    failed: List[int] = []
    prompts: Dict[int, str] = {}
    for i, b in enumerate(batches):
        try:
            p = build_prompt(b)
            if not isinstance(p, str):
                raise TypeError(f"build_prompt returned {type(p).__name__}, not str")
        except Exception as e:  # isolated per batch
            out[i] = BatchFailed(i, 0, e)
            failed.append(i)
            continue
        prompts[i] = p
    order = list(prompts)
    cost: Dict[int, int] = {}
    if priority and order:
        cost = dict(zip(order, estimate_many([prompts[i] for i in order])))
        order.sort(key=lambda i: cost[i])
    used: Dict[int, int] = {}
    bar = _progress.Progress(progress, len(batches), "batches") if progress else None
    if bar is not None and failed:
        bar.advance(len(failed))
    while order:
        again: List[int] = []

        def settle(i: int, r: Any) -> None:
            n = used[i] = used.get(i, 0) + max(1, int(getattr(r, "attempts", 1) or 1))
            if isinstance(r, BaseException):
                out[i] = BatchFailed(i, n, r)
                failed.append(i)
            elif parse is None:
                out[i] = r.text
            else:
                try:
                    out[i] = parse(r.text)
                except Exception as e:
                    if n < 1 + retries:
                        again.append(i)
                        return
                    out[i] = BatchFailed(i, n, e)
                    failed.append(i)
            if bar is not None:  # the batch is settled for good
                bar.advance(1)

        if priority:
            # vLLM's `priority` differs per request and a request template is
            # per call: a few workers (not a task per batch) send one each.
            got: Dict[int, Any] = {}
            it = iter(order)

            async def worker() -> None:
                for i in it:
                    try:
                        got[i] = await d.generate(prompts[i], priority=cost[i], **params)
                    except BatchgateError as e:
                        got[i] = e

            await asyncio.gather(*(worker() for _ in range(min(2 * d.max_concurrent,
                                                               len(order)))))
            for i in order:
                settle(i, got[i])
        else:
            async for k, r in d.as_completed([prompts[i] for i in order],
                                             return_exceptions=True, **params):
                settle(order[k], r)
        order = again
    if bar is not None:
        bar.close()
    failed.sort()
    for i in failed:
        log.warning("%s", out[i])
    return BatchResults(out, failed)

