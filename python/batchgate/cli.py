"""Command line: ``batchgate plan`` sizes and plans batches for a review file."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import Config
from .reviews import SAMPLE_REVIEWS, ReviewFileError, group_reviews, read_reviews
from .sizing import calculate_dynamic_batch_size, estimate_many, plan_batches


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_plan(args: argparse.Namespace) -> int:
    path = args.file or SAMPLE_REVIEWS
    errors: List[ReviewFileError] = []
    groups = group_reviews(read_reviews(path, text_field=args.text_field,
                                        group_field=args.group_field, errors=errors))
    for err in errors:
        print(f"skipped: {err}", file=sys.stderr)
    budget = args.max_tokens_per_batch
    print(f"{path}: {sum(len(v) for v in groups.values())} reviews in {len(groups)} groups; "
          f"budget {budget} tokens/batch, overhead {args.overhead_tokens}, "
          f"estimator '{args.method}'")
    header = (f"{'group':<14} {'reviews':>7} | {'orig size':>9} {'batches':>7} {'over':>4} "
              f"{'max tok':>7} | {'planned':>7} {'max tok':>7} {'alone':>5}")
    print(header)
    print("-" * len(header))
    tot = dict(reviews=0, orig_batches=0, orig_over=0, planned=0, alone=0)
    worst_orig = worst_plan = 0
    for group, reviews in groups.items():
        texts = [r.text for r in reviews]
        tokens = estimate_many(texts, args.method)
        # The original pipeline: a fixed size from the average of the first 50.
        size = calculate_dynamic_batch_size(texts, budget)
        orig = [args.overhead_tokens + sum(tokens[i:i + size]) for i in range(0, len(texts), size)]
        over = sum(t > budget for t in orig)
        plan = plan_batches(texts, budget, counts=tokens, overhead_tokens=args.overhead_tokens,
                            max_batch_size=args.max_batch_size, oversize="alone",
                            pack=args.pack)
        print(f"{group:<14} {len(texts):>7} | {size:>9} {len(orig):>7} {over:>4} "
              f"{max(orig):>7} | {len(plan):>7} {max(plan.token_counts):>7} "
              f"{len(plan.oversize):>5}")
        tot["reviews"] += len(texts)
        tot["orig_batches"] += len(orig)
        tot["orig_over"] += over
        tot["planned"] += len(plan)
        tot["alone"] += len(plan.oversize)
        worst_orig = max(worst_orig, max(orig))
        worst_plan = max(worst_plan, max(plan.token_counts))
        if args.verbose:
            for b, (idx, t) in enumerate(zip(plan.indices, plan.token_counts)):
                lines = ",".join(str(reviews[i].line) for i in idx)
                print(f"    batch {b}: {len(idx)} reviews, {t} tokens, lines {lines}")
    print("-" * len(header))
    print(f"{'total':<14} {tot['reviews']:>7} | {'':>9} {tot['orig_batches']:>7} "
          f"{tot['orig_over']:>4} {worst_orig:>7} | {tot['planned']:>7} {worst_plan:>7} "
          f"{tot['alone']:>5}")
    print(f"original fixed-size batches over budget: {tot['orig_over']} of "
          f"{tot['orig_batches']}; batchgate plan: {tot['planned']} batches, every one within "
          f"{budget} tokens except {tot['alone']} single reviews that alone exceed it")
    return 1 if errors and args.strict else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batchgate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="size and plan batches for a review file")
    plan.add_argument("file", nargs="?", help="reviews as .jsonl or .csv (default: a bundled "
                      "sample of Korean restaurant reviews)")
    plan.add_argument("--max-tokens-per-batch", type=_positive_int,
                      default=Config.VLLM_MAX_TOKENS_PER_BATCH)
    plan.add_argument("--max-batch-size", type=_positive_int, default=None)
    plan.add_argument("--overhead-tokens", type=int, default=0,
                      help="tokens of the prompt template every batch pays")
    plan.add_argument("--method", choices=("script", "chars"), default="script")
    plan.add_argument("--pack", action="store_true", help="regroup reviews for fewer batches")
    plan.add_argument("--text-field", default="text")
    plan.add_argument("--group-field", default="restaurant_id")
    plan.add_argument("--strict", action="store_true", help="exit 1 if any line was skipped")
    plan.add_argument("-v", "--verbose", action="store_true", help="print every batch")
    plan.set_defaults(func=_cmd_plan)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as e:
        print(f"batchgate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
