"""batchgate vs aiohttp + asyncio.Semaphore vs the openai client, against a REAL vLLM server.

The server is the CPU build of vLLM serving the tier's tiny random Qwen2 model on 127.0.0.1
(see tests/vllm_tier). Its KV cache is deliberately small, so high client concurrency makes
vLLM preempt; the point is to see what each client's concurrency setting does to throughput,
latency and preemptions on a real scheduler, and what batchgate's token budget changes.

    /work/venvs/vllm/bin/python benchmarks/bench_real_vllm.py            # starts its own server
    BATCHGATE_VLLM_URL=http://127.0.0.1:PORT/v1 ... bench_real_vllm.py   # or uses a running one

Per run: requests/s and generated tokens/s (wall clock), client CPU-seconds, latency
percentiles as the caller sees them (submission of the whole batch -> each result, so queueing
under the cap counts), vLLM's own end-to-end latency percentiles (from its histogram), and
preemptions, peak running/waiting and peak KV-cache usage from vLLM's /metrics.
On this 2-core machine the model, the server and the clients share the cores: the numbers
say how the clients compare on one real server, not what a GPU server would do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import threading
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm_tier"))
import serve  # noqa: E402

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
PREEMPTIONS, KV = "vllm:num_preemptions_total", "vllm:kv_cache_usage_perc"
GENERATED = "vllm:generation_tokens_total"
E2E = "vllm:e2e_request_latency_seconds"


def load_prompts(n: int) -> list[str]:
    lines = resources.files("batchgate.data").joinpath(
        "sample_reviews.jsonl").read_text(encoding="utf-8").splitlines()
    # Short and medium reviews only: every request must fit --max-model-len.
    texts = [t for t in (json.loads(x)["text"] for x in lines) if len(t) <= 400]
    out = []
    for i in range(n):
        out.append("Summarise the sentiment of this review in one word.\n"
                   f"Review: {texts[i % len(texts)]}\nAnswer:")
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def histogram_percentiles(before: dict, after: dict, name: str, qs=(50, 99)) -> list[float]:
    """Percentiles (bucket upper bounds) of a Prometheus histogram between two scrapes."""
    buckets = []
    for key, value in after.items():
        if not key.startswith(name + "_bucket{"):
            continue
        m = re.search(r'le="([^"]+)"', key)
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        buckets.append((le, value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return [float("nan")] * len(qs)
    total = buckets[-1][1]
    return [next(le for le, c in buckets if c >= total * q / 100) for q in qs]


class Watch:
    def __init__(self, server, period=0.05):
        self.server, self.period = server, period
        self.peak_running = self.peak_waiting = self.peak_kv = 0.0
        self.cpu = 0.0  # this watcher's own CPU time, taken out of the client's
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            m = self.server.metrics()
            self.peak_running = max(self.peak_running, m.get(RUNNING, 0.0))
            self.peak_waiting = max(self.peak_waiting, m.get(WAITING, 0.0))
            self.peak_kv = max(self.peak_kv, m.get(KV, 0.0))
            self._stop.wait(self.period)
        self.cpu = time.thread_time()

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


# ---- clients: each returns the list of per-item completion times (s since batch start) ---

async def run_batchgate(server, prompts, conc, params, budget=None):
    import batchgate

    done = [0.0] * len(prompts)
    async with batchgate.Dispatcher(server.base_url, model=server.model_name,
                                    max_concurrent=conc, max_inflight_tokens=budget,
                                    max_retries=0) as d:
        t0 = time.perf_counter()
        async for i, r in d.as_completed(prompts, **params):
            done[i] = time.perf_counter() - t0
            assert r.usage["completion_tokens"] == params["max_tokens"]
    return done


async def run_aiohttp(server, prompts, conc, params):
    import aiohttp

    sem = asyncio.Semaphore(conc)
    done = [0.0] * len(prompts)
    url = server.base_url + "/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()

        async def one(i, prompt):
            async with sem:  # the original pipeline's pattern
                body = dict(params, model=server.model_name, prompt=prompt)
                async with session.post(url, json=body) as resp:
                    data = await resp.json()
                    resp.raise_for_status()
            assert data["usage"]["completion_tokens"] == params["max_tokens"]
            done[i] = time.perf_counter() - t0

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return done


async def run_openai(server, prompts, conc, params):
    import openai

    sem = asyncio.Semaphore(conc)
    done = [0.0] * len(prompts)
    extra = {k: v for k, v in params.items() if k not in ("max_tokens", "temperature")}
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    try:
        t0 = time.perf_counter()

        async def one(i, prompt):
            async with sem:
                r = await client.completions.create(
                    model=server.model_name, prompt=prompt, max_tokens=params["max_tokens"],
                    temperature=params["temperature"], extra_body=extra)
            assert r.usage.completion_tokens == params["max_tokens"]
            done[i] = time.perf_counter() - t0

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await client.close()
    return done


CLIENTS = {"batchgate": run_batchgate, "aiohttp+Semaphore": run_aiohttp,
           "openai": run_openai}


def available(name: str) -> str | None:
    mod = {"batchgate": "batchgate", "aiohttp+Semaphore": "aiohttp", "openai": "openai"}[name]
    try:
        m = __import__(mod)
    except ImportError as e:
        return f"not installed ({e})"
    if name == "batchgate" and not hasattr(m, "Dispatcher"):
        return "batchgate.Dispatcher not in this build"
    return None


def wait_idle(server, timeout=120.0):
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m.get(RUNNING, 0) == 0 and m.get(WAITING, 0) == 0:
            return m
        if time.monotonic() > deadline:
            raise RuntimeError("server did not go idle")
        time.sleep(0.1)


def one_run(server, label, fn, prompts, conc, params, **kw):
    before = wait_idle(server)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    with Watch(server) as watch:
        done = asyncio.run(fn(server, prompts, conc, params, **kw))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 - watch.cpu
    after = wait_idle(server)
    e2e50, e2e99 = histogram_percentiles(before, after, E2E)
    return {
        "client": label, "conc": conc, "wall": wall, "req_s": len(prompts) / wall,
        "tok_s": (after[GENERATED] - before[GENERATED]) / wall, "cpu": cpu,
        "p50": pct(done, 50), "p90": pct(done, 90), "p99": pct(done, 99),
        "srv_e2e_p50": e2e50, "srv_e2e_p99": e2e99,
        "preempt": after[PREEMPTIONS] - before[PREEMPTIONS],
        "peak_run": watch.peak_running, "peak_wait": watch.peak_waiting,
        "peak_kv": watch.peak_kv,
    }


def print_table(rows):
    head = (f"{'client':<30} {'conc':>4} {'req/s':>6} {'tok/s':>6} {'cpuS':>5} "
            f"{'p50':>6} {'p90':>6} {'p99':>6} {'srvE2E50':>8} {'srvE2E99':>8} "
            f"{'preempt':>7} {'run':>3} {'wait':>4} {'kv%':>4}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['client']:<30} {r['conc']:>4} {r['req_s']:>6.2f} {r['tok_s']:>6.0f} "
              f"{r['cpu']:>5.2f} {r['p50']:>6.2f} {r['p90']:>6.2f} {r['p99']:>6.2f} "
              f"{r['srv_e2e_p50']:>8.2f} {r['srv_e2e_p99']:>8.2f} {r['preempt']:>7.0f} "
              f"{r['peak_run']:>3.0f} {r['peak_wait']:>4.0f} {100 * r['peak_kv']:>4.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48, help="prompts per run")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--concurrency", default="2,8,32", help="comma-separated caps")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median kept)")
    ap.add_argument("--token-budget", type=int, default=1600,
                    help="batchgate max_inflight_tokens run (0 = skip); the default server "
                         "has 60 usable KV blocks x 32 = 1920 tokens")
    ap.add_argument("--model-dir", default=os.environ.get("BATCHGATE_VLLM_MODEL_DIR"),
                    help="tiny model directory (made by tests/vllm_tier/make_tiny_model.py)")
    ap.add_argument("--num-blocks", type=int, default=61, help="KV blocks of 32 tokens "
                    "(vLLM keeps one back)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write rows as JSON here")
    args = ap.parse_args(argv)

    concs = [int(x) for x in args.concurrency.split(",") if x]
    params = dict(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = load_prompts(args.requests)

    server = None
    own = None
    url = os.environ.get("BATCHGATE_VLLM_URL")
    if url:
        server = serve.ExternalServer(url, os.environ.get("BATCHGATE_VLLM_MODEL"))
    else:
        if not args.model_dir:
            ap.error("no running server (BATCHGATE_VLLM_URL) and no --model-dir to start one")
        own = serve.VllmServer(args.model_dir, max_model_len=1024,
                               max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks,
                               block_size=32)
        own.start()
        server = own
        print(f"vLLM server started in {own.start_seconds:.1f}s at {own.base_url} "
              f"(KV {args.num_blocks} x 32 tokens, max-num-seqs {args.max_num_seqs})")
    try:
        # Warm-up: first requests pay for lazy initialisation in the server.
        if not available("aiohttp+Semaphore"):
            asyncio.run(run_aiohttp(server, prompts[:4], 4, params))
        rows = []
        for conc in concs:
            for name, fn in CLIENTS.items():
                why = available(name)
                if why:
                    print(f"skip {name}: {why}")
                    continue
                runs = [one_run(server, name, fn, prompts, conc, params)
                        for _ in range(args.repeats)]
                rows.append(sorted(runs, key=lambda r: r["req_s"])[len(runs) // 2])
            if args.token_budget and not available("batchgate"):
                runs = [one_run(server, f"batchgate budget={args.token_budget}",
                                run_batchgate, prompts, conc, params,
                                budget=args.token_budget) for _ in range(args.repeats)]
                rows.append(sorted(runs, key=lambda r: r["req_s"])[len(runs) // 2])
        print(f"\n{args.requests} prompts (sample reviews), max_tokens={args.max_tokens} "
              f"(ignore_eos), temperature 0; latency columns in seconds; cpuS = client "
              f"CPU-seconds; p50/p90/p99 = time from batch start to each result; srvE2E = "
              f"vLLM's e2e_request_latency histogram (bucket bounds); run/wait/kv% = peaks "
              f"seen on /metrics")
        print_table(rows)
        base = {r["conc"]: r for r in rows if r["client"] == "aiohttp+Semaphore"}
        for r in rows:
            b = base.get(r["conc"])
            if b and r is not b:
                print(f"  {r['client']} c={r['conc']}: {r['req_s'] / b['req_s']:.2f}x "
                      f"aiohttp req/s, client CPU {r['cpu'] / max(b['cpu'], 1e-9):.2f}x, "
                      f"preemptions {r['preempt']:.0f} vs {b['preempt']:.0f}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        if own is not None:
            own.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
