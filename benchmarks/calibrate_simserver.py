"""Fit the simulator's step-time model to a real vLLM server.

batchgate.simserver models one engine step as

    step = base + prefill_token * (tokens prefilled in the step)
                + decode_seq * (sequences decoding one token in the step)

This script measures a real vLLM (the CPU build with the tier's tiny Qwen2 model, see
tests/vllm_tier; or any server via --url) and fits the three constants by least squares:

1. prefill: one request at a time with 1, 2, 4, 8 prompts of 448 random token ids,
   ``max_tokens=1`` (prefix caching off, so every prompt is computed): latency = HTTP +
   the prefill; the slope over the 448 .. 3,584 tokens is ``prefill_token``.
2. decode, batch 1: one request of 8 prompt tokens, ``ignore_eos`` and ``max_tokens`` N of
   1 .. 97: the slope over N is one decode step of one sequence (``base + decode_seq``).
3. decode, batch C: C requests at once, each ``ignore_eos`` and 64 tokens, C = 1 .. 16:
   (wall - the C prefills) / 63 is the step time with C sequences; its slope over C is
   ``decode_seq`` and the intercept ``base``.
4. context length: batch 1 with a 440-token prompt against an 8-token one, to see how much
   a long context slows each decode step (the model leaves it out; reported, not fitted).

Each point is the fastest of --repeats runs (other load only adds time). Prints the points, the fit, the residuals and
the simserver flags that reproduce it:

    /work/venvs/vllm/bin/python benchmarks/calibrate_simserver.py \\
        --model-dir ~/.cache/batchgate/tiny-qwen2 [--repeats 5] [--json out.json]

Also runs against the simulator itself (--simserver), which checks the method: the fit
must give back the constants the simulator was started with.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm_tier"))


class Client:
    def __init__(self, base_url: str, model: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.rng = random.Random(1234)

    def ids(self, n: int) -> List[int]:
        # Random ids from the ordinary part of the vocabulary: no two prompts share a
        # prefix, so a prefix cache (if on) cannot skip work.
        return [self.rng.randrange(1000, 30000) for _ in range(n)]

    def complete(self, prompt_len: int, max_tokens: int, prompts: int = 1
                 ) -> Tuple[float, Dict[str, Any]]:
        prompt: Any = (self.ids(prompt_len) if prompts == 1
                       else [self.ids(prompt_len) for _ in range(prompts)])
        body = json.dumps({"model": self.model, "prompt": prompt,
                           "max_tokens": max_tokens, "ignore_eos": True,
                           "temperature": 0.0}).encode()
        req = urllib.request.Request(self.base_url + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as resp:
            data = json.loads(resp.read())
        dt = time.perf_counter() - t0
        got = data["usage"]["completion_tokens"]
        if got != max_tokens * prompts:
            raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos, got {got}")
        return dt, data

    def batch(self, count: int, prompt_len: int, max_tokens: int) -> float:
        """Wall time of `count` requests sent at once."""
        errors: List[BaseException] = []

        def one() -> None:
            try:
                self.complete(prompt_len, max_tokens)
            except BaseException as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=one) for _ in range(count)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float, float]:
    """(slope, intercept, max |relative residual|)."""
    slope, intercept = statistics.linear_regression(xs, ys)
    worst = max(abs(y - (slope * x + intercept)) / y for x, y in zip(xs, ys))
    return slope, intercept, worst


class Meter:
    """Wall time and, for a local server, the CPU time its engine processes use.

    On a shared machine other processes only ever add wall time, so the fastest of the
    repeats is the closest to the server's own cost. CPU seconds of vLLM's engine core
    and worker (read from /proc for the server's process group) hardly depend on what
    else runs, so they give a second, load-proof estimate of the step cost (the engine
    core and the worker run one after the other in a step; the API server's HTTP and
    detokenizing run beside them and are left out)."""

    def __init__(self, pgid: Optional[int]) -> None:
        self.pgid = pgid
        self.tick = os.sysconf("SC_CLK_TCK") if pgid else 100

    def engine_cpu(self) -> Optional[float]:
        if not self.pgid:
            return None
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            # fields[2] = pgrp, [11] = utime, [12] = stime (proc(5), after comm)
            if int(fields[2]) == self.pgid and comm.startswith("VLLM::"):
                total += int(fields[11]) + int(fields[12])
        return total / self.tick

    def point(self, repeats: int, fn, *args: Any) -> Tuple[float, Optional[float]]:
        walls, cpus = [], []
        for _ in range(repeats):
            c0 = self.engine_cpu()
            t0 = time.perf_counter()
            fn(*args)
            walls.append(time.perf_counter() - t0)
            c1 = self.engine_cpu()
            if c0 is not None and c1 is not None:
                cpus.append(c1 - c0)
        return min(walls), (statistics.median(cpus) if cpus else None)


def measure(c: Client, m: Meter, repeats: int, max_batch: int) -> Dict[str, Any]:
    c.batch(2, 16, 8)  # warm-up
    out: Dict[str, Any] = {}

    def show(title: str, key: str, unit: str) -> None:
        print(f"{title:<30}" + "  ".join(
            f"{x}{unit} {1e3 * w:.1f} ms" + (f" (cpu {1e3 * cpu:.1f})" if cpu is not None
                                             else "")
            for x, w, cpu in out[key]), flush=True)
    # k prompts of 448 tokens in one request: up to 3,584 tokens prefilled, a signal well
    # above the machine's noise (one step, or a few with a small max_num_batched_tokens).
    out["prefill"] = [(448 * k, *m.point(repeats, c.complete, 448, 1, k)) for k in (1, 2, 4, 8)]
    show("1. prefill (max_tokens=1):", "prefill", " tok")
    out["decode1"] = [(n, *m.point(repeats, c.complete, 8, n)) for n in (1, 17, 33, 65, 97)]
    show("2. batch 1, 8-token prompt:", "decode1", " tok")
    out["batch"] = [(C, *m.point(repeats, c.batch, C, 8, 64))
                    for C in (1, 2, 4, 8, 16) if C <= max_batch]
    show("3. C at once, 64 tokens:", "batch", " seqs")
    out["long_ctx"] = [(n, *m.point(repeats, c.complete, 440, n)) for n in (1, 65)]
    show("4. batch 1, 440-token prompt:", "long_ctx", " tok")
    return out


def fit(points: Dict[str, Any], col: int) -> Optional[Dict[str, float]]:
    """Fit on column 1 (wall) or 2 (engine CPU)."""
    if any(p[col] is None for ps in points.values() for p in ps):
        return None

    def xy(key: str) -> Tuple[List[float], List[float]]:
        return [p[0] for p in points[key]], [p[col] for p in points[key]]
    lens, pre = xy("prefill")
    prefill_token, http_plus_step, r1 = fit_line(lens, pre)
    ns, d1 = xy("decode1")
    step1, _, r2 = fit_line(ns, d1)
    cs, walls = xy("batch")
    # Each request: one prefill step (8 tokens) then 63 decode steps; the C prefills
    # share steps, so take one prefill step off and divide by the 63 decode steps.
    # The first step: HTTP + one short prefill, about the batch-1 one-token latency.
    first = dict(zip(ns, d1))[1]
    per_step = [(w - first) / 63 for w in walls]
    decode_seq, base, r3 = fit_line(cs, per_step)
    _, (l1, l65) = xy("long_ctx")
    long_step = (l65 - l1) / 64
    return {"prefill_token_s": prefill_token, "prefill_intercept_s": http_plus_step,
            "prefill_fit_max_rel_residual": r1, "batch1_step_s": step1,
            "batch1_fit_max_rel_residual": r2, "decode_seq_s": decode_seq, "base_s": base,
            "batch_fit_max_rel_residual": r3,
            "per_step_at_C": dict(zip(cs, per_step)),
            "batch1_step_440_ctx_s": long_step,
            "context_slowdown": long_step / step1 if step1 > 0 else float("nan")}


def report(f: Dict[str, float], what: str) -> None:
    print(f"\nfit on {what}:")
    print(f"  prefill_token = {1e6 * f['prefill_token_s']:.1f} us/token "
          f"(intercept {1e3 * f['prefill_intercept_s']:.1f} ms = HTTP + one step; "
          f"worst residual {100 * f['prefill_fit_max_rel_residual']:.1f} %)")
    print(f"  step at batch 1 = {1e3 * f['batch1_step_s']:.2f} ms "
          f"(worst residual {100 * f['batch1_fit_max_rel_residual']:.1f} %)")
    print("  step at batch C: " + "  ".join(
        f"C={C} {1e3 * s:.2f} ms" for C, s in f["per_step_at_C"].items()))
    print(f"  base = {1e3 * f['base_s']:.2f} ms, decode_seq = {1e6 * f['decode_seq_s']:.0f} "
          f"us/sequence (worst residual {100 * f['batch_fit_max_rel_residual']:.1f} %)")
    print(f"  440-token context: step {1e3 * f['batch1_step_440_ctx_s']:.2f} ms at batch 1 "
          f"(x{f['context_slowdown']:.2f} the 8-token one; not modelled)")
    base = max(f["base_s"], 1e-6)
    print(f"  shape: one prefill token = {f['prefill_token_s'] / base:.4f} base, one "
          f"decoding sequence = {f['decode_seq_s'] / base:.3f} base")
    print(f"\nsimserver flags: --step-base-s {f['base_s']:.5f} --step-prefill-token-s "
          f"{max(0.0, f['prefill_token_s']):.7f} --step-decode-seq-s "
          f"{max(0.0, f['decode_seq_s']):.6f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=os.path.expanduser(
        "~/.cache/batchgate/tiny-qwen2"), help="the tier's tiny model")
    ap.add_argument("--url", help="a running server's /v1 URL instead of starting vLLM")
    ap.add_argument("--model", help="served model name with --url")
    ap.add_argument("--pgid", type=int,
                    help="with --url: the local server's process group, for the CPU meter")
    ap.add_argument("--simserver", action="store_true",
                    help="measure batchgate.simserver (checks the method)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the points and the fit here")
    args = ap.parse_args()

    server = None
    sim = None
    if args.simserver:
        from batchgate.simserver import SimServerThread
        sim = SimServerThread(kv_cache_tokens=32768, max_model_len=512, max_num_seqs=16,
                              step_base_s=0.004, step_prefill_token_s=0.00002,
                              step_decode_seq_s=0.0003)
        url = sim.start() + "/v1"
        model = sim.server.model
        print("simserver: base 4.00 ms, prefill 20.0 us/token, decode 300 us/sequence")
    elif args.url:
        url, model = args.url, args.model
    else:
        import serve
        # Room for 16 x 512 tokens: no preemption while measuring; prefix caching off.
        server = serve.VllmServer(args.model_dir, max_model_len=512, max_num_seqs=16,
                                  num_blocks=None, block_size=32, kv_cache_bytes=64 << 20,
                                  extra_args=["--no-enable-prefix-caching"])
        print("starting vLLM (CPU) ...", flush=True)
        server.start()
        url, model = server.base_url, server.model_name
        print(f"vLLM up in {server.start_seconds:.0f} s: {url}", flush=True)
    try:
        load = os.getloadavg()
        print(f"load before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
        pgid = server.proc.pid if server is not None and server.proc is not None else args.pgid
        points = measure(Client(url, model), Meter(pgid), args.repeats, 16)
        f = fit(points, 1)
        report(f, "wall time (fastest of the repeats)")
        fc = fit(points, 2)
        if fc is not None:
            report(fc, "engine CPU time (median of the repeats)")
        f = {"wall": f, "cpu": fc}
        load = os.getloadavg()
        print(f"load after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"points": points, "fit": f}, fh, indent=1)
    finally:
        if server is not None:
            server.stop()
        if sim is not None:
            sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
