#!/usr/bin/env python3
"""Exact prompt counts through vLLM's /tokenize: batchgate vs a thread pool.

Starts batchgate.simserver in its own process on a free 127.0.0.1 port (its
/tokenize has vLLM's shape), then counts N distinct texts with:

  batchgate  await Dispatcher.count_tokens(texts)  (native, concurrent, count cap)
  cached     the same call again (every text in the Dispatcher's LRU)
  threads    concurrent.futures.ThreadPoolExecutor(C) + http.client keep-alive
             per thread (what a script without batchgate would do)

and prints wall time, requests/s, client CPU seconds and the ratio; medians
over --repeats. Usage: python benchmarks/bench_tokenize.py [--texts N]
[--concurrency C] [--repeats K]
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Tuple

from batchgate import Dispatcher


def start_server() -> Tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "batchgate.simserver", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "127.0.0.1:" in line:
            port = int(line.split("127.0.0.1:")[1].split()[0].split("/")[0])
            return proc, port
    proc.kill()
    raise SystemExit("simserver did not start")


def texts_for(n: int, salt: str) -> List[str]:
    return [f"{salt} 리뷰 {i}: 음식이 맛있고 직원이 친절했어요. review {i} was great"
            for i in range(n)]


async def with_batchgate(port: int, texts: List[str], c: int) -> Tuple[float, float, List[int]]:
    async with Dispatcher(f"http://127.0.0.1:{port}/v1", max_concurrent=c) as d:
        t = time.perf_counter()
        counts = await d.count_tokens(texts)
        first = time.perf_counter() - t
        t = time.perf_counter()
        again = await d.count_tokens(texts)
        cached = time.perf_counter() - t
        assert again == counts
        return first, cached, counts


def with_threads(port: int, texts: List[str], c: int) -> Tuple[float, List[int]]:
    local = threading.local()

    def one(text: str) -> int:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port)
        body = json.dumps({"prompt": text, "add_special_tokens": True})
        conn.request("POST", "/tokenize", body, {"Content-Type": "application/json"})
        return int(json.loads(conn.getresponse().read())["count"])

    t = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        counts = list(pool.map(one, texts))
    return time.perf_counter() - t, counts


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    proc, port = start_server()
    try:
        rows = {"batchgate": [], "cached": [], "threads": []}
        cpus = {"batchgate": [], "threads": []}
        for r in range(args.repeats):
            texts = texts_for(args.texts, f"bg{r}")
            c0 = cpu()
            first, cached, counts = asyncio.run(with_batchgate(port, texts, args.concurrency))
            cpus["batchgate"].append(cpu() - c0)
            rows["batchgate"].append(first)
            rows["cached"].append(cached)
            c0 = cpu()
            t, tcounts = with_threads(port, texts_for(args.texts, f"th{r}"), args.concurrency)
            cpus["threads"].append(cpu() - c0)
            rows["threads"].append(t)
            assert len(tcounts) == len(counts)
        n = args.texts
        print(f"{n} distinct texts, concurrency {args.concurrency}, median of {args.repeats}, "
              f"load {os.getloadavg()[0]:.2f}")
        for name, ts in rows.items():
            m = statistics.median(ts)
            c = statistics.median(cpus[name]) if name in cpus else float("nan")
            print(f"  {name:10s} {m:8.3f} s  {n / m:10.0f} texts/s  client CPU {c:6.2f} s")
        ratio = statistics.median(rows["threads"]) / statistics.median(rows["batchgate"])
        print(f"  batchgate is {ratio:.2f}x the thread pool's speed")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
