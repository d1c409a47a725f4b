"""Batches of one restaurant's reviews, their stable keys and their send order."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from ..config import Config
from ..sizing import calculate_dynamic_batch_size, estimate_many, plan_batches
from .prompt import PER_REVIEW_TOKENS, one_line, template_overhead

Groups = Dict[Hashable, List[Tuple[str, int]]]  # restaurant id -> [(text, line), ...]


@dataclass
class Batch:
    restaurant: Any            # the id as given (16 stays an int)
    index: int                 # position within its restaurant
    texts: List[str]
    lines: List[int]           # input line numbers (or item positions) of the reviews
    tokens: int                # estimated prompt tokens (template included)
    key: str = ""
    priority: int = 0          # vLLM's `priority` (lower first) when a priority queue is used

    def __post_init__(self) -> None:
        # Identifies the batch across runs (resume): restaurant, index, texts.
        h = hashlib.sha256("\x1e".join(self.texts).encode("utf-8")).hexdigest()[:16]
        self.key = f"{self.restaurant}#{self.index}#{h}"


@dataclass
class BatchPlan:
    batches: List[Batch]
    oversize: List[Tuple[Any, int]] = field(default_factory=list)  # (restaurant, line)


def build_batches(groups: Groups, template: str, *, sizing: str = "plan",
                  max_tokens_per_batch: Optional[int] = None,
                  max_batch_size: Optional[int] = None, fixed_size: int = 50) -> BatchPlan:
    """Batches for ``groups`` ({restaurant: [(text, line), ...]}).

    ``sizing``: "plan" (batchgate's token-budget planner), "dynamic" (the
    original's average-based size per restaurant) or "fixed" (``fixed_size``).
    """
    if sizing not in ("plan", "dynamic", "fixed"):
        raise ValueError(f"sizing must be 'plan', 'dynamic' or 'fixed', not {sizing!r}")
    budget = max_tokens_per_batch or Config.VLLM_MAX_TOKENS_PER_BATCH
    max_size = max_batch_size or Config.VLLM_MAX_BATCH_SIZE
    overhead = template_overhead(template, max_size)
    out = BatchPlan([])
    for rid, items in groups.items():
        texts = [t for t, _ in items]
        lines = [ln for _, ln in items]
        counts = [c + PER_REVIEW_TOKENS for c in estimate_many([one_line(t) for t in texts])]
        if sizing == "plan":
            plan = plan_batches(texts, budget, counts=counts, overhead_tokens=overhead,
                                max_batch_size=max_size, oversize="alone")
            spans = [list(ix) for ix in plan.indices]
            out.oversize.extend((rid, lines[i]) for i in plan.oversize)
        else:
            size = fixed_size if sizing == "fixed" else calculate_dynamic_batch_size(texts, budget)
            spans = [list(range(i, min(i + size, len(texts)))) for i in range(0, len(texts), size)]
        for b, ix in enumerate(spans):
            out.batches.append(Batch(rid, b, [texts[i] for i in ix], [lines[i] for i in ix],
                                     overhead + sum(counts[i] for i in ix)))
    return out


def priority_order(batches: Sequence[Batch], *, by_prefill_cost: Optional[bool] = None
                   ) -> List[Batch]:
    """The original's priority queue: batches sorted by priority, lower first.

    With ``by_prefill_cost`` (default Config.VLLM_PRIORITY_BY_PREFILL_COST) the
    priority is the estimated prompt tokens (shortest prefill first, ties in
    input order); else the input position. Sets each batch's ``priority``.
    """
    if by_prefill_cost is None:
        by_prefill_cost = Config.VLLM_PRIORITY_BY_PREFILL_COST
    for pos, b in enumerate(batches):
        b.priority = b.tokens if by_prefill_cost else pos
    return sorted(batches, key=lambda b: b.priority)  # stable
