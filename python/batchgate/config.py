"""Configuration with the same names, defaults and environment variables as the
original pure-Python pipeline's ``Config`` class, so existing code keeps working.

This module depends on nothing but the native extension (sizing.py imports it,
not the other way round)."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Type

from . import _native


def _env_int(name: str, default: int) -> int:
    raw = os.getenv(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_bool(name: str, default: bool) -> bool:
    raw = os.getenv(name)
    if raw is None or raw.strip() == "":
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"environment variable {name} must be true or false, got {raw!r}")


def _env_str(name: str) -> Optional[str]:
    raw = os.getenv(name)
    return raw.strip() if raw and raw.strip() else None


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class Config:
    """Settings read from the environment at import time (as in the original).

    - ``LLM_MODEL``: the model (or LoRA adapter) name sent with every request;
      None lets the server's first model answer.
    - ``VLLM_USE_PRIORITY_QUEUE``: send batches in priority order and give
      each request vLLM's ``priority`` field (lower runs first; the server must
      run with ``--scheduling-policy priority``).
    - ``VLLM_PRIORITY_BY_PREFILL_COST``: with the priority queue, the priority
      is the batch's estimated prompt tokens (shortest prefill first); without
      it, the batch's position.
    """

    VLLM_MAX_TOKENS_PER_BATCH: int = _env_int("VLLM_MAX_TOKENS_PER_BATCH", 4000)
    VLLM_MIN_BATCH_SIZE: int = _env_int("VLLM_MIN_BATCH_SIZE", 10)
    VLLM_MAX_BATCH_SIZE: int = _env_int("VLLM_MAX_BATCH_SIZE", 100)
    VLLM_DEFAULT_BATCH_SIZE: int = _env_int("VLLM_DEFAULT_BATCH_SIZE", 50)
    VLLM_MAX_CONCURRENT_BATCHES: int = _env_int("VLLM_MAX_CONCURRENT_BATCHES", 20)
    MAX_RETRIES: int = _env_int("MAX_RETRIES", 3)
    LLM_MODEL: Optional[str] = _env_str("LLM_MODEL")
    VLLM_USE_PRIORITY_QUEUE: bool = _env_bool("VLLM_USE_PRIORITY_QUEUE", False)
    VLLM_PRIORITY_BY_PREFILL_COST: bool = _env_bool("VLLM_PRIORITY_BY_PREFILL_COST", True)

    @classmethod
    def calculate_dynamic_batch_size(
        cls, reviews: Sequence[str], max_tokens_per_batch: Optional[int] = None
    ) -> int:
        """Batch size from the average length of the first 50 reviews.

        Same numbers as the original: avg_tokens = max(1, int(avg_chars / 3.5)),
        size = max(1, int(budget / avg_tokens)), clamped to
        [VLLM_MIN_BATCH_SIZE, VLLM_MAX_BATCH_SIZE]. An average, so single batches
        can still overflow the budget: use batchgate.plan_batches for a guarantee.
        """
        return _dynamic_batch_size(cls, reviews, max_tokens_per_batch)


def _dynamic_batch_size(config: Type[Config], content_list: Sequence[str],
                        max_tokens_per_batch: Optional[int]) -> int:
    if max_tokens_per_batch is None:
        max_tokens_per_batch = config.VLLM_MAX_TOKENS_PER_BATCH
    _check_int("max_tokens_per_batch", max_tokens_per_batch, minimum=1)
    return _native.dynamic_batch_size(
        content_list,
        max_tokens_per_batch,
        config.VLLM_MIN_BATCH_SIZE,
        config.VLLM_MAX_BATCH_SIZE,
        config.VLLM_DEFAULT_BATCH_SIZE,
    )
