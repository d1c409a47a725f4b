"""One Dispatcher over several replicas vs the same replicas split by hand vs one
endpoint, on simulated vLLM servers (``python -m batchgate.simserver`` processes on
free 127.0.0.1 ports).

    python benchmarks/bench_replicas.py --prompts 1500 --repeats 3

Modes (same prompts, same per-replica cap ``--max-concurrent``):

  replicas  Dispatcher([url0, url1, url2]).map(prompts): each replica pulls prompts
            when its window has room
  by-hand   three Dispatchers, each map()s its third of the prompts (asyncio.gather)
  single    one Dispatcher on the last replica only (a normal-speed one: the
            one-server baseline)

Scenarios: ``equal`` (three replicas with the same step time) and ``skewed``
(replica 0 ``--slow-factor`` times slower per engine step, e.g. an older GPU or a
busier node). Prints medians of ``--repeats`` runs: wall time, prompts/s, ratios
against by-hand, and the share of prompts each replica served; and the load.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any, Dict, List

from _simproc import MODEL, SimServer as Server

from batchgate import Dispatcher


async def run_mode(mode: str, urls: List[str], prompts: List[str], cap: int,
                   max_tokens: int) -> Dict[str, Any]:
    kw = dict(model=MODEL, max_concurrent=cap)
    t0 = time.perf_counter()
    shares: List[int] = []
    if mode == "replicas":
        async with Dispatcher(urls, **kw) as d:
            res = await d.map(prompts, max_tokens=max_tokens)
            shares = [e["delivered"] for e in d.stats()["endpoints"]]
    elif mode == "by-hand":
        ds = [Dispatcher(u, **kw) for u in urls]
        n = len(urls)
        parts = [prompts[k::n] for k in range(n)]
        try:
            outs = await asyncio.gather(*(d.map(p, max_tokens=max_tokens)
                                          for d, p in zip(ds, parts)))
        finally:
            for d in ds:
                await d.aclose()
        res = [r for o in outs for r in o]
        shares = [len(p) for p in parts]
    else:
        async with Dispatcher(urls[-1], **kw) as d:  # a normal-speed one
            res = await d.map(prompts, max_tokens=max_tokens)
        shares = [len(prompts)]
    wall = time.perf_counter() - t0
    assert len(res) == len(prompts)
    return {"wall": wall, "rate": len(prompts) / wall, "shares": shares}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--max-concurrent", type=int, default=32, help="per replica")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--step-s", type=float, default=0.01, help="engine step time")
    ap.add_argument("--slow-factor", type=float, default=4.0,
                    help="replica 0's step time multiple in the skewed scenario")
    ap.add_argument("--scenarios", default="equal,skewed")
    ap.add_argument("--modes", default="replicas,by-hand,single")
    args = ap.parse_args()
    prompts = [f"Summarize review {i}: the soup was {'good' if i % 3 else 'cold'}."
               for i in range(args.prompts)]
    modes = args.modes.split(",")
    print(f"{args.prompts} prompts, {args.replicas} simulated replicas, max_concurrent "
          f"{args.max_concurrent} per replica, max_tokens {args.max_tokens}, "
          f"step {args.step_s * 1000:.0f} ms; load before: {os.getloadavg()[0]:.1f}")
    for scenario in args.scenarios.split(","):
        steps = [args.step_s] * args.replicas
        if scenario == "skewed":
            steps[0] *= args.slow_factor
        servers = [Server(s) for s in steps]
        try:
            urls = [s.url for s in servers]
            runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in modes}
            for _ in range(args.repeats):
                for m in modes:  # interleaved: drift in load hits every mode alike
                    runs[m].append(asyncio.run(run_mode(m, urls, prompts,
                                                        args.max_concurrent,
                                                        args.max_tokens)))
        finally:
            for s in servers:
                s.stop()
        label = scenario if scenario == "equal" else \
            f"skewed (replica 0 {args.slow_factor:g}x slower)"
        print(f"\n{label}")
        print(f"  {'mode':9} {'wall s':>7} {'prompts/s':>10} {'vs by-hand':>10}  share per replica")
        base = statistics.median(r["wall"] for r in runs["by-hand"]) \
            if "by-hand" in runs else None
        for m in modes:
            wall = statistics.median(r["wall"] for r in runs[m])
            rate = statistics.median(r["rate"] for r in runs[m])
            shares = runs[m][len(runs[m]) // 2]["shares"]
            ratio = f"{base / wall:9.2f}x" if base else "-"
            print(f"  {m:9} {wall:7.2f} {rate:10.0f} {ratio:>10}  {shares}")
    print(f"\nmedians of {args.repeats}; load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
