"""Requests per second the embedded simulated vLLM sustains, measured with wrk.

    python benchmarks/bench_simserver.py [--seconds 10] [--connections 64] [--reviews 20]

Starts ``python -m batchgate.simserver`` on 127.0.0.1 with a zero step time
(so only the server's own work is measured), then runs wrk (one thread) with a
POST Lua script against: /v1/completions with a built-in-style sentiment prompt
of --reviews sample reviews, /v1/completions with a short prompt, and
GET /health. Prints req/s and latency per row, then the server's counters.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "..", "python", "batchgate", "data", "sample_reviews.jsonl")


def sentiment_prompt(n: int) -> str:
    with open(SAMPLE, encoding="utf-8") as f:
        texts = [json.loads(line)["text"].replace("\n", " ") for _, line in zip(range(n), f)]
    return ('Count the positive and negative reviews below. Answer only JSON '
            '{"positive_count": <int>, "negative_count": <int>}.\nReviews:\n'
            + "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts)))


def lua_post(path: str, body: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(json.dumps(body, ensure_ascii=False), ensure_ascii=False)}\n")


def run_wrk(url: str, seconds: int, connections: int, script: str | None) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url]
    if script:
        cmd[1:1] = ["-s", script]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = re.search(r"Latency\s+(\S+)", out).group(1)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "latency": lat, "non2xx": int(non2xx.group(1)) if non2xx else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--reviews", type=int, default=20)
    ap.add_argument("--port", type=int, default=18777)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.join(HERE, "..", "python"), env.get("PYTHONPATH")) if p)
    server = subprocess.Popen(
        [sys.executable, "-m", "batchgate.simserver", "--port", str(args.port),
         "--step-base-s", "0", "--step-per-token-s", "0"],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        print(server.stdout.readline().strip())
        base = f"http://127.0.0.1:{args.port}"
        with tempfile.TemporaryDirectory() as tmp:
            sentiment = os.path.join(tmp, "sentiment.lua")
            short = os.path.join(tmp, "short.lua")
            lua_post(sentiment, {"prompt": sentiment_prompt(args.reviews), "max_tokens": 64})
            lua_post(short, {"prompt": "Say hello to the simulated server", "max_tokens": 16})
            rows = [
                (f"POST /v1/completions, sentiment prompt of {args.reviews} reviews",
                 base + "/v1/completions", sentiment),
                ("POST /v1/completions, short prompt", base + "/v1/completions", short),
                ("GET /health", base + "/health", None),
            ]
            print(f"wrk -t1 -c{args.connections} -d{args.seconds}s, step time 0, "
                  f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
            for name, url, script in rows:
                r = run_wrk(url, args.seconds, args.connections, script)
                print(f"  {name:55s} {r['rps']:9.0f} req/s  latency avg {r['latency']:>8s}"
                      f"  non-2xx {r['non2xx']}")
        with urllib.request.urlopen(base + "/debug/stats") as resp:
            stats = json.loads(resp.read())
        print("server: " + ", ".join(f"{k}={stats[k]}" for k in (
            "steps", "peak_running", "peak_waiting", "peak_kv_cache_usage", "num_preemptions")))
    finally:
        server.terminate()
        server.wait(10)
        server.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
