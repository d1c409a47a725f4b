"""The original pipeline's own pure-Python pieces, rebuilt for tests: a
``Config`` class read from the environment, ``calculate_dynamic_batch_size``
and ``generate_with_vllm`` (one POST to vLLM's /v1/completions per call, over
a plain asyncio connection). ``original_pipeline.py`` imports these; swapping
batchgate in changes only those imports."""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit


def _env_bool(name: str, default: str) -> bool:
    return os.getenv(name, default).strip().lower() in ("1", "true", "yes", "on")


class Config:
    LLM_MODEL: Optional[str] = os.getenv("LLM_MODEL") or None
    VLLM_BASE_URL: str = os.getenv("VLLM_BASE_URL", "http://127.0.0.1:8000/v1")
    VLLM_MAX_TOKENS_PER_BATCH = int(os.getenv("VLLM_MAX_TOKENS_PER_BATCH", "4000"))
    VLLM_MIN_BATCH_SIZE = int(os.getenv("VLLM_MIN_BATCH_SIZE", "10"))
    VLLM_MAX_BATCH_SIZE = int(os.getenv("VLLM_MAX_BATCH_SIZE", "100"))
    VLLM_DEFAULT_BATCH_SIZE = int(os.getenv("VLLM_DEFAULT_BATCH_SIZE", "50"))
    VLLM_MAX_CONCURRENT_BATCHES = int(os.getenv("VLLM_MAX_CONCURRENT_BATCHES", "20"))
    MAX_RETRIES = int(os.getenv("MAX_RETRIES", "3"))
    VLLM_USE_PRIORITY_QUEUE = _env_bool("VLLM_USE_PRIORITY_QUEUE", "false")
    VLLM_PRIORITY_BY_PREFILL_COST = _env_bool("VLLM_PRIORITY_BY_PREFILL_COST", "true")

    @classmethod
    def calculate_dynamic_batch_size(cls, content_list: Sequence[str],
                                     max_tokens_per_batch: Optional[int] = None) -> int:
        if max_tokens_per_batch is None:
            max_tokens_per_batch = cls.VLLM_MAX_TOKENS_PER_BATCH
        if not content_list:
            return cls.VLLM_DEFAULT_BATCH_SIZE
        sample = content_list[:50]
        avg_chars = sum(len(c) for c in sample) / len(sample)
        avg_tokens = max(1, int(avg_chars / 3.5))
        size = max(1, int(max_tokens_per_batch / avg_tokens))
        return max(cls.VLLM_MIN_BATCH_SIZE, min(cls.VLLM_MAX_BATCH_SIZE, size))


def calculate_dynamic_batch_size(content_list: Sequence[str],
                                 max_tokens_per_batch: Optional[int] = None) -> int:
    return Config.calculate_dynamic_batch_size(content_list, max_tokens_per_batch)


async def _post(url: str, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        data = json.dumps(body).encode()
        writer.write((f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                      "Connection: close\r\n\r\n").encode() + data)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload or b"{}")


async def generate_with_vllm(prompts: List[str], temperature: float = 0.1,
                             max_tokens: int = 100, **extra: Any
                             ) -> Tuple[List[str], Dict[str, Any]]:
    """(one text per prompt, metrics); raises RuntimeError on a non-200."""
    t0 = time.perf_counter()
    body: Dict[str, Any] = {"prompt": list(prompts), "temperature": temperature,
                            "max_tokens": max_tokens, **extra}
    if Config.LLM_MODEL:
        body["model"] = Config.LLM_MODEL
    status, obj = await _post(Config.VLLM_BASE_URL.rstrip("/") + "/completions", body)
    if status != 200:
        raise RuntimeError(f"vLLM answered HTTP {status}: {obj}")
    texts = [""] * len(prompts)
    for c in obj["choices"]:
        texts[c["index"]] = c["text"]
    latency = time.perf_counter() - t0
    usage = obj.get("usage") or {}
    completion = int(usage.get("completion_tokens") or 0)
    return texts, {"latency": latency, "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                   "completion_tokens": completion,
                   "tokens_per_second": completion / latency if latency else 0.0,
                   "attempts": 1}
