"""Configuration with the same names, defaults and environment variables as the
original pure-Python pipeline's ``Config`` class, so existing code keeps working."""
from __future__ import annotations

import os
from typing import Optional, Sequence


def _env_int(name: str, default: int) -> int:
    raw = os.getenv(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


class Config:
    """Settings read from the environment at import time (as in the original)."""

    VLLM_MAX_TOKENS_PER_BATCH: int = _env_int("VLLM_MAX_TOKENS_PER_BATCH", 4000)
    VLLM_MIN_BATCH_SIZE: int = _env_int("VLLM_MIN_BATCH_SIZE", 10)
    VLLM_MAX_BATCH_SIZE: int = _env_int("VLLM_MAX_BATCH_SIZE", 100)
    VLLM_DEFAULT_BATCH_SIZE: int = _env_int("VLLM_DEFAULT_BATCH_SIZE", 50)
    VLLM_MAX_CONCURRENT_BATCHES: int = _env_int("VLLM_MAX_CONCURRENT_BATCHES", 20)
    MAX_RETRIES: int = _env_int("MAX_RETRIES", 3)

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
        from .sizing import _dynamic_batch_size

        return _dynamic_batch_size(cls, reviews, max_tokens_per_batch)
