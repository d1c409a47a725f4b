"""Batch sizing: the original average-based formula and a hard token budget."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

from . import _native
from .config import Config, _check_int, _dynamic_batch_size

_OVERSIZE_MODES = ("error", "alone")
_METHODS = ("script", "chars")


def _check_method(method: Any) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be str ('script' or 'chars'), not {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be 'script' or 'chars', not {method!r}")
    return method


def calculate_dynamic_batch_size(content_list: Sequence[str],
                                 max_tokens_per_batch: Optional[int] = None) -> int:
    """Drop-in for the original ``Config.calculate_dynamic_batch_size``."""
    return _dynamic_batch_size(Config, content_list, max_tokens_per_batch)


def estimate_tokens(text: str, method: str = "script") -> int:
    """Estimated tokens of one text.

    ``method="script"`` uses a per-script model calibrated against a Qwen
    tokenizer; ``method="chars"`` is the original chars/3.5 rule rounded up.
    """
    return _native.estimate_tokens(text, _check_method(method))


def estimate_many(texts: Sequence[str], method: str = "script") -> List[int]:
    """``estimate_tokens`` of each text, computed in one native pass."""
    return _native.estimate_many(texts, _check_method(method))


class Plan(List[List[str]]):
    """The batches (lists of the input texts), plus what the planner knows.

    - ``token_counts[b]``: estimated tokens of batch b, overhead included;
    - ``oversize``: indices of items that alone exceed the budget and were
      planned alone (only with ``oversize="alone"``);
    - ``indices[b]``: input indices of the items of batch b.
    """

    token_counts: List[int]
    oversize: List[int]
    budget: int

    def __init__(self, batches: List[List[str]], token_counts: List[int], oversize: List[int],
                 starts: List[int], order: Optional[List[int]], budget: int) -> None:
        super().__init__(batches)
        self.token_counts = token_counts
        self.oversize = oversize
        self.budget = budget
        self._starts = starts
        self._order = order

    @property
    def indices(self) -> List[List[int]]:
        s = self._starts
        if self._order is None:
            return [list(range(s[b], s[b + 1])) for b in range(len(s) - 1)]
        return [self._order[s[b]:s[b + 1]] for b in range(len(s) - 1)]

    def __repr__(self) -> str:
        return (f"Plan({len(self)} batches, max {max(self.token_counts, default=0)} of "
                f"{self.budget} tokens, {len(self.oversize)} oversize)")


def plan_batches(
    texts: Sequence[str],
    max_tokens_per_batch: Optional[int] = None,
    *,
    counts: Optional[Sequence[int]] = None,
    counter: Optional[Callable[[str], int]] = None,
    max_batch_size: Optional[int] = None,
    overhead_tokens: int = 0,
    oversize: str = "error",
    method: str = "script",
    pack: bool = False,
) -> Plan:
    """Split texts into batches whose estimated tokens never exceed the budget.

    Batches are contiguous and keep input order (fewest such batches), unless
    ``pack=True``, which may regroup items (first-fit decreasing) for fewer
    batches; items inside a batch are always in input order.

    Token counts come from ``counts`` (precomputed, one per text), else
    ``counter(text)`` (an exact tokenizer), else the native estimator
    (``method``). Every batch satisfies ``overhead_tokens + sum(tokens) <=
    max_tokens_per_batch`` and ``len(batch) <= max_batch_size``. An item that
    alone breaks the budget raises ValueError (``oversize="error"``) or gets a
    batch of its own and is listed in ``Plan.oversize`` (``oversize="alone"``).
    """
    if max_tokens_per_batch is None:
        max_tokens_per_batch = Config.VLLM_MAX_TOKENS_PER_BATCH
    _check_int("max_tokens_per_batch", max_tokens_per_batch, minimum=1)
    if max_batch_size is not None:
        _check_int("max_batch_size", max_batch_size, minimum=1)
    _check_int("overhead_tokens", overhead_tokens, minimum=0)
    if overhead_tokens >= max_tokens_per_batch:
        raise ValueError(
            f"overhead_tokens={overhead_tokens} leaves no room for items in "
            f"max_tokens_per_batch={max_tokens_per_batch}")
    if not isinstance(oversize, str) or oversize not in _OVERSIZE_MODES:
        raise ValueError(f"oversize must be 'error' or 'alone', not {oversize!r}")
    _check_method(method)
    if counts is not None and counter is not None:
        raise TypeError("pass counts or counter, not both")
    if counter is not None and not callable(counter):
        raise TypeError(f"counter must be callable, not {type(counter).__name__}")
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be a bool, not {type(pack).__name__}")
    batches, token_counts, oversized, starts, order = _native.plan(
        texts, max_tokens_per_batch, counts, counter, max_batch_size or 0,
        overhead_tokens, oversize == "alone", method, pack)
    return Plan(batches, token_counts, oversized, starts, order, max_tokens_per_batch)
