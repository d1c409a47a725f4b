"""batchgate.Semaphore beyond asyncio's: releases from threads and from native
code, weighted acquires, acquire_blocking(), loops without add_reader, uvloop,
and that nothing leaks. (Equivalence with asyncio's is test_semaphore.py.)
"""
import asyncio
import gc
import random
import threading
import time
import weakref

import pytest

import batchgate
from semaphore_helpers import WAIT, _NoReaderLoop, loop_factories, run, spin



@pytest.fixture(params=list(loop_factories()))
def loop_factory(request):
    return request.param


def test_bg_exports():
    assert issubclass(batchgate.BoundedSemaphore, batchgate.Semaphore)
    assert batchgate.Semaphore(3).bound is None
    assert batchgate.BoundedSemaphore(3).bound == 3


def test_bg_works_on_loop(loop_factory):
    async def main():
        sem = batchgate.Semaphore(0)
        a = asyncio.create_task(sem.acquire())
        b = asyncio.create_task(sem.acquire())
        await spin()
        sem.release()
        a.cancel()
        assert await asyncio.wait_for(b, WAIT)
        sem.release()
        assert sem.value == 1

    run(main(), loop_factory)


def test_bg_release_from_other_threads(loop_factory):
    async def main():
        sem = batchgate.Semaphore(0)
        n = 300
        got = []

        async def worker(i):
            await sem.acquire()
            got.append(i)

        tasks = [asyncio.create_task(worker(i)) for i in range(n)]
        await spin()

        def releaser(k):
            for _ in range(k):
                sem.release()
                if random.random() < 0.1:
                    time.sleep(0)

        threads = [threading.Thread(target=releaser, args=(n // 3,)) for _ in range(3)]
        for t in threads:
            t.start()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        for t in threads:
            t.join()
        assert got == list(range(n)), "FIFO across thread releases"
        assert sem.value == 0 and sem.locked()

    run(main(), loop_factory, debug=True)


def test_bg_wake_order_kept_across_thread_and_loop_releases(loop_factory):
    """A grant made by another thread (still queued for the loop) is woken
    before a later grant made by a release on the loop thread."""
    async def main():
        sem = batchgate.Semaphore(0)
        order = []

        async def worker(name):
            await sem.acquire()
            order.append(name)

        tasks = [asyncio.create_task(worker(x)) for x in "ab"]
        await spin()
        th = threading.Thread(target=sem.release)
        th.start()
        th.join()          # a is granted; the loop has not looked at its fd yet
        sem.release()      # b is granted on the loop thread
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert order == ["a", "b"]

    run(main(), loop_factory, debug=True)


def test_bg_thread_release_races_cancellation(loop_factory):
    """Grants arrive from another thread while tasks are being cancelled."""
    async def main():
        rng = random.Random(7)
        limit = 3
        sem = batchgate.Semaphore(limit)
        stop = threading.Event()
        held_by_thread = []

        def thread_user():
            while not stop.is_set():
                if sem.acquire_blocking(timeout=0.01):
                    held_by_thread.append(1)
                    time.sleep(0.0005)
                    held_by_thread.pop()
                    sem.release()

        th = threading.Thread(target=thread_user)
        th.start()
        try:
            async def worker():
                async with sem:
                    await asyncio.sleep(0)

            tasks = [asyncio.create_task(worker()) for _ in range(2000)]
            while not all(t.done() for t in tasks):
                for _ in range(rng.randint(0, 5)):
                    rng.choice(tasks).cancel()
                await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        finally:
            stop.set()
            th.join()
        await spin()
        assert sem.value == limit
        assert not sem.locked()

    run(main(), loop_factory, debug=True)


def test_bg_mixed_threads_and_asyncio_cap():
    limit = 3
    sem = batchgate.Semaphore(limit)
    lock = threading.Lock()
    inside = 0
    peak = 0

    def enter():
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
            assert inside <= limit

    def leave():
        nonlocal inside
        with lock:
            inside -= 1

    def thread_worker(k):
        for _ in range(k):
            assert sem.acquire_blocking(timeout=WAIT)
            enter()
            time.sleep(0.0002)
            leave()
            sem.release()

    async def main():
        async def worker():
            async with sem:
                enter()
                await asyncio.sleep(0.0002)
                leave()

        threads = [threading.Thread(target=thread_worker, args=(150,)) for _ in range(3)]
        for t in threads:
            t.start()
        await asyncio.gather(*(worker() for _ in range(600)))
        for t in threads:
            await asyncio.to_thread(t.join, WAIT)
            assert not t.is_alive()

    run(main())
    assert inside == 0
    assert peak == limit
    assert sem.value == limit


def test_bg_weighted_head_not_starved():
    async def main():
        sem = batchgate.Semaphore(5)
        order = []
        await sem.acquire(4)            # 1 left

        async def want(name, n):
            await sem.acquire(n)
            order.append(name)

        big = asyncio.create_task(want("big", 3))
        await spin()
        small = asyncio.create_task(want("small", 1))
        await spin()
        assert order == []              # 1 free, but the big head waits first
        assert sem.locked() and sem.value == 1
        sem.release(2)                  # 3 free: big goes, small still waits (0 left)
        await spin()
        assert order == ["big"]
        sem.release(1)
        await asyncio.wait_for(small, WAIT)
        assert order == ["big", "small"]
        sem.release(4)                  # the first holder
        sem.release(3)
        sem.release(1)
        assert sem.value == 8           # unbounded: 5 - 8 taken + 3 + 8 given

    run(main())


def test_bg_weighted_cancel_head_unblocks_rest():
    async def main():
        sem = batchgate.Semaphore(2)
        big = asyncio.create_task(sem.acquire(5))
        await spin()
        small = [asyncio.create_task(sem.acquire(1)) for _ in range(2)]
        await spin()
        assert not any(t.done() for t in small)
        big.cancel()
        await asyncio.wait_for(asyncio.gather(*small), WAIT)
        assert sem.value == 0
        with pytest.raises(asyncio.CancelledError):
            await big
        sem.release(2)
        assert sem.value == 2

    run(main())


def test_bg_weighted_random_never_over_cap():
    async def main():
        rng = random.Random(3)
        cap = 10
        sem = batchgate.BoundedSemaphore(cap)
        in_use = 0
        peak = 0

        async def worker():
            nonlocal in_use, peak
            n = rng.randint(1, cap)
            await sem.acquire(n)
            try:
                in_use += n
                peak = max(peak, in_use)
                assert in_use <= cap
                await asyncio.sleep(0)
            finally:
                in_use -= n
                sem.release(n)

        tasks = [asyncio.create_task(worker()) for _ in range(2000)]
        for _ in range(300):
            rng.choice(tasks).cancel()
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        assert in_use == 0 and sem.value == cap
        assert peak <= cap

    run(main())


def test_bg_weighted_validation():
    sem = batchgate.BoundedSemaphore(3)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            sem.acquire(bad)
        with pytest.raises(ValueError):
            sem.release(bad)
    with pytest.raises(ValueError, match="could never be acquired"):
        sem.acquire(4)
    with pytest.raises(TypeError):
        sem.acquire(1.5)
    with pytest.raises(TypeError):
        sem.acquire(True)
    with pytest.raises(TypeError):
        sem.acquire(n=1, m=2)
    with pytest.raises(TypeError):
        batchgate.Semaphore(1.0)
    with pytest.raises(ValueError):
        sem.acquire_blocking(timeout=-1)


def test_bg_acquire_blocking_timeout_and_gil_released():
    sem = batchgate.Semaphore(0)
    ticks = 0
    stop = False

    def ticker():
        nonlocal ticks
        while not stop:
            ticks += 1
            time.sleep(0.001)

    th = threading.Thread(target=ticker)
    th.start()
    t0 = time.monotonic()
    try:
        assert sem.acquire_blocking(timeout=0.2) is False
    finally:
        stop = True
        th.join()
    assert time.monotonic() - t0 >= 0.19
    assert ticks > 20, "the GIL was held while waiting"
    assert sem.value == 0 and sem.locked()
    assert sem.acquire_blocking(timeout=0) is False
    sem.release()
    assert sem.acquire_blocking(timeout=0) is True
    assert sem.value == 0


def test_bg_acquire_blocking_woken_by_asyncio_release():
    sem = batchgate.Semaphore(0)
    results = []
    th = threading.Thread(target=lambda: results.append(sem.acquire_blocking(2, timeout=WAIT)))
    th.start()

    async def main():
        while "waiters:1" not in repr(sem):
            await asyncio.sleep(0.001)
        sem.release()
        await asyncio.sleep(0.01)
        assert results == []           # needs 2
        sem.release()
        await asyncio.to_thread(th.join, WAIT)

    run(main())
    assert results == [True]
    assert sem.value == 0


def test_bg_blocking_and_async_waiters_share_fifo():
    sem = batchgate.Semaphore(0)
    order = []

    async def main():
        t = asyncio.create_task(sem.acquire())
        await spin()

        def blocker():
            assert sem.acquire_blocking(timeout=WAIT)
            order.append("thread")

        th = threading.Thread(target=blocker)
        th.start()
        while "waiters:2" not in repr(sem):
            await asyncio.sleep(0.001)
        sem.release()
        await t
        order.append("task")
        await asyncio.sleep(0.02)
        assert order == ["task"]       # the thread queued second
        sem.release()
        await asyncio.to_thread(th.join, WAIT)

    run(main())
    assert order == ["task", "thread"]


def test_bg_loop_without_add_reader_falls_back():
    async def main():
        sem = batchgate.Semaphore(0)
        tasks = [asyncio.create_task(sem.acquire()) for _ in range(50)]
        await spin()

        def releaser():
            for _ in range(50):
                sem.release()

        th = threading.Thread(target=releaser)
        th.start()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        await asyncio.to_thread(th.join, WAIT)
        assert sem.value == 0

    run(main(), _NoReaderLoop)
    # The watcher thread ends once its loop is closed.
    deadline = time.monotonic() + 5
    while any(t.name == "batchgate-loop-notifier" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "notifier watcher thread outlived its loop"
        time.sleep(0.05)


class _CountingLoop(asyncio.SelectorEventLoop):
    futures = 0

    def create_future(self):
        type(self).futures += 1
        return super().create_future()


def test_bg_fast_path_makes_no_future():
    async def main():
        sem = batchgate.Semaphore(2)
        before = _CountingLoop.futures
        for _ in range(100):
            async with sem:
                await sem.acquire()
                sem.release()
        assert _CountingLoop.futures == before
        sem2 = batchgate.Semaphore(0)
        t = asyncio.create_task(sem2.acquire())
        await spin()
        assert _CountingLoop.futures == before + 1
        sem2.release()
        await t

    run(main(), _CountingLoop)


def test_bg_objects_are_freed():
    async def main():
        sem = batchgate.Semaphore(0)
        tasks = [asyncio.create_task(sem.acquire()) for _ in range(10)]
        await spin()
        for t in tasks[:5]:
            t.cancel()
        sem.release(5)
        await asyncio.gather(*tasks, return_exceptions=True)
        return weakref.ref(sem)

    ref = run(main())
    gc.collect()
    assert ref() is None
    leftover = [o for o in gc.get_objects() if type(o).__name__ == "_SemaphoreAcquire"]
    assert leftover == []


def test_bg_no_growth_over_many_waits():
    """Refcount leaks in the slow path show up as live objects or memory."""
    import tracemalloc

    async def churn(sem, rounds):
        async def worker():
            async with sem:
                await asyncio.sleep(0)

        for _ in range(rounds):
            tasks = [asyncio.create_task(worker()) for _ in range(50)]
            tasks[7].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def main():
        sem = batchgate.Semaphore(2)
        await churn(sem, 20)  # warm up caches
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await churn(sem, 200)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert grown < 200_000, f"{grown} bytes still held after 10,000 waits"
        assert sem.value == 2

    run(main())


def test_bg_not_initialised():
    class Sub(batchgate.Semaphore):
        def __init__(self):
            pass

    s = Sub()
    with pytest.raises(RuntimeError, match="__init__"):
        s.release()
    with pytest.raises(RuntimeError, match="__init__"):
        s.locked()


def test_bg_acquire_blocking_interrupted_by_signal():
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    sem = batchgate.Semaphore(0)
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            sem.acquire_blocking()
        assert time.monotonic() - t0 < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # The interrupted waiter left the queue: a release is free again.
    assert "waiters" not in repr(sem)
    sem.release()
    assert sem.value == 1
    assert sem.acquire_blocking(timeout=0)


def test_bg_native_thread_release_wakes_asyncio(loop_factory):
    """The dispatcher's way: permits taken and returned through the C API by a
    thread that never holds the GIL; asyncio waiters are woken via the fd."""
    from batchgate import _native

    async def main():
        sem = batchgate.BoundedSemaphore(3)
        assert _native._sem_native_try_acquire(sem, 3)
        assert sem.locked() and sem.value == 0
        got = []

        async def worker(i):
            await sem.acquire()
            got.append(i)

        tasks = [asyncio.create_task(worker(i)) for i in range(3)]
        await spin()
        for k in range(3):
            _native._sem_native_release_later(sem, 1, 5 * k)
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert got == [0, 1, 2]
        assert sem.value == 0
        sem.release(3)
        assert not _native._sem_native_try_acquire(sem, 4)   # bound is 3
        with pytest.raises(TypeError):
            _native._sem_native_try_acquire(object(), 1)

    run(main(), loop_factory, debug=True)
