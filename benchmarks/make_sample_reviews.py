"""Synthesize restaurant reviews (mostly Korean, some English, digits, emoji).

The phrases and review shapes live in batchgate.corpus (written for batchgate;
no review corpus is copied); this script samples restaurants at random, as the
bundled sample file was made. The output is deterministic for a given seed.

    python benchmarks/make_sample_reviews.py            # writes python/batchgate/data/sample_reviews.jsonl
    python benchmarks/make_sample_reviews.py --stdout   # print instead

calibrate_estimator.py imports generate_reviews() (with another seed) for its
"mixed" group.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from batchgate.corpus import one_review


def generate_reviews(seed: int, n_restaurants: int, n_reviews: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n_reviews):
        rid = f"r{rng.randrange(n_restaurants) + 1:03d}"
        out.append({"restaurant_id": rid, "review_id": f"{rid}-{i + 1:05d}", "text": one_review(rng)})
    out.sort(key=lambda d: (d["restaurant_id"], d["review_id"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--restaurants", type=int, default=12)
    ap.add_argument("--reviews", type=int, default=300)
    ap.add_argument("--stdout", action="store_true")
    args = ap.parse_args()
    rows = generate_reviews(args.seed, args.restaurants, args.reviews)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.stdout:
        print(lines, end="")
        return
    path = Path(__file__).resolve().parent.parent / "python" / "batchgate" / "data" / "sample_reviews.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(lines, encoding="utf-8")
    print(f"wrote {len(rows)} reviews to {path}")


if __name__ == "__main__":
    main()
