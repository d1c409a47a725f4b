"""The original pipeline's shape (tests/original_pipeline.py) as is and with
only its imports swapped to batchgate, plus batchgate's own
``analyze_restaurants``, against the simulated vLLM server in its own process.

Each client runs in its own process; prints per-restaurant results equality,
wall time and client CPU (user + sys of the client process), medians of
--repeats runs. Usage:

    python benchmarks/bench_dropin.py --restaurants 100 --reviews 200 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")

CLIENT = r"""
import asyncio, json, os, resource, sys, time
sys.path.insert(0, {tests!r})
from batchgate.corpus import generate_corpus
data = {{}}
for rec in generate_corpus({n}, {per}, seed=1):
    data.setdefault(rec["restaurant_id"], []).append({{"content": rec["text"]}})
data = [{{"restaurant_id": k, "reviews": v}} for k, v in data.items()]
import original_backend
original_backend.Config.VLLM_BASE_URL = os.environ["VLLM_BASE_URL"]
import original_pipeline
variant = {variant!r}
ru0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
if variant == "analyze":
    import batchgate
    res = asyncio.run(batchgate.analyze_restaurants(data))
else:
    mod = original_pipeline.load(variant == "swapped", "p")
    res = asyncio.run(mod.LLMUtils().analyze_multiple_restaurants_vllm(data))
wall = time.perf_counter() - t0
ru1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
keys = ("restaurant_id", "positive_count", "negative_count", "total", "positive_ratio",
        "negative_ratio")
print(json.dumps({{"wall": wall, "cpu": cpu, "results": [{{k: r[k] for k in keys}} for r in res]}}))
"""


def server_counts(url: str) -> tuple:
    """(requests finished, prompt tokens, peak KV usage is not kept: preemptions)."""
    text = urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/metrics", timeout=10).read().decode()
    req = tok = pre = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total"):
            req += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prompt_tokens_total"):
            tok += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:num_preemptions_total"):
            pre += float(line.rsplit(" ", 1)[1])
    return req, tok, pre


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restaurants", type=int, default=100)
    ap.add_argument("--reviews", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "batchgate.simserver", "--port", str(port),
                            "--step-base-s", "0.002", "--step-per-token-s", "2e-6"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/models", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        env = dict(os.environ, VLLM_BASE_URL=url)
        rows = {}
        for rep in range(args.repeats):
            for variant in ("original", "swapped", "analyze"):
                code = CLIENT.format(tests=os.path.abspath(TESTS), n=args.restaurants,
                                     per=args.reviews, variant=variant)
                before = server_counts(url)
                p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   text=True, timeout=1800)
                if p.returncode:
                    sys.exit(f"{variant} failed:\n{p.stderr}")
                row = json.loads(p.stdout)
                after = server_counts(url)
                row["requests"], row["prompt_tokens"], row["preemptions"] = (
                    a - b for a, b in zip(after, before))
                rows.setdefault(variant, []).append(row)
        base = rows["original"][0]["results"]
        print(f"{args.restaurants} restaurants x {args.reviews} reviews, simulated vLLM "
              f"server in its own process; medians of {args.repeats}; load "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'variant':<44} {'wall s':>7} {'client CPU s':>13} {'requests':>8} "
              f"{'prompt tok':>10} {'preempt':>7} {'results':>9}")
        names = {"original": "original (asyncio.Semaphore + own HTTP)",
                 "swapped": "original, imports swapped to batchgate",
                 "analyze": "batchgate.analyze_restaurants (planner+cap)"}
        cpu0 = statistics.median(r["cpu"] for r in rows["original"])
        for v, runs in rows.items():
            same = all(r["results"] == base for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            wall = statistics.median(r["wall"] for r in runs)
            req = statistics.median(r["requests"] for r in runs)
            tok = statistics.median(r["prompt_tokens"] for r in runs)
            pre = statistics.median(r["preemptions"] for r in runs)
            print(f"{names[v]:<44} {wall:>7.2f} {cpu:>6.2f} ({cpu / cpu0:4.0%}) {req:>8.0f} "
                  f"{tok:>10.0f} {pre:>7.0f} {'equal' if same else 'DIFFERENT':>9}")
    finally:
        srv.terminate()
        srv.wait(10)


if __name__ == "__main__":
    main()
