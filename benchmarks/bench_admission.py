"""Admission control: hand-tuned caps vs the original pattern vs ``auto``, in one run.

What a user can do today to keep a vLLM server full without overrunning its KV cache is
pick a number: a concurrency cap (requests in flight) or a token cap (estimated prompt
tokens + ``max_tokens`` in flight). This benchmark sweeps both, so the best static setting
for each workload is known after the fact, and compares it with the original pipeline's
pattern (``asyncio.Semaphore(20)`` around every call, fixed-size review batches) and with
``batchgate.Dispatcher(..., max_inflight_tokens="auto")`` (closed-loop, no tuning) when the
installed batchgate has it.

Workloads (each a list of prompts sent in order, all submitted at once):

- json:    sentiment prompts of 20 reviews (fixed batches), JSON answers of ~15 tokens,
           ``max_tokens=256`` (the usual safety margin: the token cap over-reserves 15x);
- summary: summaries of 4-12 reviews, answers log-normal around 200 tokens (sigma 0.5,
           the server's ``--output-len``), ``max_tokens=1024``;
- mixed:   the two interleaved;
- shift:   json over short reviews (<= 80 characters) for the first half, then summaries
           of long reviews (>= 150 characters): the right cap changes mid-run;
- shared:  summary, while a second, uncapped client sends its own summaries to the same
           server from the start (the KV the first client may use shrinks, then grows).

Added variant, not in the default set (name it in ``--workloads``):

- summary-long: summary with 4x the requests (same prompts' shape and answer lengths).
           The original summary run lasts ~2.5 s, half of it before any answer comes
           back; this one shows the steady state, where every cap has seen its answers.

Server: batchgate.simserver in a child process (its own core and GIL), recompute
preemption (mode preempt: preemptions, throughput, latency) and, for every strategy again,
out-of-memory failures instead (mode naive: what a server that cannot preempt does; a
failed request is retried by the dispatcher up to its max_retries). The step-time model
is the shape fitted to real vLLM by benchmarks/calibrate_simserver.py.

Printed per workload and strategy: requests/s and generated tokens/s of the first client
in simulated time (the simulator's modelled step time + its idle time: what the simulated
GPU would take, whatever else loads this machine) and requests/s in wall-clock time,
preemptions, peak KV usage, the server's latency p50/p99 (wall clock, arrival to last
token, so client-side queueing under a cap does not count), the naive run's OOM failures
and lost requests (failed after the dispatcher's retries), and at the end auto / best
static (the best by req/s, and the best among those with 0 preemptions). Preemptions, peak
KV, latency and OOM failures are the server's, so in "shared" they include the second
client's requests.

Each strategy runs several times in preempt mode (3 with ``--quick``, ``--repeats``),
interleaved round by round; a row is the run with the median req/s, with the worst
preemption count and peak KV of its runs, and ``±req/s`` is half the range. A single run is
noisy (±3-5 %), and the best static cap is a maximum over many strategies picked after the
fact, which a single noisy run would bias upward.

``auto`` is run as a user would write it, ``Dispatcher(url, max_inflight_tokens="auto")``
and nothing else (so the Dispatcher's default max_concurrent applies); the static caps
are given a count cap of 1024 so only the token cap binds.

    python benchmarks/bench_admission.py --quick          # about 7 minutes
    python benchmarks/bench_admission.py                  # the full sweep
    python benchmarks/bench_admission.py --vllm           # + the real vLLM tier (CPU, slow)

The machine is shared: run it once, report the load it prints.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import batchgate
from batchgate.corpus import generate_corpus
from batchgate.demo import AUTO_UNAVAILABLE, ServerProcess, auto_available
from batchgate.run import SENTIMENT_PROMPT, render_prompt

SUMMARY_PROMPT = ("다음은 한 음식점에 대한 고객 리뷰입니다. 손님들이 좋아한 점과 아쉬워한 점을 "
                  "항목별로 정리하고, 세 문단으로 요약해 주세요.\n\n{reviews}\n\n요약:")

# The simulated server. Step-time shape fitted to the real vLLM tier by
# calibrate_simserver.py (a prefilled token ~0.0014 step base, a decoding sequence
# ~0.05 base), scaled to a 1.5 ms base so a run takes seconds.
SIM = dict(kv_cache_tokens=32768, block_size=16, max_model_len=8192, max_num_seqs=256,
           step_base_s=0.0015, step_prefill_token_s=0.000002, step_decode_seq_s=0.000075,
           output_len="lognormal:200:0.5", output_len_seed=7)
JSON_MAX_TOKENS = 256
SUMMARY_MAX_TOKENS = 1024


@dataclass
class Item:
    prompt: str
    max_tokens: int
    kind: str


@dataclass
class Strategy:
    name: str
    kind: str                        # conc | tok | original | auto
    value: Optional[float] = None    # cap (conc), fraction of the KV cache (tok)


@dataclass
class Outcome:
    workload: str
    strategy: str
    mode: str
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    completion_tokens: int = 0
    model_s: float = 0.0             # the simulated server's time (see model_seconds)
    stats: Dict[str, Any] = field(default_factory=dict)
    note: str = ""
    spread: Optional[float] = None   # half the req/s range over repeats / the median

    @property
    def req_s(self) -> float:
        t = self.model_s or self.wall_s
        return self.ok / t if t > 0 else 0.0

    @property
    def tok_s(self) -> float:
        t = self.model_s or self.wall_s
        return self.completion_tokens / t if t > 0 else 0.0

    @property
    def wall_req_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


def model_seconds(stats: Dict[str, Any]) -> float:
    """The simulator's modelled step time plus its real idle time. On a loaded machine
    the simulator's Python overhead and scheduling delays stretch every step's wall
    time; this is what the run would take on the simulated GPU, load or not. (Idle
    time stays in: a client that leaves the server empty pays for it.)"""
    if "busy_s" not in stats:
        return 0.0
    return stats["busy_s"] + stats.get("idle_s", 0.0)


# ---- workloads -------------------------------------------------------------------------

def _reviews(n: int, seed: int, min_chars: int = 0, max_chars: int = 1 << 30) -> List[str]:
    out: List[str] = []
    k = 0
    while len(out) < n:  # the corpus is long-tailed: keep drawing until enough fit
        k += 1
        out = [r["text"] for r in generate_corpus(k * (1 + n // 500), 500, seed=seed)
               if min_chars <= len(r["text"]) <= max_chars][:n]
    return out


def json_items(n: int, seed: int, max_chars: int = 1 << 30, per: int = 20,
               max_tokens: int = JSON_MAX_TOKENS) -> List[Item]:
    texts = _reviews(per * n, seed, max_chars=max_chars)
    return [Item(render_prompt(SENTIMENT_PROMPT, texts[per * i:per * i + per]), max_tokens,
                 "json") for i in range(n)]


def summary_items(n: int, seed: int, min_chars: int = 0, max_chars: int = 1 << 30,
                  k_range: Tuple[int, int] = (4, 12), max_tokens: int = SUMMARY_MAX_TOKENS
                  ) -> List[Item]:
    rng = random.Random(seed)
    texts = _reviews(k_range[1] * n, seed + 1, min_chars=min_chars, max_chars=max_chars)
    out = []
    pos = 0
    for _ in range(n):
        k = rng.randint(*k_range)
        body = "\n".join(f"- {t}" for t in texts[pos:pos + k])
        pos += k
        out.append(Item(SUMMARY_PROMPT.replace("{reviews}", body), max_tokens, "summary"))
    return out


def build_workloads(n_json: int, n_summary: int, only: Optional[List[str]]
                    ) -> Dict[str, Tuple[List[Item], List[Item]]]:
    """name -> (first client's items, the second client's items)."""
    js = json_items(n_json, 11)
    sm = summary_items(n_summary, 22)
    half_j, half_s = json_items(n_json // 2, 33), summary_items(n_summary // 2, 44)
    mixed: List[Item] = []
    for a, b in zip(half_j, half_s):
        mixed += [a, b]
    w = {
        "json": (js, []),
        "summary": (sm, []),
        "mixed": (mixed, []),
        # short reviews, short answers -> long reviews, long answers
        "shift": (json_items(n_json // 2, 66, max_chars=80)
                  + summary_items(n_summary // 2, 77, min_chars=150), []),
        "shared": (sm, summary_items(n_summary // 4, 55)),
    }
    if only and "summary-long" in only:  # opt-in: the steady state (see the docstring)
        w["summary-long"] = (summary_items(4 * n_summary, 22), [])
    return {k: v for k, v in w.items() if not only or k in only}


# ---- strategies ------------------------------------------------------------------------

def make_dispatcher(sc: Strategy, base_url: str, kv_tokens: int, n: int
                    ) -> Tuple[batchgate.Dispatcher, Optional[asyncio.Semaphore]]:
    common = dict(window=max(256, n), backoff=0.05)
    if sc.kind == "conc":
        return batchgate.Dispatcher(base_url, max_concurrent=int(sc.value), **common), None
    if sc.kind == "tok":
        return batchgate.Dispatcher(base_url, max_concurrent=1024,
                                    max_inflight_tokens=int(sc.value * kv_tokens),
                                    **common), None
    if sc.kind == "original":
        # The original pipeline: a Python asyncio.Semaphore(20) around each call.
        return batchgate.Dispatcher(base_url, max_concurrent=1024, **common), \
            asyncio.Semaphore(20)
    # auto: nothing tuned, only what the user writes.
    return batchgate.Dispatcher(base_url, max_inflight_tokens="auto"), None


async def run_items(d: batchgate.Dispatcher, sem: Optional[asyncio.Semaphore],
                    items: List[Item]) -> Tuple[int, int, int]:
    """(ok, failed, completion tokens)."""
    async def one(it: Item) -> Tuple[bool, int]:
        try:
            if sem is not None:
                async with sem:
                    r = await d.generate(it.prompt, max_tokens=it.max_tokens)
            else:
                r = await d.generate(it.prompt, max_tokens=it.max_tokens)
        except batchgate.BatchgateError:
            return False, 0
        return True, (r.usage or {}).get("completion_tokens") or 0
    res = await asyncio.gather(*(one(it) for it in items))
    return (sum(1 for ok, _ in res if ok), sum(1 for ok, _ in res if not ok),
            sum(t for _, t in res))


def median_outcome(runs: List[Outcome]) -> Outcome:
    """One row from repeated runs of a strategy: the run with the median req/s (the
    lower middle for an even count), with the worst preemption count and losses of all
    of them (safety is judged on the worst run, speed on the typical one)."""
    order = sorted(runs, key=lambda o: o.req_s)
    mid = order[(len(order) - 1) // 2]
    out = Outcome(mid.workload, mid.strategy, mid.mode, mid.ok, max(o.failed for o in runs),
                  mid.wall_s, mid.completion_tokens, mid.model_s, dict(mid.stats), mid.note)
    out.stats["num_preemptions"] = max(o.stats["num_preemptions"] for o in runs)
    out.stats["peak_kv_cache_usage"] = max(o.stats["peak_kv_cache_usage"] for o in runs)
    out.spread = ((order[-1].req_s - order[0].req_s) / 2 / mid.req_s
                  if len(runs) > 1 and mid.req_s > 0 else None)
    return out


def run_repeated(repeats: int, run: Any, strategies: List["Strategy"]) -> List[Outcome]:
    """Every strategy `repeats` times, interleaved (one round of all strategies, in an
    order rotated each round, so load drift on the shared machine hits them alike);
    one median row per strategy."""
    runs: Dict[str, List[Outcome]] = {sc.name: [] for sc in strategies}
    for r in range(repeats):
        k = r % len(strategies)
        for sc in strategies[k:] + strategies[:k]:
            runs[sc.name].append(run(sc))
    return [median_outcome(runs[sc.name]) for sc in strategies]


def run_one(srv: Any, base_url: str, kv_tokens: int, workload: str,
            items: Tuple[List[Item], List[Item]], sc: Strategy, mode: str) -> Outcome:
    main_items, other_items = items
    out = Outcome(workload, sc.name, mode)

    async def go() -> None:
        d, sem = make_dispatcher(sc, base_url, kv_tokens, len(main_items))
        other = None
        if other_items:  # the second client: no cap at all
            other = batchgate.Dispatcher(base_url, max_concurrent=len(other_items),
                                         window=len(other_items), backoff=0.05)
        try:
            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(run_items(d, sem, main_items))]
            if other is not None:
                tasks.append(asyncio.ensure_future(run_items(other, None, other_items)))
            ok, failed, toks = await tasks[0]
            out.wall_s = time.monotonic() - t0
            out.ok, out.failed, out.completion_tokens = ok, failed, toks
            at_end = await asyncio.get_running_loop().run_in_executor(None, srv.stats)
            out.model_s = model_seconds(at_end)
            if other is not None:
                await tasks[1]
            if sc.kind == "auto":
                st = d.stats()
                out.note = " ".join(f"{k}={v}" for k, v in st.items()
                                    if any(w in k for w in ("limit", "learned", "kv")))
        finally:
            await d.aclose()
            if other is not None:
                await other.aclose()

    srv.reset_stats()
    asyncio.run(go())
    out.stats = srv.stats()
    return out


# ---- the real vLLM tier ------------------------------------------------------------------

class VllmAdapter:
    """The tier's vLLM server with the simulator's stats()/reset_stats() shape,
    from /metrics deltas (peak KV and latency percentiles from a 50 ms watcher and
    the e2e histogram's bucket bounds)."""

    def __init__(self, model_dir: str) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm_tier"))
        import serve
        self.serve = serve
        # KV 64 blocks of 32 usable (one more is vLLM's null block): 2,048 tokens.
        self.server = serve.VllmServer(model_dir, max_model_len=1024, max_num_seqs=32,
                                       num_blocks=65, block_size=32,
                                       extra_args=["--no-enable-prefix-caching"])
        self.server.start()
        self.base_url = self.server.base_url
        self._before: Dict[str, float] = {}
        self._peak = 0.0
        self._stop = False
        import threading
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()

    def _watch(self) -> None:
        while not self._stop:
            try:
                self._peak = max(self._peak, self.server.metrics().get(
                    "vllm:kv_cache_usage_perc", 0.0))
            except Exception:  # the server may be busy; the next sample will do
                pass
            time.sleep(0.05)

    def reset_stats(self) -> None:
        self._before = self.server.metrics()
        self._peak = 0.0

    def stats(self) -> Dict[str, Any]:
        m = self.server.metrics()
        b = self._before

        def delta(k: str) -> float:
            return m.get(k, 0.0) - b.get(k, 0.0)
        buckets = sorted(
            (float("inf") if 'le="+Inf"' in k else float(k.split('le="')[1].split('"')[0]),
             m[k] - b.get(k, 0.0))
            for k in m if k.startswith("vllm:e2e_request_latency_seconds_bucket{"))
        total = buckets[-1][1] if buckets else 0

        def pct(q: float) -> Optional[float]:
            if total <= 0:
                return None
            return next(le for le, c in buckets if c >= total * q / 100)
        return {"num_preemptions": int(delta("vllm:num_preemptions_total")),
                "num_oom_errors": 0, "peak_kv_cache_usage": self._peak,
                "latency_p50_s": pct(50), "latency_p99_s": pct(99)}

    def stop(self) -> None:
        self._stop = True
        self.server.stop()


# ---- report ------------------------------------------------------------------------------

def fmt_s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_table(workload: str, rows: List[Tuple[Outcome, Optional[Outcome]]]) -> None:
    print(f"\n== {workload}")
    print(f"{'strategy':<18} {'req/s':>7} {'tok/s':>8} {'wall r/s':>8} {'preempt':>7} "
          f"{'peak KV':>7} {'p50 s':>6} {'p99 s':>6} {'lost':>4} {'±req/s':>6} | "
          f"{'naive OOM':>9} {'lost':>4}")
    for pre, nai in rows:
        s = pre.stats
        line = (f"{pre.strategy:<18} {pre.req_s:>7.1f} {pre.tok_s:>8.0f} "
                f"{pre.wall_req_s:>8.1f} "
                f"{s['num_preemptions']:>7} {100 * s['peak_kv_cache_usage']:>6.0f}% "
                f"{fmt_s(s.get('latency_p50_s')):>6} {fmt_s(s.get('latency_p99_s')):>6} "
                f"{pre.failed:>4} "
                f"{('-' if pre.spread is None else f'{100 * pre.spread:.0f}%'):>6} |")
        if nai is not None:
            line += f" {nai.stats['num_oom_errors']:>9} {nai.failed:>4}"
        else:
            line += f" {'':>9} {'':>4}"
        print(line + (f"   {pre.note}" if pre.note else ""), flush=True)


def summarize(results: Dict[str, List[Tuple[Outcome, Optional[Outcome]]]],
              auto_ok: bool, clock: str = "simulated time") -> None:
    print(f"\n== auto / best static (req/s in {clock}; static = conc-* and tok-* caps)")
    print(f"{'workload':<9} {'best static':<18} {'req/s':>7} {'best 0-preempt':<18} "
          f"{'req/s':>7} {'original':>8} {'auto':>7} {'auto/best':>9} {'auto/best0':>10}")
    for wl, rows in results.items():
        static = [p for p, _ in rows if p.strategy.startswith(("conc-", "tok-"))]
        if not static:
            continue  # --strategies without a static cap: nothing to compare with
        best = max(static, key=lambda o: o.req_s)
        safe = [o for o in static if o.stats["num_preemptions"] == 0 and o.failed == 0]
        best0 = max(safe, key=lambda o: o.req_s) if safe else None
        orig = next((p for p, _ in rows if p.strategy == "original"), None)
        auto = next((p for p, _ in rows if p.strategy == "auto"), None)
        line = (f"{wl:<9} {best.strategy:<18} {best.req_s:>7.1f} "
                f"{(best0.strategy if best0 else '-'):<18} "
                f"{(best0.req_s if best0 else 0):>7.1f} "
                f"{(orig.req_s if orig else 0):>8.1f} ")
        if auto is None:
            line += f"{'n/a':>7} {'n/a':>9} {'n/a':>10}"
        else:
            line += (f"{auto.req_s:>7.1f} {auto.req_s / best.req_s:>9.2f} "
                     f"{(auto.req_s / best0.req_s if best0 else float('nan')):>10.2f}")
        print(line)
    if not auto_ok:
        print(AUTO_UNAVAILABLE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and caps (minutes)")
    ap.add_argument("--workloads", help="comma list: json,summary,mixed,shift,shared (the default set), "
                         "summary-long (opt-in: 4x the summaries, the steady state)")
    ap.add_argument("--strategies",
                    help="comma list of strategy names to run (e.g. conc-32,tok-2xKV,auto); "
                         "the summary compares auto with the best static cap among them")
    ap.add_argument("--naive", choices=("all", "key", "none"), default=None,
                    help="naive-mode (OOM) runs: every strategy, only the best static + "
                         "original + auto (default with --quick), or none")
    ap.add_argument("--vllm", action="store_true",
                    help="also run on the real vLLM tier (needs /work/venvs/vllm; slow)")
    ap.add_argument("--vllm-only", action="store_true", help="skip the simulator runs")
    ap.add_argument("--model-dir", default=os.path.expanduser("~/.cache/batchgate/tiny-qwen2"))
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of each strategy in preempt mode; each row is the median "
                         "(default 3 with --quick, 1 for the longer full sweep; naive-mode "
                         "OOM runs are single)")
    ap.add_argument("--json", help="write every outcome here")
    args = ap.parse_args()
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 1)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    # A kill (timeout, CI) must still stop the simulator children in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    if args.quick:
        n_json, n_summary = 120, 80
        conc, tok = [8, 16, 32, 64], [1.0, 2.0, 4.0]
    else:
        n_json, n_summary = 400, 200
        conc, tok = [4, 8, 16, 24, 32, 48, 64, 128], [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    strategies = ([Strategy(f"conc-{c}", "conc", c) for c in conc]
                  + [Strategy(f"tok-{f:g}xKV", "tok", f) for f in tok]
                  + [Strategy("original", "original"), Strategy("auto", "auto")])
    if args.strategies:
        wanted = args.strategies.split(",")
        unknown = sorted(set(wanted) - {s.name for s in strategies})
        if unknown:
            ap.error(f"unknown strategies {', '.join(unknown)}; "
                     f"known: {', '.join(s.name for s in strategies)}")
        strategies = [s for s in strategies if s.name in wanted]
    only = args.workloads.split(",") if args.workloads else None
    workloads = {} if args.vllm_only else build_workloads(n_json, n_summary, only)
    load0 = os.getloadavg()
    print(f"bench_admission: batchgate {getattr(batchgate, '__version__', '?')}, "
          f"{'quick' if args.quick else 'full'}{' (vLLM only)' if args.vllm_only else ''}, "
          f"median of {repeats}; load {load0[0]:.2f} {load0[1]:.2f} "
          f"{load0[2]:.2f}; {os.cpu_count()} cores")
    if workloads:
        print(f"simulated server: {SIM}")
    for wl, (a, b) in workloads.items():
        print(f"  {wl}: {len(a)} requests" + (f" + {len(b)} from a second, uncapped client"
                                              if b else ""))
    t_start = time.monotonic()
    all_out: List[Outcome] = []
    auto_ok = True
    results: Dict[str, List[Tuple[Outcome, Optional[Outcome]]]] = {}
    naive = args.naive or ("key" if args.quick else "all")
    modes = ["preempt"] if naive == "none" else ["preempt", "naive"]
    servers = {m: ServerProcess(mode=m, **SIM) for m in modes} if workloads else {}
    try:
        base = {m: s.base_url + "/v1" for m, s in servers.items()}
        auto_ok = auto_available(base["preempt"]) if servers else True
        if not auto_ok:
            print(AUTO_UNAVAILABLE)
            strategies = [s for s in strategies if s.kind != "auto"]
        kv = SIM["kv_cache_tokens"] // SIM["block_size"] * SIM["block_size"]
        for wl, items in workloads.items():
            pre_runs = run_repeated(
                repeats, lambda sc: run_one(servers["preempt"], base["preempt"], kv, wl,
                                            items, sc, "preempt"), strategies)
            static = [o for o in pre_runs if o.strategy.startswith(("conc-", "tok-"))]
            best = max(static, key=lambda o: o.req_s).strategy if static else None
            rows = []
            for sc, pre in zip(strategies, pre_runs):
                nai = None
                if "naive" in servers and (naive == "all" or sc.name == best
                                           or sc.kind in ("original", "auto")):
                    nai = run_one(servers["naive"], base["naive"], kv, wl, items, sc, "naive")
                rows.append((pre, nai))
                all_out += [o for o in (pre, nai) if o is not None]
            results[wl] = rows
            print_table(wl, rows)
    finally:
        for s in servers.values():
            s.stop()
    if results:
        summarize(results, auto_ok)

    if args.vllm:
        print("\n== real vLLM tier (CPU, tiny model, KV 64 x 32 = 2,048 tokens usable, "
              "max_num_seqs 32)", flush=True)
        v = VllmAdapter(args.model_dir)
        try:
            auto_ok = auto_available(v.base_url)
            if not auto_ok:
                print(AUTO_UNAVAILABLE)
            # Small prompts (max_model_len 1024). The random model hardly ever emits EOS,
            # so answers run to max_tokens: 48 for "json", 192 for "summary".
            vj = json_items(12, 66, max_chars=80, per=3, max_tokens=48)
            vs = summary_items(12, 77, max_chars=120, k_range=(1, 3), max_tokens=192)
            mixed = [x for pair in zip(vj, vs) for x in pair]
            v_strats = [Strategy("conc-4", "conc", 4), Strategy("conc-8", "conc", 8),
                        Strategy("conc-32", "conc", 32), Strategy("tok-1xKV", "tok", 1.0),
                        Strategy("tok-2xKV", "tok", 2.0), Strategy("original", "original")]
            if auto_ok:
                v_strats.append(Strategy("auto", "auto"))
            vkv = 64 * 32
            rows = [(o, None) for o in run_repeated(
                repeats, lambda sc: run_one(v, v.base_url, vkv, "vllm-mixed", (mixed, []),
                                            sc, "preempt"), v_strats)]
            all_out += [o for o, _ in rows]
            print_table("vllm mixed: 12 short + 12 long answers (req/s in wall time, "
                        "latency = histogram bucket bounds)", rows)
            summarize({"vllm": rows}, auto_ok, "wall-clock time")
        finally:
            v.stop()

    load1 = os.getloadavg()
    print(f"\ntotal {time.monotonic() - t_start:.0f} s; load at the end {load1[0]:.2f} "
          f"{load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"workload": o.workload, "strategy": o.strategy, "mode": o.mode,
                        "ok": o.ok, "failed": o.failed, "wall_s": o.wall_s,
                        "req_s": o.req_s, "tok_s": o.tok_s, "stats": o.stats,
                        "note": o.note} for o in all_out], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
