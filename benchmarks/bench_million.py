#!/usr/bin/env python3
"""1,000,000 prompts through batchgate.Dispatcher against a local nginx.

Measures, per bulk API (map, as_completed):
  - time from the call to the first request on the wire (engine attempts > 0),
  - peak RSS above the process after the prompts were built,
  - throughput and client CPU.
nginx (from apt) is configured here and listens on 127.0.0.1 only.

    python benchmarks/bench_million.py [--n 1000000] [--concurrency 256]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BODY = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "text": " Positive. The reviewer is satisfied with delivery time,"
                 " build quality and value for money.", "logprobs": None,
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 31, "total_tokens": 47, "completion_tokens": 16},
}, separators=(",", ":"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    user = ""
    if os.geteuid() == 0:
        import pwd
        user = f"user {pwd.getpwuid(0).pw_name};"
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
{user}
daemon off; master_process on; worker_processes 1; pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
    client_body_temp_path {workdir}/cb; proxy_temp_path {workdir}/px;
    fastcgi_temp_path {workdir}/fc; uwsgi_temp_path {workdir}/uw; scgi_temp_path {workdir}/sc;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/completions {{ default_type application/json; return 200 '{BODY}'; }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", workdir, "-e", f"{workdir}/error.log", "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not start")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(mode: str, url: str, prompts: list, c: int) -> dict:
    import batchgate
    async with batchgate.Dispatcher(url, model="bench", max_concurrent=c) as d:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if mode == "map":
            task = asyncio.ensure_future(d.map(prompts, max_tokens=16))
        else:
            async def consume() -> int:
                k = 0
                async for _i, _r in d.as_completed(prompts, max_tokens=16):
                    k += 1
                return k
            task = asyncio.ensure_future(consume())
        while d.stats()["attempts"] == 0:
            await asyncio.sleep(0)
        first = time.perf_counter() - t0
        res = await task
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        n = len(res) if mode == "map" else res
        assert n == len(prompts), n
        del res
        return {"first_ms": first * 1000, "req_s": n / dt, "cpu_10k": cpu / n * 1e4}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--mode", choices=["map", "as_completed", "both"], default="both")
    args = ap.parse_args()
    if not shutil.which("nginx"):
        print("nginx not found (apt-get install nginx)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as wd:
        proc, port = start_nginx(wd)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            base = rss_mib()
            prompts = [f"Review {i}: The product arrived on time and works as described. "
                       "Summarise the sentiment of this review in one word." for i in range(args.n)]
            with_prompts = rss_mib()
            print(f"{args.n:,} prompts: {with_prompts - base:.1f} MiB; c={args.concurrency}")
            modes = ["as_completed", "map"] if args.mode == "both" else [args.mode]
            for mode in modes:
                r = asyncio.run(run(mode, url, prompts, args.concurrency))
                print(f"{mode:13s} first request after {r['first_ms']:.2f} ms, "
                      f"{r['req_s']:,.0f} req/s, {r['cpu_10k']:.3f} CPU-s/10k, "
                      f"peak RSS above prompts so far {peak_mib() - with_prompts:.1f} MiB")
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
