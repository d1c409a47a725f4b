"""The simulated engine: a paged KV cache, continuous batching and preemption.

Model (close to vLLM v1's scheduler, without chunked prefill or prefix caching):

- The KV cache has ``kv_cache_tokens // block_size`` blocks. A sequence holds
  ``ceil(kv_tokens / block_size)`` blocks, where ``kv_tokens`` is its prompt
  plus the tokens generated so far.
- Each engine step first gives every running sequence room for one more
  token, oldest first. When no block is free, ``mode="preempt"`` evicts the
  newest running sequence (frees its blocks, puts it back at the head of the
  waiting queue; its prompt and generated tokens are recomputed when it is
  admitted again), as vLLM does for recompute preemption; ``mode="naive"``
  fails the sequence that needed the block with an out-of-memory error.
- Then, if nothing was preempted, waiting sequences are admitted in arrival
  order while ``running < max_num_seqs``, the step's token budget allows and
  (preempt mode) their blocks are free. In naive mode a sequence is admitted
  without looking at memory and fails with out-of-memory when its blocks
  cannot be allocated.
- The step lasts ``step_base_s + step_prefill_token_s * prefill_tokens +
  step_decode_seq_s * decode_seqs``: a fixed cost (weights read, kernel
  launches, scheduler), a cost per prompt token prefilled in the step
  (including the tokens a preempted sequence recomputes when it is admitted
  again, which is what makes preemption expensive) and a cost per sequence
  decoding one token. That is the shape of a real vLLM step (see
  benchmarks/calibrate_simserver.py for the fit against the CPU build). Then
  every scheduled sequence has one more token, and a sequence that reached its
  target length finishes.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Deque, Dict, List, Optional

WAITING, RUNNING, FINISHED, ABORTED = range(4)
MODES = ("preempt", "naive")
# vLLM v1's buckets for vllm:e2e_request_latency_seconds.
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
MAX_LATENCIES = 1_000_000  # exact latencies kept for percentiles; past that, the histogram only


def _percentile(values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile, None without values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(len(s) * q / 100) - 1))]


class OutOfMemory(Exception):
    """The simulated GPU had no free KV-cache block for a sequence (naive mode)."""


class Sequence:
    """One prompt being generated (one choice of one request)."""

    __slots__ = ("prompt_tokens", "target", "generated", "blocks", "state",
                 "future", "finish_reason", "admitted_before", "preemptions", "t_arrival")

    def __init__(self, prompt_tokens: int, target: int, finish_reason: str,
                 future: "asyncio.Future[Sequence]") -> None:
        self.prompt_tokens = prompt_tokens
        self.target = target                  # tokens to generate, >= 1
        self.finish_reason = finish_reason    # reported when target is reached
        self.future = future
        self.generated = 0
        self.blocks = 0
        self.state = WAITING
        self.admitted_before = False
        self.preemptions = 0
        self.t_arrival = 0.0


class Timeline:
    """KV usage, running, waiting and the cumulative preemptions and
    out-of-memory failures over time, sampled at engine steps.

    A sample is kept when at least ``interval_s`` passed since the previous
    one; past ``max_samples`` every other sample is dropped and the interval
    doubles, so memory stays bounded on long runs.
    """

    def __init__(self, interval_s: float = 0.005, max_samples: int = 100_000) -> None:
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.clear()

    def clear(self) -> None:
        self.t0 = time.monotonic()
        self.t: List[float] = []
        self.kv_cache_usage: List[float] = []
        self.running: List[int] = []
        self.waiting: List[int] = []
        self.preemptions: List[int] = []
        self.oom_errors: List[int] = []
        self._last = -1e300

    def record(self, now: float, kv: float, running: int, waiting: int,
               preemptions: int = 0, oom_errors: int = 0, force: bool = False) -> None:
        t = now - self.t0
        if force:  # an idle sample: skip when nothing changed since the last one
            if self.t and (self.kv_cache_usage[-1], self.running[-1], self.waiting[-1],
                           self.preemptions[-1], self.oom_errors[-1]) == (
                               kv, running, waiting, preemptions, oom_errors):
                return
        elif t - self._last < self.interval_s:
            return
        self._last = t
        self.t.append(t)
        self.kv_cache_usage.append(kv)
        self.running.append(running)
        self.waiting.append(waiting)
        self.preemptions.append(preemptions)
        self.oom_errors.append(oom_errors)
        if len(self.t) > self.max_samples:
            for series in self._series():
                del series[1::2]
            self.interval_s = max(self.interval_s * 2, 1e-6)

    def _series(self) -> List[list]:
        return [self.t, self.kv_cache_usage, self.running, self.waiting,
                self.preemptions, self.oom_errors]

    def snapshot(self, since: float = -1.0) -> Dict[str, list]:
        """Copies of the series, from the first sample with ``t > since``."""
        start = 0
        if since >= 0:
            lo, hi = 0, len(self.t)
            while lo < hi:
                mid = (lo + hi) // 2
                if self.t[mid] <= since:
                    lo = mid + 1
                else:
                    hi = mid
            start = lo
        return {
            "t": self.t[start:],
            "kv_cache_usage": self.kv_cache_usage[start:],
            "running": self.running[start:],
            "waiting": self.waiting[start:],
            "preemptions": self.preemptions[start:],
            "oom_errors": self.oom_errors[start:],
        }


class Engine:
    """Scheduler and step loop; runs as a task on the server's event loop."""

    def __init__(self, *, kv_cache_tokens: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: Optional[int], mode: str,
                 step_base_s: float, step_prefill_token_s: float, step_decode_seq_s: float,
                 timeline_interval_s: float, timeline_max_samples: int) -> None:
        def positive_int(name: str, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            return value

        def non_negative(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value}")
            return float(value)

        self.block_size = positive_int("block_size", block_size)
        positive_int("kv_cache_tokens", kv_cache_tokens)
        self.num_blocks = kv_cache_tokens // block_size
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_tokens ({kv_cache_tokens}) holds no block of "
                             f"{block_size} tokens")
        self.max_model_len = positive_int("max_model_len", max_model_len)
        if max_model_len > self.num_blocks * block_size:
            # vLLM refuses to start in this case too: one sequence could never fit.
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the KV cache "
                f"({self.num_blocks} blocks of {block_size} = "
                f"{self.num_blocks * block_size} tokens); raise kv_cache_tokens or "
                f"lower max_model_len")
        self.max_num_seqs = positive_int("max_num_seqs", max_num_seqs)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(8192, max_model_len)
        self.max_num_batched_tokens = positive_int("max_num_batched_tokens",
                                                   max_num_batched_tokens)
        if mode not in MODES:
            raise ValueError(f"mode must be 'preempt' or 'naive', not {mode!r}")
        self.mode = mode
        self.naive = mode == "naive"
        self.step_base_s = non_negative("step_base_s", step_base_s)
        self.step_prefill_token_s = non_negative("step_prefill_token_s", step_prefill_token_s)
        self.step_decode_seq_s = non_negative("step_decode_seq_s", step_decode_seq_s)

        self.free_blocks = self.num_blocks
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.timeline = Timeline(non_negative("timeline_interval_s", timeline_interval_s),
                                 positive_int("timeline_max_samples", timeline_max_samples))
        self._prefill_this_step = 0
        self._decode_this_step = 0
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self.reset_stats()

    # -- statistics ---------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero the counters, peaks and timeline (not the queues)."""
        self.num_preemptions = 0
        self.num_oom_errors = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.recomputed_tokens_total = 0
        self.success_total = {"stop": 0, "length": 0}
        self.steps_total = 0
        self.busy_s = 0.0    # modelled step time, the sum of every step's dt
        self.idle_s = 0.0    # wall time with nothing running or waiting
        self._idle_since: Optional[float] = (time.monotonic()
                                             if getattr(self, "_idle_since", None) else None)
        self.latencies: List[float] = []  # arrival -> finish of each finished sequence
        self.e2e_buckets = [0] * (len(E2E_BUCKETS) + 1)
        self.e2e_sum = 0.0
        self.peak_kv_cache_usage = self.kv_cache_usage
        self.peak_running = len(self.running)
        self.peak_waiting = len(self.waiting)
        self.timeline.clear()

    @property
    def kv_cache_usage(self) -> float:
        return (self.num_blocks - self.free_blocks) / self.num_blocks

    def stats(self) -> Dict[str, Optional[float]]:
        return {
            "num_requests_running": len(self.running),
            "num_requests_waiting": len(self.waiting),
            "kv_cache_usage_perc": self.kv_cache_usage,
            "num_preemptions": self.num_preemptions,
            "num_oom_errors": self.num_oom_errors,
            "prompt_tokens": self.prompt_tokens_total,
            "generation_tokens": self.generation_tokens_total,
            "recomputed_tokens": self.recomputed_tokens_total,
            "steps": self.steps_total,
            "busy_s": self.busy_s,
            "idle_s": self.idle_s + (time.monotonic() - self._idle_since
                                     if self._idle_since is not None else 0.0),
            "finished": sum(self.e2e_buckets),
            "latency_p50_s": _percentile(self.latencies, 50),
            "latency_p99_s": _percentile(self.latencies, 99),
            "peak_kv_cache_usage": self.peak_kv_cache_usage,
            "peak_running": self.peak_running,
            "peak_waiting": self.peak_waiting,
        }

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(self._wake))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for seq in list(self.running) + list(self.waiting):
            self.abort(seq)
            if not seq.future.done():
                seq.future.cancel()

    # -- requests -----------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        seq.t_arrival = time.monotonic()
        self.waiting.append(seq)
        if len(self.waiting) > self.peak_waiting:
            self.peak_waiting = len(self.waiting)
        if self._wake is None:
            raise RuntimeError("Engine.submit() before start()")
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Forget a sequence whose client went away; frees its blocks."""
        if seq.state == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq.state == RUNNING:
            self.running.remove(seq)
            self.free_blocks += seq.blocks
            seq.blocks = 0
        seq.state = ABORTED

    # -- the step loop ------------------------------------------------------

    def _fail_oom(self, seq: Sequence, needed: int) -> None:
        free = self.free_blocks
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.state = ABORTED
        self.num_oom_errors += 1
        if not seq.future.done():
            seq.future.set_exception(OutOfMemory(
                f"CUDA out of memory (simulated): the KV cache is full; a sequence of "
                f"{seq.prompt_tokens + seq.generated} tokens needed {needed} more "
                f"block(s) of {self.block_size} tokens, {free} of {self.num_blocks} free"))

    def _schedule(self) -> List[Sequence]:
        """Allocate this step's blocks; return the sequences that run in it."""
        bs = self.block_size
        running = self.running
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(running):
            seq = running[i]
            # KV of the last sampled token is written in this step.
            need = (seq.prompt_tokens + seq.generated + bs - 1) // bs - seq.blocks
            if need > 0:
                if self.free_blocks < need and self.naive:
                    running.pop(i)
                    self._fail_oom(seq, need)
                    continue
                while self.free_blocks < need:
                    victim = running.pop()
                    self.free_blocks += victim.blocks
                    victim.blocks = 0
                    victim.state = WAITING
                    victim.preemptions += 1
                    self.num_preemptions += 1
                    self.waiting.appendleft(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.state != RUNNING:
                    break
                self.free_blocks -= need
                seq.blocks += need
            budget -= 1
            i += 1
        scheduled = list(running)
        self._decode_this_step = len(scheduled)

        waiting = self.waiting
        if not preempted:
            while waiting and len(running) < self.max_num_seqs:
                seq = waiting[0]
                tokens = seq.prompt_tokens + seq.generated
                if tokens > budget and len(scheduled) > 0:
                    break
                need = (tokens + bs - 1) // bs
                if need > self.free_blocks:
                    if not self.naive:
                        break
                    waiting.popleft()
                    self._fail_oom(seq, need)
                    continue
                waiting.popleft()
                self.free_blocks -= need
                seq.blocks = need
                seq.state = RUNNING
                running.append(seq)
                scheduled.append(seq)
                budget -= tokens
                if seq.admitted_before:
                    self.recomputed_tokens_total += tokens
                else:
                    seq.admitted_before = True
                    self.prompt_tokens_total += seq.prompt_tokens
        self._prefill_this_step = (self.max_num_batched_tokens - budget
                                   - self._decode_this_step)
        return scheduled

    def _commit(self, scheduled: List[Sequence]) -> None:
        running = self.running
        done = False
        generated = 0
        for seq in scheduled:
            if seq.state != RUNNING:  # aborted or preempted meanwhile
                continue
            seq.generated += 1
            generated += 1
            if seq.generated >= seq.target:
                seq.state = FINISHED
                self.free_blocks += seq.blocks
                seq.blocks = 0
                self.success_total[seq.finish_reason] += 1
                self._record_latency(time.monotonic() - seq.t_arrival)
                done = True
                if not seq.future.done():
                    seq.future.set_result(seq)
        self.generation_tokens_total += generated
        if done:
            self.running = [s for s in running if s.state == RUNNING]

    def _record_latency(self, dt: float) -> None:
        if len(self.latencies) < MAX_LATENCIES:
            self.latencies.append(dt)
        self.e2e_sum += dt
        i = 0
        while i < len(E2E_BUCKETS) and dt > E2E_BUCKETS[i]:
            i += 1
        self.e2e_buckets[i] += 1

    def _sample(self, now: float, force: bool = False) -> None:
        kv = self.kv_cache_usage
        nrun, nwait = len(self.running), len(self.waiting)
        if kv > self.peak_kv_cache_usage:
            self.peak_kv_cache_usage = kv
        if nrun > self.peak_running:
            self.peak_running = nrun
        if nwait > self.peak_waiting:
            self.peak_waiting = nwait
        self.timeline.record(now, kv, nrun, nwait, self.num_preemptions,
                             self.num_oom_errors, force)

    async def _run(self, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        sleep = asyncio.sleep
        clock = time.monotonic
        while True:
            if not self.running and not self.waiting:
                self._sample(clock(), force=True)
                wake.clear()
                self._idle_since = clock()
                await wake.wait()
                self.idle_s += clock() - self._idle_since
                self._idle_since = None
            start = loop.time()
            scheduled = self._schedule()
            self.steps_total += 1
            self._sample(clock())
            dt = (self.step_base_s + self.step_prefill_token_s * self._prefill_this_step
                  + self.step_decode_seq_s * self._decode_this_step)
            self.busy_s += dt
            await sleep(max(0.0, start + dt - loop.time()) if dt > 0 else 0)
            self._commit(scheduled)
