"""batchgate.ray.Generate vs Ray Data's own HttpRequestProcessorConfig + build_processor,
on the same simulated vLLM servers and rows, on a local Ray.

    python benchmarks/bench_ray.py --rows 1200 --repeats 3

Needs ray[data] plus pydantic and aiohttp (what ray.data.llm imports for its HTTP
processor; ray[llm] itself would pull vllm, which the HTTP processor does not use).
Starts N `python -m batchgate.simserver` processes on free 127.0.0.1 ports and a local
Ray (no dashboard, no usage stats). Scenarios:

  clean   every row answers
  faults  2 % of the rows get one HTTP 500 ([[sim:error-once]]), and one server is
          killed once a quarter of the rows are back

Ray's processor takes one URL, so it runs one processor per server over a third of the
rows each (the by-hand split a user would write); batchgate runs one map_batches over
all servers. Prints medians, ratios, rows/s over the whole run and "steady" (from the
first row back to the last, without Ray's actor start-up), client CPU (the driver plus every Ray process:
raylet, GCS, workers) and rows ok / failed / lost (lost = never came back because the
job raised).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

from _simproc import MODEL, SimServer


class Server(SimServer):
    """A simserver whose CPU time is read from /proc (kept when it is killed)."""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.last_cpu = self.cpu()
        super().kill()

    def cpu(self) -> float:
        if self.proc.poll() is not None:
            return getattr(self, "last_cpu", 0.0)
        return sum(_proc_cpu_parts(self.proc.pid))


_TICK = os.sysconf("SC_CLK_TCK")


def _descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def client_cpu(exclude: List[int]) -> float:
    """CPU seconds of this process and all its descendants but the servers."""
    skip = set(exclude)
    total = 0.0
    for p in _descendants(os.getpid()):
        if p in skip:
            continue
        if p == os.getpid():
            t = os.times()
            total += t.user + t.system  # children are counted as they are listed
        else:
            total += sum(_proc_cpu_parts(p))
    return total


def _proc_cpu_parts(pid: int) -> Tuple[float, ...]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return (0.0,)
    return tuple(int(x) / _TICK for x in fields[11:15])


def make_rows(n: int, faults: bool) -> List[Dict[str, Any]]:
    rows = []
    for i in range(n):
        p = f"Review {i}: 음식이 맛있고 직원이 친절했어요. 다시 방문할게요."
        if faults and i % 50 == 7:
            p += " [[sim:error-once]]"
        rows.append({"id": i, "prompt": p})
    return rows


def run_batchgate(ray, rows, servers, args, kill_after: Optional[int]):
    import batchgate.ray as bgr
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // args.batch_size))
    out = ds.map_batches(
        bgr.Generate, concurrency=args.actors, batch_size=args.batch_size,
        num_cpus=0.25,
        fn_constructor_kwargs=dict(
            base_url=[s.url for s in servers], model=MODEL,
            concurrency=args.actors, max_concurrent=args.max_concurrent,
            max_tokens=args.max_tokens, max_retries=3, backoff=0.1))
    return consume(out.iter_rows(), servers, kill_after,
                   ok=lambda r: r["status"] == "ok")


def run_ray_http(ray, rows, servers, args, kill_after: Optional[int]):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor
    parts = []
    k = len(servers)
    for j, s in enumerate(servers):
        cfg = HttpRequestProcessorConfig(
            url=s.url + "/completions", batch_size=args.batch_size,
            concurrency=args.ray_actors_per_server or max(1, args.actors // k),
            max_retries=3, base_retry_wait_time_in_s=0.1,
            http_request_stage=dict(num_cpus=0.25))
        proc = build_processor(
            cfg,
            preprocess=lambda row: dict(payload=dict(
                model=MODEL, prompt=row["prompt"], max_tokens=args.max_tokens)),
            postprocess=lambda row: dict(
                id=row["id"],
                text=(row["http_response"].get("choices") or [{}])[0].get("text"),
                error=str(row["http_response"].get("error") or "") or None))
        part = rows[j::k]
        parts.append(proc(ray.data.from_items(
            part, override_num_blocks=max(1, len(part) // args.batch_size))))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return consume(ds.iter_rows(), servers, kill_after, ok=lambda r: r["text"] is not None)


def consume(it, servers, kill_after, ok):
    got: List[Dict[str, Any]] = []
    err = None
    first = last = time.monotonic()
    k = len(servers)
    try:
        for r in it:
            if not got:
                first = time.monotonic()
            got.append(r)
            if kill_after is not None and len(got) == kill_after:
                # The server with the most rows still to come (Ray's processors own
                # the rows id % k == j; batchgate shares them, so any is the same).
                back = [0] * k
                for x in got:
                    back[x["id"] % k] += 1
                servers[back.index(min(back))].kill()
        last = time.monotonic()
    except Exception as e:  # the whole job failed: what was not returned is lost
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0]  # no terminal colours
        err = f"{type(e).__name__}: {msg[:160]}"
        last = time.monotonic()
    ids = [r["id"] for r in got]
    return dict(ok=sum(1 for r in got if ok(r)), failed=sum(1 for r in got if not ok(r)),
                returned=len(got), dupes=len(ids) - len(set(ids)), job_error=err,
                steady=(len(got) - 1) / (last - first) if len(got) > 1 and last > first else 0.0)


def measure(ray, fn, rows, args, faults: bool) -> Dict[str, Any]:
    servers = [Server(args.step_base_s) for _ in range(args.servers)]
    try:
        spids = [s.proc.pid for s in servers]
        c0, s0, t0 = client_cpu(spids), sum(s.cpu() for s in servers), time.monotonic()
        kill_after = len(rows) // 4 if faults else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fn(ray, rows, servers, args, kill_after)
        wall = time.monotonic() - t0
        res.update(wall=wall, rows_per_s=res["ok"] / wall,
                   client_cpu=client_cpu(spids) - c0,
                   server_cpu=sum(s.cpu() for s in servers) - s0,
                   lost=len(rows) - res["returned"])
        return res
    finally:
        for s in servers:
            s.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--actors", type=int, default=3,
                    help="actors per pipeline (Ray's: split over its per-server processors)")
    ap.add_argument("--ray-actors-per-server", type=int, default=0,
                    help="actors of each Ray processor (default: --actors / --servers); Ray's "
                    "HTTP stage has at most 4 requests in flight per actor")
    ap.add_argument("--batch-size", type=int, default=64, help="Ray's default is 64")
    ap.add_argument("--max-concurrent", type=int, default=24,
                    help="batchgate: requests in flight per server, whole pool")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--step-base-s", type=float, default=0.01, help="simulated decode step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scenarios", default="clean,faults")
    args = ap.parse_args()

    # Loopback only (see tests/test_ray.py): GCS on 127.0.0.1, and no cloud-metadata
    # probe from Ray's usage-stats module (it skips it when this file exists).
    home = tempfile.mkdtemp(prefix="bench-ray-home-")
    open(os.path.join(home, "ray_bootstrap_config.yaml"), "w").close()
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                      RAY_DATA_DISABLE_PROGRESS_BARS="1", HOME=home)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import ray
        import ray.data
        try:
            import ray.data.llm  # noqa: F401
            have_llm = True
        except ImportError as e:
            print(f"ray.data.llm is not importable ({e}); only batchgate runs",
                  file=sys.stderr)
            have_llm = False
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray {ray.__version__}, {args.rows} rows, {args.servers} simulated servers "
          f"(step {args.step_base_s * 1000:.0f} ms, {args.max_tokens} tokens per answer), "
          f"{args.actors} actors, batch {args.batch_size}, load before: "
          f"{os.getloadavg()[0]:.1f}")
    ways = [("batchgate.ray.Generate", run_batchgate)]
    if have_llm:
        ways.append(("Ray HttpRequestProcessor", run_ray_http))
    for _, fn in ways:  # warm Ray's worker pool; not counted
        measure(ray, fn, make_rows(2 * args.batch_size, False), args, False)
    table = []
    for scenario in args.scenarios.split(","):
        faults = scenario == "faults"
        rows = make_rows(args.rows, faults)
        reps = args.repeats
        results: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _ in ways}
        for r in range(reps):
            # Interleaved, first one way then the other, so load drift and Ray's
            # warm worker pool favour neither.
            for name, fn in (ways if r % 2 == 0 else ways[::-1]):
                results[name].append(measure(ray, fn, rows, args, faults))
        for name, _ in ways:
            rs = results[name]
            med = {k: statistics.median(x[k] for x in rs)
                   for k in ("wall", "rows_per_s", "steady", "client_cpu", "server_cpu", "ok", "failed",
                             "lost")}
            med["dupes"] = max(x["dupes"] for x in rs)
            med["job_error"] = next((x["job_error"] for x in rs if x["job_error"]), None)
            med["raised"] = sum(1 for x in rs if x["job_error"])
            med["runs"] = len(rs)
            med["lost_each"] = [x["lost"] for x in rs]
            med["failed_each"] = [x["failed"] for x in rs]
            table.append((scenario, name, med))
    print(f"\n{'scenario':8} {'way':26} {'wall s':>7} {'rows/s':>8} {'steady':>8} {'client CPU-s':>12} "
          f"{'server CPU-s':>12} {'ok':>5} {'failed':>6} {'lost':>5} {'dupes':>5}")
    for scenario, name, m in table:
        print(f"{scenario:8} {name:26} {m['wall']:7.2f} {m['rows_per_s']:8.1f} {m['steady']:8.1f} "
              f"{m['client_cpu']:12.2f} {m['server_cpu']:12.2f} {m['ok']:5.0f} "
              f"{m['failed']:6.0f} {m['lost']:5.0f} {m['dupes']:5d}")
        if m["job_error"]:
            print(f"{'':8} {'':26} job raised in {m['raised']} of {m['runs']} runs "
                  f"(lost per run {m['lost_each']}, failed per run {m['failed_each']}): "
                  f"{m['job_error'][:100]}")
    by = {(s, n): m for s, n, m in table}
    for scenario in args.scenarios.split(","):
        a = by.get((scenario, ways[0][0]))
        b = by.get((scenario, "Ray HttpRequestProcessor"))
        if a and b and b["rows_per_s"] > 0:
            st = a["steady"] / b["steady"] if b["steady"] else float("nan")
            print(f"{scenario}: batchgate / Ray processor throughput "
                  f"{a['rows_per_s'] / b['rows_per_s']:.1f}x (steady {st:.1f}x), "
                  f"client CPU per ok row "
                  f"{(a['client_cpu'] / max(a['ok'], 1)) / (b['client_cpu'] / max(b['ok'], 1)):.2f}x")
    print(f"medians of {args.repeats}; load after: {os.getloadavg()[0]:.1f}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
