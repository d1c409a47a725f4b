"""batchgate.Semaphore vs asyncio.Semaphore: acquire/release throughput.

    python benchmarks/bench_semaphore.py [--runs 5] [--scale 1.0] [--uvloop]

Each case runs both implementations in the same process, several times,
alternating; the median ops/s of each is printed with the ratio
batchgate / asyncio (> 1: batchgate is faster).
"""
import argparse
import asyncio
import statistics
import threading
import time

import batchgate

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

IMPLS = {"asyncio": asyncio.Semaphore, "batchgate": batchgate.Semaphore}


async def uncontended_methods(Sem, n):
    sem = Sem(1)
    t0 = time.perf_counter()
    for _ in range(n):
        await sem.acquire()
        sem.release()
    return n / (time.perf_counter() - t0)


async def uncontended_async_with(Sem, n):
    sem = Sem(1)
    t0 = time.perf_counter()
    for _ in range(n):
        async with sem:
            pass
    return n / (time.perf_counter() - t0)


async def contended(Sem, n, tasks, value):
    """tasks workers, value permits; every holder yields once inside, so
    most acquires wait and are woken by a release (the slow path)."""
    sem = Sem(value)
    per = n // tasks

    async def worker():
        for _ in range(per):
            async with sem:
                await asyncio.sleep(0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return per * tasks / (time.perf_counter() - t0)


async def fan_in(Sem, n, tasks):
    """tasks waiters queued at once, then released one by one from the loop."""
    sem = Sem(0)
    done = 0

    async def worker():
        nonlocal done
        await sem.acquire()
        done += 1

    t0 = time.perf_counter()
    rounds = max(1, n // tasks)
    for _ in range(rounds):
        ts = [asyncio.ensure_future(worker()) for _ in range(tasks)]
        await asyncio.sleep(0)
        for _ in range(tasks):
            sem.release()
        await asyncio.gather(*ts)  # each worker keeps its permit: value is 0 again
    return rounds * tasks / (time.perf_counter() - t0)


def blocking_uncontended(Sem, n):
    if Sem is asyncio.Semaphore:
        sem = threading.Semaphore(1)
        acq = sem.acquire
    else:
        sem = Sem(1)
        acq = sem.acquire_blocking
    rel = sem.release
    t0 = time.perf_counter()
    for _ in range(n):
        acq()
        rel()
    return n / (time.perf_counter() - t0)


def measure(case, runs, loop_factory):
    results = {name: [] for name in IMPLS}
    for _ in range(runs):
        for name, Sem in IMPLS.items():
            if asyncio.iscoroutinefunction(case):
                with asyncio.Runner(loop_factory=loop_factory) as r:
                    results[name].append(r.run(case(Sem)))
            else:
                results[name].append(case(Sem))
    return {name: statistics.median(v) for name, v in results.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply operation counts")
    ap.add_argument("--uvloop", action="store_true", help="run the asyncio cases on uvloop")
    args = ap.parse_args()
    if args.uvloop and uvloop is None:
        raise SystemExit("uvloop is not installed")
    loop_factory = uvloop.new_event_loop if args.uvloop else None
    k = args.scale

    def n(x):
        return max(1, int(x * k))

    cases = [
        ("uncontended acquire()+release()", lambda S: uncontended_methods(S, n(200_000))),
        ("uncontended async with", lambda S: uncontended_async_with(S, n(200_000))),
        ("contended 100 tasks, value 4", lambda S: contended(S, n(100_000), 100, 4)),
        ("contended 1000 tasks, value 1", lambda S: contended(S, n(100_000), 1000, 1)),
        ("fan-in 1000 waiters", lambda S: fan_in(S, n(100_000), 1000)),
    ]
    loop_name = "uvloop" if args.uvloop else "asyncio default loop"
    print(f"batchgate.Semaphore vs asyncio.Semaphore on {loop_name}; "
          f"medians of {args.runs} runs (ops/s)")
    print(f"{'case':34s} {'asyncio':>12s} {'batchgate':>12s} {'ratio':>7s}")
    for title, fn in cases:
        async def case(S, fn=fn):
            return await fn(S)
        med = measure(case, args.runs, loop_factory)
        print(f"{title:34s} {med['asyncio']:12,.0f} {med['batchgate']:12,.0f} "
              f"{med['batchgate'] / med['asyncio']:6.2f}x")
    med = measure(lambda S: blocking_uncontended(S, n(300_000)), args.runs, None)
    print(f"{'threads: acquire_blocking vs':34s} {med['asyncio']:12,.0f} {med['batchgate']:12,.0f} "
          f"{med['batchgate'] / med['asyncio']:6.2f}x")
    print(f"{'  threading.Semaphore (uncontended)':34s}")


if __name__ == "__main__":
    main()
