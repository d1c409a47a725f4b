"""Batch sizing and planning over 1,000,000 reviews: batchgate (C) vs pure Python.

    python benchmarks/bench_sizing.py [--reviews 1000000] [--per-restaurant 500] [--repeats 5]

Rows (each plans every restaurant's reviews; medians of --repeats runs; the Python regex
and batchgate rows run interleaved, and their ratio is also given as the median of
back-to-back pairs, which a shared machine's changing load disturbs least):
  original formula, Python   the original Config.calculate_dynamic_batch_size + fixed slices
  original formula, batchgate the same numbers from batchgate.calculate_dynamic_batch_size
  budget plan, Python regex  per-item script-aware estimate with re + greedy budget split:
                             what a careful Python user writes today for a hard budget
  budget plan, Python chars  per-item chars/3.5 + greedy split (cheapest possible Python)
  budget plan, batchgate     batchgate.plan_batches (script estimator), per restaurant
  budget plan, batchgate x1  one plan_batches call over all 1M reviews
A per-character pure-Python estimator (the spec reference) is timed on a 1 % slice and
scaled, since it would take minutes on the full set.
Reviews come from benchmarks/make_sample_reviews.py: 100,000 generated, tiled to --reviews.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import batchgate  # noqa: E402
from make_sample_reviews import generate_reviews  # noqa: E402
from reference_sizing import OriginalConfig, script_estimate  # noqa: E402

WEIGHTS = batchgate._native._estimator_weights
BUDGET = 4000


# ---- pure-Python competitors -------------------------------------------------

_RUNS = {
    "hangul": re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\ud7b0-\ud7ff]+"),
    "cjk": re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]+"),
    "letter": re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0370-\u04ff]+"),
    "punct": re.compile("[!-/:-@\\[-`{-~\u00a1-\u00bf\u00d7\u00f7\u2000-\u200c\u200e-\u206f"
                        "\u3001-\u303f\uff00-\uffef]+"),
}
_DIGITS = re.compile("[0-9]")
_EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\u200d\ufe00-\ufe0f]")
_SPACES = re.compile("[ \t\r\v\f\u00a0\u3000]{2,}")


def py_regex_estimate(text: str) -> int:
    """Script-aware estimate with regexes (same weights; 'other' text ignored)."""
    if not text:
        return 0
    w = WEIGHTS
    milli = 0
    for (name, pat), (wc, wr) in zip(_RUNS.items(),
                                     ((w[0], w[1]), (w[2], 0), (w[3], w[4]), (w[6], w[7]))):
        runs = pat.findall(text)
        if runs:
            milli += wc * sum(map(len, runs)) + wr * len(runs)
    milli += w[5] * len(_DIGITS.findall(text)) + w[8] * text.count("\n")
    milli += w[9] * len(_EMOJI.findall(text))
    milli += w[11] * sum(len(s) - 1 for s in _SPACES.findall(text))
    return max(1, math.ceil(milli / 1000))


def py_chars_estimate(text: str) -> int:
    return math.ceil(len(text) / 3.5) if text else 0


def py_greedy_plan(texts, estimate, budget=BUDGET):
    batches, cur, cur_tokens = [], [], 0
    for t in texts:
        n = estimate(t)
        if cur and cur_tokens + n > budget:
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(t)
        cur_tokens += n
    if cur:
        batches.append(cur)
    return batches


def original_fixed_batches(texts, size_fn):
    size = size_fn(texts, BUDGET)
    return [texts[i:i + size] for i in range(0, len(texts), size)]


# ---- harness -----------------------------------------------------------------

def timed(fn, repeats):
    """Median wall time of fn(); the previous run's result is freed before
    the clock starts, so no run pays for freeing another's batches."""
    times = []
    result = None
    for _ in range(repeats):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reviews", type=int, default=1_000_000)
    ap.add_argument("--per-restaurant", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--python-repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    base = [r["text"] for r in generate_reviews(seed=2026, n_restaurants=2000, n_reviews=100_000)]
    texts = (base * (args.reviews // len(base) + 1))[:args.reviews]
    groups = [texts[i:i + args.per_restaurant] for i in range(0, len(texts), args.per_restaurant)]
    chars = sum(map(len, texts))
    print(f"{len(texts):,} reviews ({chars / len(texts):.0f} code points on average), "
          f"{len(groups):,} restaurants, budget {BUDGET} tokens; "
          f"generated in {time.perf_counter() - t0:.1f}s")

    rows = []

    def run(name, fn, repeats):
        secs, batches = timed(fn, repeats)
        n_batches = sum(len(b) for b in batches) if batches and isinstance(batches[0], list) \
            and batches and isinstance(batches[0][0], list) else len(batches)
        rows.append((name, secs, n_batches))
        print(f"  {name:<34} {secs:9.3f}s  {n_batches:>9,} batches", flush=True)
        return batches

    py_orig = run("original formula, Python", lambda: [
        original_fixed_batches(g, OriginalConfig.calculate_dynamic_batch_size) for g in groups],
        args.repeats)
    bg_orig = run("original formula, batchgate", lambda: [
        original_fixed_batches(g, batchgate.calculate_dynamic_batch_size) for g in groups],
        args.repeats)
    assert py_orig == bg_orig, "batchgate's formula disagrees with the original"

    # The headline pair runs interleaved: each Python run is followed by a
    # batchgate run, so each ratio compares two runs under the same load
    # (other jobs come and go on a shared machine within a minute).
    py_times, bg_times, pair_ratios = [], [], []
    bg_plans = None
    for k in range(max(args.python_repeats, args.repeats)):
        if k < args.python_repeats:
            py_times.append(timed(lambda: [py_greedy_plan(g, py_regex_estimate)
                                           for g in groups], 1)[0])
        secs, bg_plans = timed(lambda: [batchgate.plan_batches(g, BUDGET) for g in groups], 1)
        bg_times.append(secs)
        if k < args.python_repeats:
            pair_ratios.append(py_times[-1] / secs)
    n_plan_batches = sum(len(p) for p in bg_plans)
    for name, times in (("budget plan, Python regex", py_times),
                        ("budget plan, batchgate", bg_times)):
        rows.append((name, statistics.median(times), n_plan_batches))
        print(f"  {name:<34} {statistics.median(times):9.3f}s  {n_plan_batches:>9,} batches"
              f"  (runs: {', '.join(f'{t:.3f}' for t in times)})", flush=True)
    run("budget plan, Python chars/3.5", lambda: [py_greedy_plan(g, py_chars_estimate)
                                                  for g in groups], args.python_repeats)
    run("budget plan, batchgate chars", lambda: [
        batchgate.plan_batches(g, BUDGET, method="chars") for g in groups], args.repeats)
    run("budget plan, batchgate x1 call", lambda: batchgate.plan_batches(texts, BUDGET),
        args.repeats)

    # The spec's per-character reference is too slow for 1M: time 1 % and scale.
    slice_n = max(1, len(groups) // 100)
    secs, _ = timed(lambda: [py_greedy_plan(g, lambda t: script_estimate(t, WEIGHTS))
                             for g in groups[:slice_n]], 1)
    rows.append(("budget plan, Python per-char (scaled)", secs * len(groups) / slice_n, None))
    print(f"  {'budget plan, Python per-char (scaled)':<34} "
          f"{secs * len(groups) / slice_n:9.3f}s  (timed on {slice_n} restaurants)")

    # The same plan as the exact per-character reference, on the slice.
    for g, plan in zip(groups[:slice_n], bg_plans[:slice_n]):
        assert list(plan) == py_greedy_plan(g, lambda t: script_estimate(t, WEIGHTS))

    t = {name: secs for name, secs, _ in rows}
    bg = t["budget plan, batchgate"]
    print("\nratios (time of the Python way / time of batchgate; medians):")
    print(f"  original formula:           Python / batchgate        "
          f"{t['original formula, Python'] / t['original formula, batchgate']:8.1f}x")
    print(f"  budget plan vs Python regex estimator:                "
          f"{t['budget plan, Python regex'] / bg:8.1f}x   (target >= 50x)")
    print(f"    same, median of {len(pair_ratios)} back-to-back pairs:            "
          f"{statistics.median(pair_ratios):8.1f}x   "
          f"(pairs: {', '.join(f'{r:.1f}' for r in pair_ratios)})")
    print(f"  budget plan vs Python per-char estimator:             "
          f"{t['budget plan, Python per-char (scaled)'] / bg:8.1f}x")
    print(f"  chars rule: Python / batchgate                        "
          f"{t['budget plan, Python chars/3.5'] / t['budget plan, batchgate chars']:8.1f}x")
    print(f"  batchgate: reviews planned per second (script)        {len(texts) / bg:12,.0f}")


if __name__ == "__main__":
    main()
