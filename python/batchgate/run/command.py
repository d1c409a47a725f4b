"""``batchgate run``: the command around ``analyze_groups`` - input file,
embedded server, signals, outputs, summary and exit codes.

Exit codes: 0 every batch scored; 1 some batches failed (or lines were skipped
with --strict); 2 usage or input error; 3 server unreachable; 130 interrupted
(finished batches are in the batch log, --resume sends the rest).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from .._signals import stop_on_signals
from ..config import Config
from .analyze import analyze_groups, resolve_token_cap
from .batches import BatchPlan, Groups, build_batches
from .batchlog import BatchLog
from .pipeline import DispatchStats, make_dispatcher
from .probe import AUTO_TOKEN_CAP_FRACTION, ServerUnreachable, preflight
from .progress import Progress
from .prompt import load_template

MAX_REPORTED_LINES = 20


def read_groups(path: str, text_field: Optional[str] = None,
                group_field: str = "restaurant_id", encoding: str = "utf-8",
                info: Any = None) -> Tuple[Groups, List[Exception]]:
    """{restaurant: [(text, line), ...]} and the skipped lines' errors."""
    from ..reviews import group_reviews, read_reviews
    errors: List[Any] = []
    groups = group_reviews(read_reviews(path, text_field=text_field, group_field=group_field,
                                        encoding=encoding, errors=errors, info=info))
    return {g: [(r.text, r.line) for r in rs] for g, rs in groups.items()}, errors


def _say(msg: str) -> None:
    print(f"batchgate: {msg}", file=sys.stderr, flush=True)


def run_command(args: Any) -> int:
    """``batchgate run`` (exit codes in the module doc)."""
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        _say("interrupted; finished batches are in the batch log, continue with --resume")
        return 130


def _run_command(args: Any) -> int:
    from ..reviews import ReadInfo, ReviewFileError
    template = load_template(args.prompt_template)
    info = ReadInfo()
    try:
        groups, errors = read_groups(args.file, args.text_field, args.group_field,
                                     getattr(args, "encoding", "utf-8"), info)
    except ReviewFileError as e:
        _say(f"error: {e}")
        return 2
    for err in errors[:MAX_REPORTED_LINES]:
        _say(f"skipped line: {err}")
    if len(errors) > MAX_REPORTED_LINES:
        _say(f"... and {len(errors) - MAX_REPORTED_LINES} more skipped lines")
    n_reviews = sum(len(v) for v in groups.values())
    if not n_reviews:
        _say(f"no usable reviews in {args.file}")
        return 2
    if info.text_field:
        how = "detected; --text-field to choose another" if info.detected else "--text-field"
        _say(f"{n_reviews} reviews of {len(groups)} restaurants ({info.format}); review text "
             f"from field {info.text_field!r} ({how})")
    plan = build_batches(groups, template, sizing="plan",
                         max_tokens_per_batch=args.max_tokens_per_batch,
                         max_batch_size=args.max_batch_size)
    for rid, line in plan.oversize:
        _say(f"review at line {line} ({rid}) alone exceeds the batch budget; sent alone")

    batch_log_path = args.batch_log or (args.out + ".batches.jsonl")
    if (not args.resume and not args.overwrite and os.path.exists(batch_log_path)
            and os.path.getsize(batch_log_path) > 0):
        _say(f"{batch_log_path} exists (an earlier run); use --resume to continue it or "
             "--overwrite to start over")
        return 2

    server = None
    given = [args.base_url] if isinstance(args.base_url, str) else args.base_url
    urls = [u.strip() for arg in (given or [os.getenv("VLLM_BASE_URL") or ""])
            for u in arg.split(",") if u.strip()]
    base_url: Any = (urls[0] if len(urls) == 1 else urls) or None  # a list: replicas
    api_key = os.getenv("VLLM_API_KEY") or None
    model = args.model or os.getenv("VLLM_MODEL") or Config.LLM_MODEL
    try:
        if base_url is None:
            from ..simserver import SimServerThread
            server = SimServerThread(kv_cache_tokens=args.sim_kv_cache_tokens,
                                     max_model_len=args.sim_max_model_len,
                                     mode=args.sim_mode, step_base_s=0.002,
                                     step_per_token_s=2e-6)
            base_url = server.start() + "/v1"
            _say(f"no --base-url / VLLM_BASE_URL given: started the embedded simulated vLLM "
                 f"server at {base_url} (KV cache {args.sim_kv_cache_tokens} tokens, "
                 f"mode {args.sim_mode}); answers are simulated, not a real model's")
        first = base_url if isinstance(base_url, str) else base_url[0]
        try:
            served, max_model_len = preflight(first, api_key, timeout=args.connect_timeout)
            for other in ([] if isinstance(base_url, str) else base_url[1:]):
                preflight(other, api_key, timeout=args.connect_timeout)
        except ServerUnreachable as e:
            _say(f"error: {e}")
            return 3
        model = model or served
        biggest = max(b.tokens for b in plan.batches)
        if max_model_len and biggest + args.max_tokens > max_model_len:
            _say(f"warning: the largest batch ({biggest} estimated prompt tokens + "
                 f"{args.max_tokens} answer tokens) exceeds the server's max_model_len "
                 f"({max_model_len}); such batches will be rejected. Lower "
                 "--max-tokens-per-batch.")
        asked = args.max_inflight_tokens
        if asked in (None, "auto"):
            # Replicas: each gets this cap, from the first one's KV cache.
            cap, kv = asyncio.run(resolve_token_cap(first, api_key, "auto",
                                                    timeout=args.connect_timeout))
            if cap is None:
                if asked == "auto":
                    _say("error: --max-inflight-tokens auto: the server publishes no "
                         "vllm:cache_config_info at /metrics; give a number of tokens")
                    return 2
                _say("no token cap: the server publishes no vllm:cache_config_info at "
                     "/metrics (--max-inflight-tokens N sets one)")
            else:
                _say(f"token cap: {cap} tokens in flight "
                     f"({AUTO_TOKEN_CAP_FRACTION:.0%} of the server's KV cache of {kv} tokens)")
            args.max_inflight_tokens = cap
        elif asked == "off":
            args.max_inflight_tokens = None
        return _run(args, template, groups, plan, errors, batch_log_path, base_url, api_key,
                    model, simulated=server is not None)
    finally:
        if server is not None:
            server.stop()


def _run(args: Any, template: str, groups: Groups, plan: BatchPlan, errors: List[Any],
         batch_log_path: str, base_url: str, api_key: Optional[str], model: Optional[str],
         *, simulated: bool) -> int:
    log = BatchLog(batch_log_path, resume=args.resume)
    try:
        stale = set(log.records) - {b.key for b in plan.batches}
        skipped = sum(1 for b in plan.batches if log.done(b.key))
        if args.resume:
            _say(f"resume: {skipped} of {len(plan.batches)} batches already done in "
                 f"{batch_log_path}, {len(plan.batches) - skipped} to send"
                 + (f"; {len(stale)} log records match no batch of this input/plan (ignored)"
                    if stale else ""))
        progress = Progress(len(plan.batches), skipped)

        async def main() -> Tuple[List[Dict[str, Any]], DispatchStats]:
            with stop_on_signals(_say, "interrupted: cancelling batches in flight (Ctrl-C "
                                       "again to abort)") as stop:
                d = make_dispatcher(base_url, api_key=api_key, model=model,
                                    max_concurrent=args.max_concurrent,
                                    max_inflight_tokens=args.max_inflight_tokens,
                                    max_retries=args.max_retries, timeout=args.timeout)
                try:
                    results, st, _, _ = await analyze_groups(
                        groups, dispatcher=d, template=template, max_retries=args.max_retries,
                        max_tokens=args.max_tokens, chat=args.chat, extra_body=args.extra_body,
                        priority=args.priority_queue, log=log, plan=plan, simulated=simulated,
                        progress=progress, stop=stop)
                    return results, st
                finally:
                    await d.aclose()

        results, st = asyncio.run(main())
        progress.finish(st)
    finally:
        log.close()

    failed = sum(r["failed_batches"] for r in results)
    if st.interrupted:
        done = sum(1 for b in plan.batches if log.done(b.key))
        failed_now = sum(1 for b in plan.batches
                         if (log.records.get(b.key) or {}).get("status") == "failed")
        _say(f"stopped: {done} of {len(plan.batches)} batches done and kept in "
             f"{batch_log_path}, {failed_now} failed, {st.unfinished} cancelled in flight, "
             f"{st.not_sent} not sent; {args.out} not written. "
             "Continue with --resume.")
        _print_summary(st, len(plan.batches), skipped, failed_now, None, simulated)
        return 130
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    _print_summary(st, len(plan.batches), skipped, failed, sum(len(v) for v in groups.values()),
                   simulated)
    print(f"results: {args.out} ({len(results)} restaurants); batch log: {batch_log_path}")
    if failed:
        for b in plan.batches:
            rec = log.records.get(b.key)
            if rec is None or rec.get("status") != "ok":
                err = rec.get("error") if rec else "not sent"
                _say(f"failed batch {b.restaurant} #{b.index} (lines {b.lines[0]}-"
                     f"{b.lines[-1]}, {len(b.texts)} reviews): {err}")
    return 1 if failed or (errors and args.strict) else 0


def _print_summary(st: DispatchStats, total: int, skipped: int, failed: int,
                   n_reviews: Optional[int], simulated: bool) -> None:
    rps = st.requests / st.wall if st.wall > 0 else 0.0
    if st.peak_in_flight_tokens is None:
        tok = "no token cap (--max-inflight-tokens)"
    else:
        tok = (f"peak {st.peak_in_flight_tokens} of {st.token_cap} estimated tokens reserved "
               "under the token cap (sampled every 5 ms)")
    lines = [
        f"batches:    {total} planned, {skipped} already done, {st.ok + st.failed} sent this "
        f"run ({st.ok} ok, {st.failed} failed, {st.answer_retries} resent for an unusable "
        f"answer); failed overall: {failed}",
        f"tokens:     {st.prompt_tokens_est} prompt (estimated), {st.prompt_tokens} prompt + "
        f"{st.completion_tokens} completion (server usage, all requests)",
        f"wall time:  {st.wall:.2f} s, {st.requests} requests, {rps:.1f} req/s",
        f"in flight:  peak {st.peak_in_flight} requests; {tok}",
    ]
    if st.interrupted:
        lines.insert(1, f"stopped:    {st.unfinished} cancelled in flight, "
                        f"{st.not_sent} not sent (neither counts as failed)")
    if st.priority_queue:
        lines.append("order:      priority queue (VLLM_USE_PRIORITY_QUEUE): shortest estimated "
                     "prefill first, vLLM `priority` field set")
    if simulated:
        lines.append("answers:    SIMULATED by the embedded server (keyword rules, not a "
                     "model); results are marked \"simulated\": true")
    if n_reviews is not None:
        lines.insert(0, f"reviews:    {n_reviews}")
    print("\n".join(lines))
