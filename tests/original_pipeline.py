"""A faithful copy of the original pipeline's shape, for drop-in tests.

The original was pure Python: a ``Config`` class from env vars, an
``LLMUtils`` whose ``analyze_multiple_restaurants_vllm(restaurants_data)``
slices each restaurant's ``reviews[].content`` into fixed batches of
``Config.calculate_dynamic_batch_size`` reviews, caps them with a semaphore of
``Config.VLLM_MAX_CONCURRENT_BATCHES`` (``async with`` around each batch),
sends each with ``_generate_with_vllm([prompt], temperature=0.1,
max_tokens=100) -> (responses, metrics)``, retries an unusable answer up to
``Config.MAX_RETRIES`` times, runs everything with ``asyncio.gather`` and
optionally orders batches shortest-estimated-prefill first with vLLM's
``priority`` field.

Tests load this file twice: as is, and with only the IMPORTS block replaced
by ``BATCHGATE_IMPORTS`` (see ``load``).
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Dict, List

# ---- IMPORTS (the only lines a batchgate user changes) ----
from asyncio import Semaphore
from original_backend import Config, generate_with_vllm
# ---- end IMPORTS ----

BATCHGATE_IMPORTS = """\
from batchgate import Semaphore
from batchgate import Config, generate_with_vllm
"""

PROMPT = """다음은 한 음식점에 대한 고객 리뷰 {count}개입니다.
각 리뷰가 긍정적인지 부정적인지 판단하고, 긍정 리뷰와 부정 리뷰의 개수를 세어 주세요.

리뷰 목록:
{reviews}

다른 설명 없이 아래 JSON 형식으로만 답하세요.
{{"positive_count": 긍정 리뷰 수, "negative_count": 부정 리뷰 수}}
"""


class LLMUtils:
    def __init__(self) -> None:
        self.semaphore = Semaphore(Config.VLLM_MAX_CONCURRENT_BATCHES)
        self.requests_sent: List[Dict[str, Any]] = []  # what this copy asked for, in order

    async def _generate_with_vllm(self, prompts: List[str], temperature: float = 0.1,
                                  max_tokens: int = 100, **extra: Any):
        return await generate_with_vllm(prompts, temperature, max_tokens, **extra)

    @staticmethod
    def _build_prompt(reviews: List[str]) -> str:
        body = "\n".join(f"{i}. {' '.join(r.split())}" for i, r in enumerate(reviews, 1))
        return PROMPT.format(count=len(reviews), reviews=body)

    @staticmethod
    def _parse(text: str, n: int) -> Dict[str, int]:
        m = re.search(r"\{.*\}", text, re.S)
        obj = json.loads(m.group(0)) if m else None
        pos, neg = int(obj["positive_count"]), int(obj["negative_count"])
        if pos + neg != n:
            raise ValueError(f"{pos} + {neg} != {n}")
        return {"positive_count": pos, "negative_count": neg}

    async def _process_batch(self, restaurant_id: Any, reviews: List[str],
                             priority: int = 0) -> Dict[str, Any]:
        async with self.semaphore:
            prompt = self._build_prompt(reviews)
            extra = {"priority": priority} if Config.VLLM_USE_PRIORITY_QUEUE else {}
            for _attempt in range(Config.MAX_RETRIES):
                self.requests_sent.append({"restaurant_id": restaurant_id, "prompt": prompt,
                                           **extra})
                try:
                    responses, _metrics = await self._generate_with_vllm(
                        [prompt], temperature=0.1, max_tokens=100, **extra)
                    return {"restaurant_id": restaurant_id,
                            **self._parse(responses[0], len(reviews))}
                except Exception:
                    continue
            return {"restaurant_id": restaurant_id, "failed": True, "n": len(reviews)}

    async def analyze_multiple_restaurants_vllm(self, restaurants_data: List[Dict[str, Any]]
                                                ) -> List[Dict[str, Any]]:
        jobs = []
        for r in restaurants_data:
            contents = [rv["content"] for rv in r["reviews"]]
            size = Config.calculate_dynamic_batch_size(contents)
            for i in range(0, len(contents), size):
                batch = contents[i:i + size]
                cost = int(sum(len(c) for c in batch) / 3.5)
                jobs.append((cost, len(jobs), r["restaurant_id"], batch))
        if Config.VLLM_USE_PRIORITY_QUEUE:
            if Config.VLLM_PRIORITY_BY_PREFILL_COST:
                jobs.sort(key=lambda j: (j[0], j[1]))
            jobs = [(c if Config.VLLM_PRIORITY_BY_PREFILL_COST else k, k, rid, b)
                    for k, (c, _, rid, b) in enumerate(jobs)]
        results = await asyncio.gather(*(self._process_batch(rid, b, prio)
                                         for prio, _, rid, b in jobs))
        per: Dict[Any, Dict[str, Any]] = {}
        for r in restaurants_data:
            per[r["restaurant_id"]] = {"restaurant_id": r["restaurant_id"],
                                       "positive_count": 0, "negative_count": 0}
        for res in results:
            if res.get("failed"):
                continue
            p = per[res["restaurant_id"]]
            p["positive_count"] += res["positive_count"]
            p["negative_count"] += res["negative_count"]
        out = []
        for p in per.values():
            total = p["positive_count"] + p["negative_count"]
            p["total"] = total
            p["positive_ratio"] = round(100 * p["positive_count"] / total) if total else 0
            p["negative_ratio"] = round(100 * p["negative_count"] / total) if total else 0
            out.append(p)
        return out


def load(swap: bool, name: str) -> Any:
    """This module as the original (``swap=False``) or with only the IMPORTS
    block replaced by batchgate's (``swap=True``)."""
    import importlib.util
    import sys
    import types
    path = __file__
    with open(path, encoding="utf-8") as f:
        src = f.read()
    if swap:
        start = src.index("# ---- IMPORTS")
        start = src.index("\n", start) + 1
        end = src.index("# ---- end IMPORTS")
        src = src[:start] + BATCHGATE_IMPORTS + src[end:]
    mod = types.ModuleType(name)
    mod.__file__ = path
    sys.modules[name] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    del importlib
    return mod
