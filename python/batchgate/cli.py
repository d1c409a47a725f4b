"""Command line: ``batchgate plan`` sizes and plans batches for a review file,
``batchgate run`` scores them through a vLLM server, ``batchgate demo`` compares
the original pipeline's settings with batchgate's on an embedded server."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Union

from .config import Config
from .reviews import SAMPLE_REVIEWS, TEXT_FIELDS, ReviewFileError, group_reviews, read_reviews
from .sizing import calculate_dynamic_batch_size, estimate_many, plan_batches


class _Help(argparse.HelpFormatter):
    """Shows each option's default unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if (not action.option_strings or "default" in h or "%(default)" in h
                or action.default in (None, False, argparse.SUPPRESS)):
            return h
        return f"{h} (default: %(default)s)" if h else "(default: %(default)s)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_plan(args: argparse.Namespace) -> int:
    path = args.file or SAMPLE_REVIEWS
    errors: List[ReviewFileError] = []
    try:
        groups = group_reviews(read_reviews(path, text_field=args.text_field,
                                            group_field=args.group_field,
                                            encoding=args.encoding, errors=errors))
    except ReviewFileError as e:
        print(f"batchgate: error: {e}", file=sys.stderr)
        return 2
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
    plan = sub.add_parser("plan", help="size and plan batches for a review file",
                          formatter_class=_Help)
    plan.add_argument("file", nargs="?", help="reviews as .jsonl or .csv (default: a bundled "
                      "sample of Korean restaurant reviews)")
    plan.add_argument("--max-tokens-per-batch", type=_positive_int,
                      default=Config.VLLM_MAX_TOKENS_PER_BATCH)
    plan.add_argument("--max-batch-size", type=_positive_int, default=None)
    plan.add_argument("--overhead-tokens", type=int, default=0,
                      help="tokens of the prompt template every batch pays")
    plan.add_argument("--method", choices=("script", "chars"), default="script")
    plan.add_argument("--pack", action="store_true", help="regroup reviews for fewer batches")
    _add_input_fields(plan)
    plan.add_argument("--strict", action="store_true", help="exit 1 if any line was skipped")
    plan.add_argument("-v", "--verbose", action="store_true", help="print every batch")
    plan.set_defaults(func=_cmd_plan)
    _add_run(sub)
    _add_demo(sub)
    from .batchfile import add_parser as _add_batch
    _add_batch(sub)
    return p


def _add_input_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default=None,
                   help="review text field (default: detected, the first of "
                   f"{', '.join(TEXT_FIELDS[:4])}, ... present)")
    p.add_argument("--group-field", default="restaurant_id", help="restaurant id field")
    p.add_argument("--encoding", default="utf-8",
                   help="file encoding, e.g. cp949 for Korean Excel exports (a UTF-8 BOM "
                   "is skipped)")


def _json_object(text: str) -> dict:
    import json
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _token_cap(text: str) -> Union[int, str]:
    if text.lower() == "auto":
        return "auto"
    if text.lower() in ("", "none", "0", "off"):
        return "off"
    return _positive_int(text)


def _add_run(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    run = sub.add_parser(
        "run", help="count positive/negative reviews per restaurant through a vLLM server",
        formatter_class=_Help,
        description="Group reviews per restaurant, split them into token-budgeted batches, "
        "send one prompt per batch and sum the answers per restaurant. Without --base-url "
        "(or VLLM_BASE_URL) an embedded simulated vLLM server is started.")
    run.add_argument("file", help="reviews: .jsonl (one review, or one restaurant with nested "
                     "\"reviews\", per line), a .json array of either, or .csv")
    run.add_argument("--out", required=True, help="per-restaurant results (JSONL)")
    run.add_argument("--batch-log", help="per-batch log (JSONL; default: OUT.batches.jsonl)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run: send only batches not in the batch log")
    run.add_argument("--overwrite", action="store_true",
                     help="start over even if the batch log exists")
    run.add_argument("--base-url", action="append", help="OpenAI-compatible base URL, e.g. "
                     "http://127.0.0.1:8000/v1 (default: $VLLM_BASE_URL, else the embedded "
                     "server); API key from $VLLM_API_KEY. Several replicas: repeat it or "
                     "separate URLs with commas (caps are per replica)")
    run.add_argument("--model", help="model (or LoRA adapter) name (default: $VLLM_MODEL, else "
                     "$LLM_MODEL, else the server's first model)")
    run.add_argument("--chat", action="store_true", help="send each prompt as a user message "
                     "to /v1/chat/completions (instruct models) instead of /v1/completions")
    run.add_argument("--extra-body", type=_json_object, default=None, metavar="JSON",
                     help="fields added to every request body, e.g. vLLM structured output: "
                     "'{\"response_format\": {\"type\": \"json_object\"}}'")
    run.add_argument("--prompt-template", help="file with a {reviews} placeholder (and "
                     "optionally {count}) replacing the built-in sentiment prompt")
    _add_input_fields(run)
    run.add_argument("--max-tokens-per-batch", type=_positive_int,
                     default=Config.VLLM_MAX_TOKENS_PER_BATCH,
                     help="estimated prompt tokens per batch at most, the prompt's own "
                     "included (default: %(default)s, from VLLM_MAX_TOKENS_PER_BATCH)")
    run.add_argument("--max-batch-size", type=_positive_int, default=Config.VLLM_MAX_BATCH_SIZE,
                     help="reviews per batch at most (default: %(default)s, from "
                     "VLLM_MAX_BATCH_SIZE)")
    run.add_argument("--max-concurrent", type=_positive_int,
                     default=Config.VLLM_MAX_CONCURRENT_BATCHES,
                     help="requests in flight at most (default: %(default)s, from "
                     "VLLM_MAX_CONCURRENT_BATCHES)")
    run.add_argument("--max-inflight-tokens", type=_token_cap, default=None,
                     help="cap on estimated prompt + answer tokens in flight: a number, "
                     "'auto' (95%% of the server's KV cache from vLLM's /metrics, "
                     "vllm:cache_config_info; an error if the server does not publish it) or "
                     "'off'; default (None): auto when the server publishes it, else off")
    run.add_argument("--priority-queue", action=argparse.BooleanOptionalAction,
                     default=Config.VLLM_USE_PRIORITY_QUEUE,
                     help="send shortest estimated prefill first with vLLM's `priority` "
                     "field (server run with --scheduling-policy priority; default: %(default)s, "
                     "from VLLM_USE_PRIORITY_QUEUE)")
    run.add_argument("--max-retries", type=int, default=Config.MAX_RETRIES,
                     help="transient HTTP failures are retried this many times per request; "
                     "a batch with an unusable answer is resent until it has made "
                     "1 + this many requests (default: %(default)s, from MAX_RETRIES)")
    run.add_argument("--max-tokens", type=_positive_int, default=64,
                     help="max_tokens of each answer")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    run.add_argument("--connect-timeout", type=float, default=5.0)
    run.add_argument("--strict", action="store_true", help="exit 1 if any line was skipped")
    sim = run.add_argument_group("embedded server (only without --base-url)")
    sim.add_argument("--sim-kv-cache-tokens", type=_positive_int, default=131072)
    sim.add_argument("--sim-max-model-len", type=_positive_int, default=32768)
    sim.add_argument("--sim-mode", choices=("preempt", "naive"), default="preempt")
    run.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from .run.command import run_command
    return run_command(args)


def _add_demo(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    demo = sub.add_parser(
        "demo", help="four scenarios on a synthetic corpus against the embedded server: "
        "KV-cache usage, preemptions/OOM, failures, time",
        description="Runs the original pipeline's settings (dynamic batch size only; a "
        "semaphore with a fixed batch size; both) and batchgate's token-weighted cap on the "
        "same synthetic corpus against the embedded simulated vLLM server with a small KV "
        "cache, prints a table and writes a PNG of KV-cache usage over time.")
    demo.add_argument("--out-dir", default=".", help="where to write the plot and table")
    demo.add_argument("--restaurants", type=_positive_int, default=100)
    demo.add_argument("--reviews-per-restaurant", type=_positive_int, default=500)
    demo.add_argument("--mode", choices=("both", "preempt", "naive"), default="both",
                      help="server behaviour when the KV cache is full: preempt = vLLM's "
                      "recompute preemption, naive = fail with out-of-memory (HTTP 500), "
                      "both (default) = the four scenarios in each mode")
    demo.add_argument("--kv-cache-tokens", type=_positive_int, default=None,
                      help="the simulated GPU's KV cache (default 65536; at least 16384, "
                      "the server's max_model_len)")
    demo.add_argument("--small", action="store_true",
                      help="a small corpus (10 x 100) for a quick check")
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG")
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_command
    return demo_command(args)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, LookupError) as e:
        print(f"batchgate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
