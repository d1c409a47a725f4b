"""Quick check of closed-loop admission on the simulator in naive mode (a KV
overflow fails the request with a simulated CUDA OOM, HTTP 500):

    max_inflight_tokens="auto"   vs   a fixed semaphore of 20 (the original
    pipeline's default)   vs   the static token cap set to the KV size
    (estimated prompt + max_tokens per request, the best open-loop guess).

Prints throughput, OOM failures (server side) and failed items, and peak KV
usage, side by side. The full workload study is benchmarks/bench_admission.py.

    python benchmarks/bench_auto_naive.py [--n 600] [--kv-cache-tokens 32768]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import urllib.request
from typing import Any, Dict, List

from batchgate import Dispatcher
from batchgate.simserver import SimServerThread


def prompts(n: int, words: int) -> List[str]:
    return [f"Review {i}: " + " ".join(f"food{(i * 7 + k) % 97}" for k in range(words))
            for i in range(n)]


def debug(base: str, what: str) -> Dict[str, Any]:
    req = urllib.request.Request(base + "/debug/" + what,
                                 method="POST" if what == "reset" else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


async def one_run(base: str, kwargs: Dict[str, Any], work: List[str],
                  max_tokens: int) -> Dict[str, Any]:
    debug(base, "reset")
    async with Dispatcher(base + "/v1", **kwargs) as d:
        t = time.perf_counter()
        rs = await d.map(work, max_tokens=max_tokens, return_exceptions=True)
        dt = time.perf_counter() - t
        st = d.stats()
    ok = [r for r in rs if not isinstance(r, BaseException)]
    srv = debug(base, "stats")
    return {"s": dt, "req_s": len(ok) / dt,
            "tok_s": sum((r.usage or {}).get("completion_tokens") or 0 for r in ok) / dt,
            "failed": len(rs) - len(ok), "oom": srv["num_oom_errors"],
            "peak_kv": srv["peak_kv_cache_usage"],
            "limit": (st.get("admission") or {}).get("limit_blocks")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600, help="prompts per run")
    ap.add_argument("--words", type=int, default=150, help="words per prompt")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--kv-cache-tokens", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (median)")
    a = ap.parse_args()
    work = prompts(a.n, a.words)
    settings = [
        ("auto", {"max_inflight_tokens": "auto"}),
        ("semaphore 20", {"max_concurrent": 20}),
        (f"token cap {a.kv_cache_tokens}", {"max_concurrent": 512,
                                             "max_inflight_tokens": a.kv_cache_tokens}),
    ]
    with SimServerThread(mode="naive", kv_cache_tokens=a.kv_cache_tokens,
                         max_model_len=4096) as srv:
        rows = []
        for name, kw in settings:
            runs = [asyncio.run(one_run(srv.base_url, kw, work, a.max_tokens))
                    for _ in range(a.repeat)]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("s", "req_s", "tok_s", "failed", "oom", "peak_kv")}
            med["limit"] = runs[-1]["limit"]
            rows.append((name, med))
    print(f"naive simulator, KV {a.kv_cache_tokens} tokens, {a.n} prompts x {a.words} words, "
          f"max_tokens {a.max_tokens}, load {os.getloadavg()[0]:.1f}")
    print(f"{'setting':<20}{'time s':>8}{'req/s':>8}{'tok/s':>8}{'failed':>8}{'OOM':>6}"
          f"{'peak KV':>9}{'vs auto':>9}")
    base = rows[0][1]["req_s"]
    for name, m in rows:
        print(f"{name:<20}{m['s']:>8.2f}{m['req_s']:>8.1f}{m['tok_s']:>8.0f}{m['failed']:>8.0f}"
              f"{m['oom']:>6.0f}{m['peak_kv']:>9.2f}{m['req_s'] / base:>9.2f}")


if __name__ == "__main__":
    main()
