#!/usr/bin/env python3
"""HTTP client benchmark for batchgate against a local nginx (issue 4, "Benchmark").

One run starts its own nginx on a free 127.0.0.1 port answering
POST /v1/completions with a fixed ~600-byte completion, then at each
concurrency runs, in separate processes:

  wrk        the server's ceiling (duration based, lua POST script)
  c-curl     plain C libcurl multi + cJSON loop (benchmarks/c/curl_multi_ceiling.c)
  aiohttp    asyncio.Semaphore + one coroutine per request + gather (original pattern)
  httpx      httpx.AsyncClient + semaphore
  openai     AsyncOpenAI(max_retries=0) + semaphore
  batchgate  batchgate.Dispatcher(...).map(prompts), if batchgate is importable
  bg-base    the same from another build (--baseline DIR: a directory holding a
             batchgate package, e.g. a copy of an older install), so a change
             is measured against its baseline and the C loop in one run

and prints req/s, client CPU-seconds per 10k requests, event-loop lag p99,
peak RSS and ratios vs aiohttp and vs the C loop (medians over --repeats).

Usage:  python benchmarks/bench_http.py [--quick] [--requests N] [--repeats K]
        [--concurrency 20,256] [--clients wrk,c-curl,aiohttp,...] [--uvloop]
        [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "c" / "curl_multi_ceiling.c"
MODEL = "bench-model"
MAX_TOKENS = 16
LOOPBACK = "127.0.0.1"
ALL_CLIENTS = ("wrk", "c-curl", "aiohttp", "httpx", "openai", "batchgate")
ASYNC_CLIENTS = ("aiohttp", "httpx", "openai", "batchgate")


# ---------------------------------------------------------------- payloads

def completion_body() -> str:
    """A fixed OpenAI/vLLM-style completion response of about 600 bytes."""
    text = (
        " Positive. The reviewer is satisfied with delivery time, build quality"
        " and value for money, and would recommend the product to others."
    )
    doc = {
        "id": "cmpl-0123456789abcdef0123456789abcdef",
        "object": "text_completion",
        "created": 1732560000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 31,
            "total_tokens": 47,
            "completion_tokens": MAX_TOKENS,
            "prompt_tokens_details": None,
        },
        "service_tier": None,
        "system_fingerprint": None,
        "kv_transfer_params": None,
    }
    body = json.dumps(doc, separators=(",", ":"))
    # Padding keeps the size near 600 bytes whatever the fields above say.
    body = body[:-1] + ',"pad":"' + "x" * max(0, 600 - len(body) - 9) + '"}'
    # nginx's quoted string must not see quotes, variables or escapes.
    assert not set("'$\\") & set(body), body
    return body


def make_prompts(n: int, offset: int = 0) -> list[str]:
    return [
        f"Review {i}: The product arrived on time and works as described. "
        "Summarise the sentiment of this review in one word."
        for i in range(offset, offset + n)
    ]


def request_body(prompt: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


# ---------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """Child pre-exec: get SIGTERM if the benchmark dies, so nothing is left behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def loopback_env() -> dict:
    """Environment for children: no proxies, so traffic stays on loopback."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = LOOPBACK
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def run_child(cmd: list[str], timeout: float, workdir: Path,
              pythonpath: str | None = None) -> tuple[int, str, str, resource.struct_rusage]:
    """Run cmd, kill it after timeout; return (exit code, stdout, stderr tail, its rusage)."""
    env = loopback_env()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (pythonpath, env.get("PYTHONPATH")) if x)
    err_path = workdir / "child.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
            env=env, preexec_fn=_die_with_parent,
        )
    lock = threading.Lock()
    reaped = False

    def kill() -> None:
        with lock:
            if not reaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        with lock:
            reaped = True
            proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
        if proc.returncode is None:  # interrupted: do not leave it running
            kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -9
    tail = err_path.read_text(errors="replace")[-2000:]
    return proc.returncode, out, tail, usage


class Nginx:
    """nginx in the foreground with everything (pid, logs, temp) in a private dir."""

    def __init__(self, workdir: Path, body: str, workers: int = 2):
        self.dir = workdir / "nginx"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        user = ""
        if os.geteuid() == 0:  # otherwise workers would drop to "nobody"
            import pwd
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name};"
        d = self.dir
        self.conf = d / "nginx.conf"
        self.conf.write_text(f"""
{user}
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
    server {{
        listen {LOOPBACK}:{self.port} backlog=4096;
        location = /v1/completions {{
            default_type application/json;
            return 200 '{body}';
        }}
        location / {{ return 404; }}
    }}
}}
""")

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c", str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("nginx did not start listening in time")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # fast shutdown
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---------------------------------------------------------------- runners in the parent

WRK_LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer dummy"
"""


def cpu_of(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, c: int, duration: float, timeout: float, workdir: Path) -> dict:
    lua = workdir / "post.lua"
    body = json.dumps(request_body(make_prompts(1)[0]), separators=(",", ":"))
    lua.write_text(WRK_LUA.format(body=body))
    threads = max(1, min(2, c))
    cmd = ["wrk", "-t", str(threads), "-c", str(c), "-d", f"{duration:g}s", "--timeout", "10s",
           "-s", str(lua), url + "/completions"]
    rc, out, err, usage = run_child(cmd, timeout, workdir)
    m_rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    m_n = re.search(r"(\d+) requests in", out)
    if rc != 0 or not m_rps or not m_n:
        return {"error": f"wrk rc={rc}: {out[-500:]} {err[-500:]}"}
    n = int(m_n.group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:.*", out)
    errors = int(bad.group(1)) if bad else 0
    if sock:
        errors += sum(int(x) for x in re.findall(r"\d+", sock.group(0)))
    return {"rps": float(m_rps.group(1)), "requests": n, "errors": errors,
            "cpu_per_10k": cpu_of(usage) / n * 1e4, "rss_mib": usage.ru_maxrss / 1024}


def build_c_client(workdir: Path) -> Path:
    exe = workdir / "curl_multi_ceiling"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libcurl", "libcjson"],
                           check=True, capture_output=True, text=True).stdout.split()
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(C_SOURCE), *flags],
                   check=True)
    return exe


def run_c(exe: Path, url: str, c: int, n: int, warmup: int, timeout: float, workdir: Path) -> dict:
    cmd = [str(exe), url + "/completions", str(c), str(n), str(warmup), str(timeout)]
    rc, out, err, usage = run_child(cmd, timeout + 10, workdir)
    try:
        stats = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"c-curl rc={rc}: {err[-500:]}"}
    return {"rps": stats["rps"], "requests": n, "errors": n - stats["ok"],
            "cpu_per_10k": stats["cpu_s"] / n * 1e4, "rss_mib": usage.ru_maxrss / 1024}


def run_python_client(name: str, url: str, c: int, n: int, warmup: int, timeout: float,
                      use_uvloop: bool, workdir: Path, pythonpath: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--url", url,
           "--concurrency", str(c), "--requests", str(n), "--warmup", str(warmup),
           "--timeout", str(timeout)]
    if use_uvloop:
        cmd.append("--uvloop")
    rc, out, err, usage = run_child(cmd, timeout + 60, workdir, pythonpath)  # + interpreter start-up
    try:
        stats = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"{name} rc={rc}: {err[-800:]}"}
    if "error" in stats:
        return stats
    return {"rps": stats["rps"], "requests": n, "errors": n - stats["ok"],
            "first_error": stats.get("first_error"),
            "cpu_per_10k": stats["cpu_s"] / n * 1e4, "lag_p99_ms": stats["lag_p99_ms"],
            "lag_max_ms": stats["lag_max_ms"], "rss_mib": usage.ru_maxrss / 1024}


def batchgate_available(workdir: Path, pythonpath: str | None = None) -> tuple[bool, str]:
    probe = "import batchgate, sys; sys.exit(0 if hasattr(batchgate, 'Dispatcher') else 3)"
    rc, _, err, _ = run_child([sys.executable, "-c", probe], 60, workdir, pythonpath)
    if rc == 0:
        return True, ""
    return False, "no batchgate.Dispatcher" if rc == 3 else (err.strip().splitlines() or ["?"])[-1]


# ---------------------------------------------------------------- clients (child side)

class AiohttpClient:
    """The original pattern: one coroutine per request, semaphore, gather."""

    async def start(self, url: str, c: int) -> None:
        import aiohttp
        self.url = url + "/completions"
        self.sem = asyncio.Semaphore(c)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=c),
            timeout=aiohttp.ClientTimeout(total=60),
            headers={"Authorization": "Bearer dummy"},
        )

    async def one(self, prompt: str) -> str:
        async with self.sem:
            async with self.session.post(self.url, json=request_body(prompt)) as resp:
                resp.raise_for_status()
                data = await resp.json()
        return data["choices"][0]["text"]

    async def run(self, prompts: list[str]) -> list:
        return await asyncio.gather(*(self.one(p) for p in prompts), return_exceptions=True)

    async def aclose(self) -> None:
        await self.session.close()


class HttpxClient(AiohttpClient):
    async def start(self, url: str, c: int) -> None:
        import httpx
        self.url = url + "/completions"
        self.sem = asyncio.Semaphore(c)
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=c, max_keepalive_connections=c),
            timeout=60, trust_env=False, headers={"Authorization": "Bearer dummy"},
        )

    async def one(self, prompt: str) -> str:
        async with self.sem:
            resp = await self.client.post(self.url, json=request_body(prompt))
            resp.raise_for_status()
            data = resp.json()
        return data["choices"][0]["text"]

    async def aclose(self) -> None:
        await self.client.aclose()


class OpenAIClient(AiohttpClient):
    """The openai SDK as users call it (its own default connection limits)."""

    async def start(self, url: str, c: int) -> None:
        from openai import AsyncOpenAI
        self.sem = asyncio.Semaphore(c)
        self.client = AsyncOpenAI(base_url=url, api_key="dummy", max_retries=0, timeout=60)

    async def one(self, prompt: str) -> str:
        async with self.sem:
            resp = await self.client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return resp.choices[0].text

    async def aclose(self) -> None:
        await self.client.close()


class BatchgateClient:
    """batchgate's bulk path (issue 4): no Python coroutine per request."""

    async def start(self, url: str, c: int) -> None:
        import batchgate
        self.d = batchgate.Dispatcher(base_url=url, api_key="dummy", model=MODEL, max_concurrent=c)

    async def run(self, prompts: list[str]) -> list:
        results = await self.d.map(prompts, max_tokens=MAX_TOKENS, temperature=0, return_exceptions=True)
        return [r if isinstance(r, BaseException) else r.text for r in results]

    async def aclose(self) -> None:
        close = getattr(self.d, "aclose", None)
        if close is not None:
            await close()


CLIENT_CLASSES = {"aiohttp": AiohttpClient, "httpx": HttpxClient, "openai": OpenAIClient,
                  "batchgate": BatchgateClient}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def child_main(name: str, url: str, c: int, n: int, warmup: int, timeout: float) -> dict:
    if urlsplit(url).hostname != LOOPBACK:
        raise SystemExit(f"refusing non-loopback url {url}")
    deadline = time.monotonic() + timeout  # one budget for warm-up and timed run
    client = CLIENT_CLASSES[name]()
    await client.start(url, c)
    try:
        if warmup:
            await asyncio.wait_for(client.run(make_prompts(warmup, offset=n)), timeout)
        prompts = make_prompts(n)

        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            # How late a 1 ms sleep wakes = how long the loop was busy elsewhere.
            while not stop.is_set() and len(lags) < 10_000_000:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        results = await asyncio.wait_for(client.run(prompts), max(0.0, deadline - time.monotonic()))
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        stop.set()
        await tick
    finally:
        await client.aclose()
    ok = sum(isinstance(r, str) for r in results)
    first_error = next((repr(r)[:300] for r in results if not isinstance(r, str)), None)
    return {"rps": n / wall, "ok": ok, "first_error": first_error,
            "cpu_s": cpu_of(ru1) - cpu_of(ru0),
            "lag_p99_ms": percentile(lags, 0.99) * 1e3,
            "lag_max_ms": max(lags, default=float("nan")) * 1e3}


def child_entry(args: argparse.Namespace) -> int:
    if args.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        out = asyncio.run(child_main(args.child, args.url, args.concurrency, args.requests,
                                     args.warmup, args.timeout))
    except Exception as exc:  # reported in the table, not a traceback wall
        out = {"error": f"{args.child}: {type(exc).__name__}: {exc}"[:800]}
    print(json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------- report

def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def report(results: dict, concurrencies: list[int], clients: list[str], notes: dict) -> str:
    lines = []
    head = (f"{'client':<10} {'conc':>5} {'req/s':>10} {'CPU-s/10k':>10} {'lag p99 ms':>11} "
            f"{'RSS MiB':>8} {'x aiohttp':>10} {'% of C':>7} {'CPU x C':>8} {'errors':>7}")
    for c in concurrencies:
        lines += ["", head, "-" * len(head)]
        med = {name: {k: median_of(results.get((name, c), []), k)
                      for k in ("rps", "cpu_per_10k", "lag_p99_ms", "rss_mib", "errors")}
               for name in clients}
        base_aio = med.get("aiohttp", {}).get("rps")
        base_c = med.get("c-curl", {}).get("rps")
        base_c_cpu = med.get("c-curl", {}).get("cpu_per_10k")
        for name in clients:
            if name in notes:
                lines.append(f"{name:<10} {c:>5} {notes[name]}")
                continue
            runs = results.get((name, c), [])
            m = med[name]
            if m["rps"] is None:
                err = next((r["error"] for r in runs if "error" in r), "no result")
                lines.append(f"{name:<10} {c:>5} FAILED: {err[:200]}")
                continue
            x_aio = m["rps"] / base_aio if base_aio else None
            pct_c = 100 * m["rps"] / base_c if base_c else None
            cpu_c = m["cpu_per_10k"] / base_c_cpu if base_c_cpu and m["cpu_per_10k"] else None
            lines.append(
                f"{name:<10} {c:>5} {fmt(m['rps'], ',.0f'):>10} {fmt(m['cpu_per_10k'], '.3f'):>10} "
                f"{fmt(m['lag_p99_ms'], '.2f'):>11} {fmt(m['rss_mib'], '.1f'):>8} "
                f"{fmt(x_aio, '.2f'):>10} {fmt(pct_c, '.1f'):>7} {fmt(cpu_c, '.2f'):>8} "
                f"{fmt(m['errors'], '.0f'):>7}")
            failed = [r["error"] for r in runs if "error" in r]
            if failed:
                lines.append(f"{'':<10} {'':>5} ({len(failed)} of {len(runs)} runs failed: {failed[0][:150]})")
            first = next((r.get("first_error") for r in runs if r.get("first_error")), None)
            if first:
                lines.append(f"{'':<10} {'':>5} first error: {first[:150]}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, help="timed requests per client run (default 10000, quick 2000)")
    p.add_argument("--repeats", type=int, help="runs per client and concurrency; medians reported (default 3, quick 1)")
    p.add_argument("--concurrency", default="20,256", help="comma-separated list (default 20,256)")
    p.add_argument("--clients", default=",".join(ALL_CLIENTS), help="comma-separated subset of " + ",".join(ALL_CLIENTS))
    p.add_argument("--warmup", type=int, help="untimed requests before each client run (default min(N, max(2c, 500)))")
    p.add_argument("--wrk-duration", type=float, help="seconds per wrk run (default 5, quick 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per client run (default 300)")
    p.add_argument("--uvloop", action="store_true", help="run the asyncio clients on uvloop")
    p.add_argument("--baseline", type=Path, help="also run client bg-base: batchgate imported from "
                   "this directory (one holding a batchgate package), right after batchgate")
    p.add_argument("--quick", action="store_true", help="small smoke run: 2000 requests, 1 repeat, 2 s wrk")
    p.add_argument("--json-out", type=Path, help="also write raw per-run results as JSON here")
    p.add_argument("--child", choices=ASYNC_CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.concurrency = int(args.concurrency)
        return args
    args.requests = args.requests or (2000 if args.quick else 10000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.wrk_duration = args.wrk_duration or (2.0 if args.quick else 5.0)
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x]
    args.clients = [x for x in args.clients.split(",") if x]
    if args.baseline is not None:
        if not (args.baseline / "batchgate" / "__init__.py").is_file():
            p.error(f"--baseline {args.baseline}: no batchgate package in it")
        args.baseline = args.baseline.resolve()
        if "bg-base" not in args.clients:
            at = args.clients.index("batchgate") + 1 if "batchgate" in args.clients else len(args.clients)
            args.clients.insert(at, "bg-base")
    elif "bg-base" in args.clients:
        p.error("client bg-base needs --baseline DIR")
    unknown = set(args.clients) - set(ALL_CLIENTS) - {"bg-base"}
    if unknown:
        p.error(f"unknown clients: {', '.join(sorted(unknown))}")
    if args.requests < 1 or args.repeats < 1 or any(c < 1 for c in args.concurrency):
        p.error("--requests, --repeats and concurrencies must be >= 1")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_entry(args)

    for tool in ("nginx", "gcc", "pkg-config") + (("wrk",) if "wrk" in args.clients else ()):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2

    results: dict[tuple[str, int], list[dict]] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bg-bench-") as tmp:
        workdir = Path(tmp)
        exe = build_c_client(workdir) if "c-curl" in args.clients else None
        if "batchgate" in args.clients:
            ok, why = batchgate_available(workdir)
            if not ok:
                notes["batchgate"] = f"batchgate: not available ({why})"
        if "bg-base" in args.clients:
            ok, why = batchgate_available(workdir, str(args.baseline))
            if not ok:
                notes["bg-base"] = f"bg-base: not available ({why})"
        server = Nginx(workdir, completion_body())
        # SIGTERM becomes an exception so the finally below stops nginx.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            server.start()
            url = server.base_url
            la = os.getloadavg()
            print(f"nginx {url} | {os.cpu_count()} cpus, load {la[0]:.2f} | python "
                  f"{platform.python_version()} {'uvloop' if args.uvloop else 'asyncio'} | "
                  f"N={args.requests} repeats={args.repeats} wrk {args.wrk_duration:g}s", flush=True)
            for rep in range(args.repeats):
                for c in args.concurrency:
                    warmup = args.warmup if args.warmup is not None else min(args.requests, max(2 * c, 500))
                    for name in args.clients:
                        if name in notes:
                            continue
                        if not server.alive():
                            raise RuntimeError("nginx died")
                        t0 = time.monotonic()
                        if name == "wrk":
                            r = run_wrk(url, c, args.wrk_duration, args.wrk_duration + 30, workdir)
                        elif name == "c-curl":
                            r = run_c(exe, url, c, args.requests, warmup, args.timeout, workdir)
                        elif name == "bg-base":
                            r = run_python_client("batchgate", url, c, args.requests, warmup,
                                                  args.timeout, args.uvloop, workdir,
                                                  str(args.baseline))
                        else:
                            r = run_python_client(name, url, c, args.requests, warmup, args.timeout,
                                                  args.uvloop, workdir)
                        results.setdefault((name, c), []).append(r)
                        status = r.get("error") or f"{r['rps']:,.0f} req/s"
                        print(f"  [{rep + 1}/{args.repeats}] c={c:<4} {name:<10} {status[:160]} "
                              f"({time.monotonic() - t0:.1f}s)", flush=True)
        finally:
            server.stop()
    print(report(results, args.concurrency, args.clients, notes))
    la = os.getloadavg()
    print(f"\nload average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cpus"
          " (other work on the machine makes req/s noisy; CPU-s/10k is steadier)")
    if args.baseline is not None:
        print(f"bg-base: batchgate from {args.baseline}")
    print("\nreq/s, CPU and lag are medians over repeats. CPU-s/10k = user+sys of the client process"
          " over the timed requests (wrk: whole process). RSS = peak of the client process."
          " lag = lateness of a 1 ms asyncio sleep during the run.")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(
            {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "results": [{"client": k[0], "concurrency": k[1], "runs": v} for k, v in results.items()]},
            indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); nginx stopped", file=sys.stderr)
        sys.exit(130)
