"""batchgate.Semaphore / BoundedSemaphore against asyncio's, plus what asyncio's
cannot do (threads, weights, blocking acquire).

Behaviour tests are parametrized over both implementations, so they prove
the two behave the same; every race test checks that no permit is lost or
duplicated and that no waiter hangs (all waits have timeouts).
"""
import asyncio
import gc
import random
import re
import threading
import time
import weakref

import pytest

import batchgate

try:
    import uvloop
except ImportError:  # pragma: no cover - depends on the environment
    uvloop = None

IMPLS = {
    "batchgate": (batchgate.Semaphore, batchgate.BoundedSemaphore),
    "asyncio": (asyncio.Semaphore, asyncio.BoundedSemaphore),
}

WAIT = 10.0  # seconds: anything slower is a hang


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


@pytest.fixture
def Sem(impl):
    return impl[0]


@pytest.fixture
def Bounded(impl):
    return impl[1]


class _NoReaderLoop(asyncio.SelectorEventLoop):
    """Like the proactor loop: no add_reader."""

    def add_reader(self, *args, **kwargs):
        raise NotImplementedError


def loop_factories():
    yield pytest.param(asyncio.new_event_loop, id="asyncio-loop")
    yield pytest.param(_NoReaderLoop, id="no-add_reader")
    if uvloop is not None:
        yield pytest.param(uvloop.new_event_loop, id="uvloop")
    else:  # pragma: no cover
        yield pytest.param(None, id="uvloop", marks=pytest.mark.skip(reason="uvloop not installed"))


def run(coro, loop_factory=None, debug=None):
    """asyncio.run with a loop factory (asyncio.Runner is 3.11+). debug=True
    makes asyncio raise if a future is completed off the loop thread."""
    loop = (loop_factory or asyncio.new_event_loop)()
    if debug is not None:
        loop.set_debug(debug)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(asyncio.wait_for(coro, WAIT * 3))
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def spin(n=5):
    """Let every ready callback run a few times."""
    for _ in range(n):
        await asyncio.sleep(0)


# ---------------------------------------------------------------- basics


def test_value_validation(Sem, Bounded):
    with pytest.raises(ValueError):
        Sem(-1)
    with pytest.raises(ValueError):
        Bounded(-1)
    assert Sem()._value == 1
    assert Sem(0).locked()
    assert not Sem(3).locked()


def test_basic_acquire_release(Sem):
    async def main():
        sem = Sem(2)
        assert await sem.acquire() is True
        assert sem._value == 1 and not sem.locked()
        assert await sem.acquire() is True
        assert sem.locked()
        sem.release()
        sem.release()
        assert sem._value == 2
        sem.release()  # unbounded: may pass the initial value
        assert sem._value == 3

    run(main())


def test_async_with_returns_none(Sem):
    async def main():
        sem = Sem(1)
        async with sem as entered:
            assert entered is None
            assert sem.locked()
        assert not sem.locked()
        with pytest.raises(KeyError):
            async with sem:
                raise KeyError("x")
        assert sem._value == 1

    run(main())


def test_await_semaphore_is_type_error(Sem):
    async def main():
        with pytest.raises(TypeError):
            await Sem(1)

    run(main())


def test_bounded_release_too_many(Bounded):
    async def main():
        sem = Bounded(2)
        with pytest.raises(ValueError):
            sem.release()
        await sem.acquire()
        sem.release()
        with pytest.raises(ValueError):
            sem.release()
        assert sem._value == 2

    run(main())


def test_repr(Sem):
    async def main():
        sem = Sem(1)
        assert re.fullmatch(r"<.*Semaphore object at 0x[0-9a-f]+ \[unlocked, value:1\]>", repr(sem))
        await sem.acquire()
        assert repr(sem).endswith("[locked]>")
        t = asyncio.create_task(sem.acquire())
        await spin()
        assert repr(sem).endswith("[locked, waiters:1]>")
        sem.release()
        assert await t
        sem.release()
        assert repr(sem).endswith("[unlocked, value:1]>")

    run(main())


def test_acquire_is_lazy_and_coroutine_like(Sem):
    """Nothing is taken before the awaitable runs; it steps like a coroutine."""
    sem = Sem(1)
    aw = sem.acquire()
    assert sem._value == 1
    with pytest.raises(StopIteration) as info:
        aw.send(None)
    assert info.value.value is True
    assert sem._value == 0
    aw2 = sem.acquire()
    aw2.close()  # never started: nothing taken, nothing owed
    assert sem._value == 0


# ---------------------------------------------------------------- fairness


def test_fifo_order(Sem):
    async def main():
        sem = Sem(0)
        order = []

        async def worker(i):
            async with sem:
                order.append(i)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(worker(i)) for i in range(20)]
        await spin()
        for _ in range(3):
            sem.release()
        await asyncio.gather(*tasks)
        assert order == list(range(20))
        assert sem._value == 3

    run(main())


def test_newcomer_does_not_jump_the_queue(Sem):
    async def main():
        sem = Sem(0)
        order = []

        async def worker(name):
            await sem.acquire()
            order.append(name)

        a = asyncio.create_task(worker("a"))
        await spin()
        sem.release()          # a is woken but has not run yet
        assert sem.locked()
        b = asyncio.create_task(worker("b"))
        sem.release()          # a second permit: b may have it, after a
        assert sem.locked()    # a woken waiter still counts
        await asyncio.gather(a, b)
        assert order == ["a", "b"]
        assert sem._value == 0

    run(main())


def test_locked_true_while_woken_waiter_not_resumed(Sem):
    async def main():
        sem = Sem(0)
        t = asyncio.create_task(sem.acquire())
        await spin()
        sem.release()
        sem.release()
        # value is 1 now but the woken waiter has not run: asyncio says locked.
        assert sem.locked()
        late = sem.acquire()
        # ...so a newcomer must suspend at least once.
        fut = late.send(None)
        assert isinstance(fut, asyncio.Future)
        late.close()
        assert await t
        assert sem._value == 1
        assert not sem.locked()

    run(main())


# ---------------------------------------------------------------- cancellation


def test_cancel_queued_waiter_leaves_queue(Sem):
    async def main():
        sem = Sem(0)
        a = asyncio.create_task(sem.acquire())
        b = asyncio.create_task(sem.acquire())
        await spin()
        a.cancel()
        await spin()
        assert a.cancelled()
        sem.release()
        assert await asyncio.wait_for(b, WAIT)
        assert sem._value == 0
        sem.release()
        assert sem._value == 1 and not sem.locked()

    run(main())


def test_cancel_after_wake_hands_permit_on(Sem):
    """gh-90155: woken, then cancelled before running; the next waiter must
    get the permit instead of hanging."""
    async def main():
        sem = Sem(0)
        a = asyncio.create_task(sem.acquire())
        b = asyncio.create_task(sem.acquire())
        await spin()
        sem.release()   # wakes a
        a.cancel()      # ...which is cancelled before it runs
        assert await asyncio.wait_for(b, WAIT)
        with pytest.raises(asyncio.CancelledError):
            await a
        assert sem._value == 0
        sem.release()
        assert sem._value == 1 and not sem.locked()

    run(main())


def test_cancelled_waiter_is_skipped_on_release(Sem):
    async def main():
        sem = Sem(0)
        a = asyncio.create_task(sem.acquire())
        await spin()
        a.cancel()      # its future is cancelled, the task has not run yet
        sem.release()
        assert not sem.locked()
        assert sem._value == 1
        # A newcomer takes it at once: the cancelled waiter does not count.
        aw = sem.acquire()
        with pytest.raises(StopIteration):
            aw.send(None)
        with pytest.raises(asyncio.CancelledError):
            await a
        sem.release()
        assert sem._value == 1

    run(main())


def test_cancel_of_holder_releases_via_async_with(Sem):
    async def main():
        sem = Sem(1)
        entered = asyncio.Event()

        async def holder():
            async with sem:
                entered.set()
                await asyncio.sleep(100)

        h = asyncio.create_task(holder())
        await entered.wait()
        w = asyncio.create_task(sem.acquire())
        await spin()
        h.cancel()
        assert await asyncio.wait_for(w, WAIT)
        sem.release()
        assert sem._value == 1

    run(main())


def test_wait_for_timeout_loses_nothing(Sem):
    async def main():
        sem = Sem(0)
        for _ in range(5):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sem.acquire(), 0.005)
        sem.release()
        assert sem._value == 1
        assert await asyncio.wait_for(sem.acquire(), WAIT)

    run(main())


@pytest.mark.parametrize("seed", range(4))
def test_random_cancellations_no_permit_lost(Sem, seed):
    async def main():
        rng = random.Random(seed)
        limit = 4
        sem = Sem(limit)
        inside = 0
        peak = 0
        done = 0

        async def worker():
            nonlocal inside, peak, done
            async with sem:
                inside += 1
                try:
                    peak = max(peak, inside)
                    assert inside <= limit
                    for _ in range(rng.randint(0, 2)):
                        await asyncio.sleep(0)
                finally:
                    inside -= 1
            done += 1

        tasks = [asyncio.create_task(worker()) for _ in range(1500)]
        cancelled = 0
        while not all(t.done() for t in tasks):
            for _ in range(rng.randint(0, 8)):
                t = rng.choice(tasks)
                if not t.done():
                    t.cancel()
                    cancelled += 1
            if rng.random() < 0.3:
                await spin(rng.randint(1, 3))
            else:
                await asyncio.sleep(0)
        res = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in res)
        assert done + sum(isinstance(r, asyncio.CancelledError) for r in res) == len(tasks)
        assert inside == 0
        assert peak == limit
        assert sem._value == limit, "a permit was lost or duplicated"
        assert not sem.locked()
        # Still fully usable.
        for _ in range(limit):
            await asyncio.wait_for(sem.acquire(), WAIT)
        assert sem.locked()

    run(main())


def test_ten_thousand_tasks(Sem):
    async def main():
        limit = 16
        sem = Sem(limit)
        inside = peak = 0
        order = []

        async def worker(i):
            nonlocal inside, peak
            async with sem:
                order.append(i)
                inside += 1
                peak = max(peak, inside)
                await asyncio.sleep(0)
                inside -= 1

        await asyncio.gather(*(worker(i) for i in range(12000)))
        assert peak == limit
        assert sorted(order) == list(range(12000))
        assert sem._value == limit

    run(main())


def test_second_loop_is_runtime_error(Sem):
    sem = Sem(0)

    async def contend():
        t = asyncio.create_task(sem.acquire())
        await spin()
        sem.release()
        assert await t

    run(contend())   # binds sem to this (now closed) loop

    async def other_loop():
        with pytest.raises(RuntimeError, match="different event loop"):
            await sem.acquire()

    run(other_loop())


def test_uncontended_use_from_two_loops_is_fine(Sem):
    sem = Sem(1)

    async def use():
        async with sem:
            pass

    run(use())
    run(use())
    assert sem._value == 1


# ---------------------------------------------------------------- batchgate only


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
