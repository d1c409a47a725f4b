"""``batchgate demo``: why batch size and a concurrency cap are both needed, and
what a token-weighted cap adds, measured against the embedded vLLM-like server.

Five scenarios on the same synthetic corpus (long-tailed Korean reviews):

1. the original's dynamic batch size only, unlimited concurrency;
2. ``asyncio.Semaphore(20)``-style cap with a fixed batch of 50;
3. both (dynamic size and the cap of 20);
4. batchgate: token-budget planner + ``max_inflight_tokens`` (the KV budget);
5. batchgate auto: the same planner + ``max_inflight_tokens="auto"`` (closed loop on the
   server's /metrics), when this build has it; otherwise the demo says so and runs 1-4.

Every number in the table comes from the run: the server's counters and
KV-usage timeline, and the client's per-batch outcomes.
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

from . import dispatcher as _dispatcher
from .config import Config
from .corpus import generate_corpus
from .run.batches import Groups
from .run import (AUTO_TOKEN_CAP_FRACTION, SENTIMENT_PROMPT, BatchLog, build_batches,
                     dispatch_batches, make_dispatcher, server_kv_tokens)

# A small GPU: the KV cache holds ~9 of the original's 100-review batches.
KV_CACHE_TOKENS = 65536
MAX_MODEL_LEN = 16384
# A fast step-time model so the demo runs in seconds on 2 cores.
STEP_BASE_S = 0.0005
STEP_PER_TOKEN_S = 2.5e-7


@dataclass
class Scenario:
    name: str
    sizing: str                       # "dynamic" | "fixed" | "plan"
    max_concurrent: Optional[int]     # None = unlimited
    token_cap: bool = False
    auto: bool = False                # max_inflight_tokens="auto"


SCENARIOS = [
    Scenario("1 dynamic size, no cap", "dynamic", None),
    Scenario("2 semaphore 20, fixed 50", "fixed", 20),
    Scenario("3 dynamic size + semaphore 20", "dynamic", 20),
    # The token cap is what binds here; the count cap only bounds connections.
    Scenario("4 batchgate token cap", "plan", Config.VLLM_MAX_CONCURRENT_BATCHES * 4,
             token_cap=True),
    Scenario("5 batchgate auto", "plan", Config.VLLM_MAX_CONCURRENT_BATCHES * 4, auto=True),
]
AUTO_UNAVAILABLE = "auto: not available in this build"


def auto_available(base_url: str) -> bool:
    """Does this build's Dispatcher take ``max_inflight_tokens="auto"``? Feature
    detection (a build without it rejects the string with TypeError/ValueError), so
    the demo and the benchmarks run on either."""
    try:
        d = _dispatcher.Dispatcher(base_url, max_inflight_tokens="auto")
    except (TypeError, ValueError):
        return False
    d.close()
    return True


class ServerProcess:
    """``python -m batchgate.simserver`` in a child process (its own core and GIL,
    so the client does not slow the simulated GPU down), read over HTTP."""

    def __init__(self, **opts: Any) -> None:
        cmd = [sys.executable, "-m", "batchgate.simserver", "--port", "0"]
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        env = dict(os.environ)
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], 60)
        line = out.readline() if ready else ""
        if "http://" not in line:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the embedded server did not start: {line.strip()!r}")
        self.base_url = line.split("http://", 1)[1].split()[0]
        self.base_url = "http://" + self.base_url

    def _get(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(self.base_url + path, method=method,
                                     data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> Dict[str, Any]:
        return self._get("/debug/stats")

    def timeline(self) -> Dict[str, Any]:
        return self._get("/debug/timeline")

    def reset_stats(self) -> None:
        self._get("/debug/reset", "POST")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def _groups(n_restaurants: int, per_restaurant: int) -> Groups:
    groups: Groups = {}
    for line, rec in enumerate(generate_corpus(n_restaurants, per_restaurant), 1):
        groups.setdefault(rec["restaurant_id"], []).append((rec["text"], line))
    return groups


def scenario_batches(groups: Groups, sc: Scenario) -> List[Any]:
    return build_batches(groups, SENTIMENT_PROMPT, sizing=sc.sizing,
                         max_tokens_per_batch=Config.VLLM_MAX_TOKENS_PER_BATCH,
                         fixed_size=50).batches


def run_scenario(srv: Any, base_url: str, batches: List[Any], sc: Scenario,
                 max_retries: int) -> Dict[str, Any]:
    unlimited = sc.max_concurrent is None
    max_conc = len(batches) if sc.max_concurrent is None else sc.max_concurrent
    token_cap: Optional[Union[int, Literal["auto"]]] = "auto" if sc.auto else None
    if sc.token_cap:  # as `run --max-inflight-tokens auto`: from the server's /metrics
        kv = server_kv_tokens(base_url, None)
        if kv is None:
            raise RuntimeError("the server publishes no vllm:cache_config_info")
        token_cap = int(kv * AUTO_TOKEN_CAP_FRACTION)
    log = BatchLog(None, resume=False)
    engine: Dict[str, Any] = {}

    async def go() -> Any:
        d = make_dispatcher(base_url, max_concurrent=max_conc, max_inflight_tokens=token_cap,
                            max_retries=max_retries, backoff=0.2)
        try:
            st = await dispatch_batches(d, batches, SENTIMENT_PROMPT, log=log,
                                        max_retries=max_retries,
                                        window=len(batches) if unlimited else None)
            engine.update(d.stats())
            return st
        finally:
            await d.aclose()

    srv.reset_stats()
    t0 = time.monotonic()
    st = asyncio.run(go())
    wall = time.monotonic() - t0
    s = srv.stats()
    tl = srv.timeline()
    failed = [r for r in log.records.values() if r.get("status") != "ok"]
    scored = sum(r["n_reviews"] for r in log.records.values() if r.get("status") == "ok")
    return {
        "scenario": sc.name, "mode": s["mode"], "batches": len(batches),
        "max_batch_tokens_est": max(b.tokens for b in batches),
        "max_concurrent": "unlimited" if unlimited else sc.max_concurrent,
        "max_inflight_tokens": None if sc.auto else token_cap, "auto": sc.auto,
        "peak_kv_usage": s["peak_kv_cache_usage"], "preemptions": s["num_preemptions"],
        "oom_errors": s["num_oom_errors"], "rejected_400": s["num_bad_requests"],
        "recomputed_tokens": s["recomputed_tokens"], "peak_running": s["peak_running"],
        "peak_waiting": s["peak_waiting"], "failed_batches": len(failed),
        "failure_examples": sorted({(r.get("error") or "")[:120] for r in failed})[:3],
        "requests": st.requests, "peak_in_flight": st.peak_in_flight,
        "peak_in_flight_tokens": st.peak_in_flight_tokens, "wall_s": wall,
        "reviews_scored": scored, "reviews_per_s": scored / wall if wall > 0 else 0.0,
        "timeline": {"t": tl["t"], "kv": tl["kv_cache_usage"]},
        "dispatcher_stats": engine,
    }


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'mode':<8} {'scenario':<31} {'batches':>7} {'max tok':>7} {'requests':>8} "
            f"{'peak KV':>7} {'preempt':>7} {'OOM':>5} {'400s':>4} {'failed':>6} "
            f"{'wall s':>6} {'reviews/s':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['mode']:<8} {r['scenario']:<31} {r['batches']:>7} "
                   f"{r['max_batch_tokens_est']:>7} {r['requests']:>8} "
                   f"{100 * r['peak_kv_usage']:>6.1f}% {r['preemptions']:>7} "
                   f"{r['oom_errors']:>5} {r['rejected_400']:>4} {r['failed_batches']:>6} "
                   f"{r['wall_s']:>6.1f} {r['reviews_per_s']:>9.0f}")
    out.append("max tok = largest batch prompt (estimated tokens; budget "
               f"{Config.VLLM_MAX_TOKENS_PER_BATCH}); requests include retries; reviews/s "
               "counts scored reviews only")
    return "\n".join(out)


def plot(rows: List[Dict[str, Any]], path: str, kv_tokens: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(10, 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        for r in rows:
            if r["mode"] != mode:
                continue
            tl = r["timeline"]
            # Samples are taken at engine steps: a value holds until the next one.
            ax.plot(tl["t"], [100 * k for k in tl["kv"]], linewidth=0.9, drawstyle="steps-post",
                    label=f"{r['scenario']}: preempt {r['preemptions']}, OOM "
                          f"{r['oom_errors']}, failed {r['failed_batches']}")
        ax.axhline(100, color="black", linewidth=0.6, linestyle="--")
        ax.axhline(100 * AUTO_TOKEN_CAP_FRACTION, color="tab:red", linewidth=0.6, linestyle=":")
        ax.set_ylim(0, 105)
        ax.set_xlabel("seconds")
        ax.set_ylabel("KV cache usage %")
        ax.set_title(f"simulated vLLM, KV cache {kv_tokens} tokens, mode={mode} "
                     f"(dotted: batchgate's token cap)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_command(args: Any) -> int:
    n_rest, per = args.restaurants, args.reviews_per_restaurant
    if args.small:
        n_rest, per = 10, 100
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("batchgate: error: the demo's plot needs matplotlib: pip install "
                  "'batchgate[demo]' (or pass --no-plot)", file=sys.stderr)
            return 2
    kv = args.kv_cache_tokens or KV_CACHE_TOKENS
    if kv < MAX_MODEL_LEN:
        print(f"batchgate: error: --kv-cache-tokens must be at least the server's max_model_len "
              f"({MAX_MODEL_LEN}), got {kv}", file=sys.stderr)
        return 2
    groups = _groups(n_rest, per)
    modes = ["preempt", "naive"] if args.mode == "both" else [args.mode]
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"corpus: {n_rest} restaurants x {per} synthetic reviews; embedded simulated vLLM "
          f"server: KV cache {kv} tokens, max_model_len {MAX_MODEL_LEN}; token budget "
          f"{Config.VLLM_MAX_TOKENS_PER_BATCH}/batch; batchgate's token cap: "
          f"{AUTO_TOKEN_CAP_FRACTION:.0%} of the KV cache read from the server's /metrics",
          flush=True)
    rows: List[Dict[str, Any]] = []
    t0 = time.monotonic()
    planned = [scenario_batches(groups, sc) for sc in SCENARIOS]
    has_auto: Optional[bool] = None
    for mode in modes:
        try:
            srv = ServerProcess(kv_cache_tokens=kv, max_model_len=MAX_MODEL_LEN, mode=mode,
                                step_base_s=STEP_BASE_S, step_per_token_s=STEP_PER_TOKEN_S)
        except (OSError, RuntimeError) as e:
            print(f"batchgate: error: {e}", file=sys.stderr)
            return 2
        base = srv.base_url + "/v1"
        try:
            if has_auto is None:
                has_auto = auto_available(base)
                if not has_auto:
                    print(AUTO_UNAVAILABLE, flush=True)
            for sc, batches in zip(SCENARIOS, planned):
                if sc.auto and not has_auto:
                    continue
                r = run_scenario(srv, base, batches, sc, Config.MAX_RETRIES)
                rows.append(r)
                print(f"  [{mode}] {sc.name}: {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
        finally:
            srv.stop()
    print(format_table(rows))
    if not has_auto:
        print(f"({AUTO_UNAVAILABLE}: scenario 5 skipped)")
    print(f"total demo time {time.monotonic() - t0:.1f} s")
    json_path = os.path.join(args.out_dir, "batchgate_demo.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    print(f"numbers: {json_path}")
    if not args.no_plot:
        png = os.path.join(args.out_dir, "batchgate_demo_kv.png")
        plot(rows, png, kv)
        print(f"plot: {png}")
    return 0
