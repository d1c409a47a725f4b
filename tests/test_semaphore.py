"""batchgate.Semaphore / BoundedSemaphore against asyncio's (what asyncio's
cannot do - threads, weights, blocking acquire - is test_semaphore_native.py).

Behaviour tests are parametrized over both implementations, so they prove
the two behave the same; every race test checks that no permit is lost or
duplicated and that no waiter hangs (all waits have timeouts).
"""
import asyncio
import random
import re

import pytest

import batchgate
from semaphore_helpers import WAIT, run, spin

IMPLS = {
    "batchgate": (batchgate.Semaphore, batchgate.BoundedSemaphore),
    "asyncio": (asyncio.Semaphore, asyncio.BoundedSemaphore),
}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


@pytest.fixture
def Sem(impl):
    return impl[0]


@pytest.fixture
def Bounded(impl):
    return impl[1]


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
