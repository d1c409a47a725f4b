"""Per-restaurant results in the original pipeline's shape."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .batches import Batch, Groups
from .batchlog import BatchLog


def percent(part: int, total: int) -> Optional[int]:
    """The original's int percent: round(100 * part / total); None if nothing was scored."""
    return int(round(100 * part / total)) if total else None


def aggregate(groups: Groups, batches: Sequence[Batch], log: BatchLog, *,
              simulated: bool = False) -> List[Dict[str, Any]]:
    """One record per restaurant (input order) from the logged batches of this plan.

    The original's fields: restaurant_id (its type kept), positive_count,
    negative_count, total (= positive + negative), positive_ratio and
    negative_ratio (int percent of total). Added: reviews, batches,
    failed_batches, unscored_reviews (reviews of failed batches, never counted
    as zero), complete, and simulated (answers from the embedded simulated
    server, not a model) when so.
    """
    per: Dict[Any, Dict[str, Any]] = {}
    for rid, items in groups.items():
        per[rid] = {"restaurant_id": rid, "positive_count": 0, "negative_count": 0,
                    "reviews": len(items), "batches": 0, "failed_batches": 0,
                    "unscored_reviews": 0}
    for b in batches:
        r = per[b.restaurant]
        r["batches"] += 1
        rec = log.records.get(b.key)
        if rec is not None and rec.get("status") == "ok":
            r["positive_count"] += rec["positive_count"]
            r["negative_count"] += rec["negative_count"]
        else:
            r["failed_batches"] += 1
            r["unscored_reviews"] += len(b.texts)
    out = []
    for r in per.values():
        total = r["positive_count"] + r["negative_count"]
        r["total"] = total
        r["positive_ratio"] = percent(r["positive_count"], total)
        r["negative_ratio"] = percent(r["negative_count"], total)
        r["complete"] = r["failed_batches"] == 0
        if simulated:
            r["simulated"] = True
        out.append(r)
    return out
