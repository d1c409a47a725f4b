"""A user's script, type-checked by test_typing.py under mypy --strict and pyright strict.

Never run: it only has to type-check. assert_type pins what the stubs promise.
"""
from __future__ import annotations

import asyncio
from typing import List, Literal, Optional, Tuple, Union

from typing_extensions import assert_type

import batchgate
from batchgate import (BatchSummary, Config, Dispatcher, HTTPStatusError, Plan, Result, Semaphore,
                       calculate_dynamic_batch_size, estimate_tokens, plan_batches)


async def pipeline(reviews: List[str]) -> None:
    size = calculate_dynamic_batch_size(reviews, max_tokens_per_batch=4000)
    assert_type(size, int)
    assert_type(Config.calculate_dynamic_batch_size(reviews), int)
    assert_type(estimate_tokens(reviews[0]), int)
    plan = plan_batches(reviews, 4000, overhead_tokens=200, max_batch_size=100)
    assert_type(plan, Plan)
    for batch, tokens in zip(plan, plan.token_counts):
        assert_type(tokens, int)
        assert tokens <= 4000 and batch

    sem = Semaphore(20)
    async with sem:
        pass
    assert_type(await sem.acquire(), Literal[True])
    sem.release()
    assert_type(sem.acquire_blocking(1, timeout=0.5), bool)

    async with Dispatcher("http://127.0.0.1:8000/v1", model="m", max_concurrent=20) as d:
        one = await d.generate("hello", max_tokens=8, temperature=0)
        assert_type(one, Result)
        assert_type(one.text, str)
        finish: Optional[str] = one.finish_reason
        print(finish, one.usage, one.latency, one.attempts, one.id, one.model)

        results = await d.map(reviews, max_tokens=8)
        assert_type(results, List[Result])
        texts = [r.text for r in results]

        mixed = await d.map(reviews, return_exceptions=True)
        assert_type(mixed, List[Union[Result, BaseException]])
        for r in mixed:
            if isinstance(r, HTTPStatusError):
                print(r.status, r.message, r.attempts)
            elif isinstance(r, Result):
                texts.append(r.text)

        chats = await d.chat_map([[{"role": "user", "content": t}] for t in reviews])
        assert_type(chats, List[Result])

        async for i, res in d.as_completed(reviews, max_tokens=8):
            assert_type(i, int)
            assert_type(res, Result)
        async for pair in d.as_completed(reviews, return_exceptions=True):
            assert_type(pair, Tuple[int, Union[Result, BaseException]])

    # The closed-loop admission mode is part of the signature; other strings are not.
    async with Dispatcher("http://127.0.0.1:8000/v1", max_inflight_tokens="auto") as auto:
        cap: Optional[int] = auto.max_inflight_tokens
        print(cap, await auto.generate("hello"))
    Dispatcher("http://127.0.0.1:8000/v1", max_inflight_tokens=8000).close()
    Dispatcher("http://127.0.0.1:8000/v1",
               max_inflight_tokens="lots").close()  # type: ignore[arg-type]

    summary = await batchgate.run_batch_file("in.jsonl", "out.jsonl",
                                             base_url="http://127.0.0.1:8000/v1")
    assert_type(summary, BatchSummary)
    done: bool = summary.complete
    print(done, summary.written, texts)


def main() -> None:
    asyncio.run(pipeline(["좋아요", "별로예요"]))
    with batchgate.SyncDispatcher("http://127.0.0.1:8000/v1", model="m") as sd:
        r = sd.generate("hello", max_tokens=8, timeout=5)
        assert_type(r, Result)
        for i, res in sd.as_completed(["a", "b"], max_tokens=8):
            print(i, res)
    s = batchgate.run_batch_file_sync("in.jsonl", "out.jsonl", max_concurrent=4)
    assert_type(s, BatchSummary)
