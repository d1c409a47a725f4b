"""The one native bridge per event loop, shared by batchgate.Semaphore and
every Dispatcher bound to that loop: one reader (or one watcher thread), and
each user keeps working when another goes away or the loop changes."""
import asyncio
import gc
import threading
import time
import weakref

import batchgate
from batchgate import _native
from semaphore_helpers import WAIT, _NoReaderLoop, run, spin


def make(fake, **kw):
    kw.setdefault("model", "fake-model")
    return batchgate.Dispatcher(fake.base_url, **kw)


class _ReaderCountingLoop(asyncio.SelectorEventLoop):
    """Records the fds given to add_reader (beyond the loop's own)."""

    def __init__(self):
        super().__init__()
        self.reader_fds = []

    def add_reader(self, fd, callback, *args):
        self.reader_fds.append(fd)
        return super().add_reader(fd, callback, *args)


def _threads(name):
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


async def _sem_woken_from_thread(sem, n=20):
    """n waiters, each woken by a release from a plain thread."""
    tasks = [asyncio.create_task(sem.acquire()) for _ in range(n)]
    await spin()
    assert not any(t.done() for t in tasks)
    th = threading.Thread(target=lambda: [sem.release() for _ in range(n)])
    th.start()
    assert all(await asyncio.wait_for(asyncio.gather(*tasks), WAIT))
    await asyncio.to_thread(th.join, WAIT)


def test_semaphore_and_two_dispatchers_share_one_reader(fake):
    loop = _ReaderCountingLoop()

    async def main():
        sem = batchgate.Semaphore(0)
        await _sem_woken_from_thread(sem)
        async with make(fake) as d1, make(fake, max_concurrent=4) as d2:
            one, many = await asyncio.gather(
                d1.generate("a"), d2.map([f"m{i}" for i in range(300)]))
            assert one.text == "echo:a"
            assert [r.text for r in many] == [f"echo:m{i}" for i in range(300)]
            # The semaphore still wakes while both dispatchers deliver.
            await asyncio.gather(_sem_woken_from_thread(sem),
                                 d1.map([f"x{i}" for i in range(200)]))
        return sem

    try:
        loop.run_until_complete(asyncio.wait_for(main(), WAIT * 3))
        # One bridge: one fd for the semaphore and both dispatchers.
        assert len(loop.reader_fds) == 1, loop.reader_fds
    finally:
        loop.close()


def test_dispatcher_on_loop_without_add_reader_uses_the_bridge_thread(fake):
    async def main():
        sem = batchgate.Semaphore(0)
        async with make(fake, max_concurrent=8) as d1, make(fake) as d2:
            res, _ = await asyncio.gather(d1.map([f"n{i}" for i in range(400)]),
                                          _sem_woken_from_thread(sem))
            assert [r.text for r in res] == [f"echo:n{i}" for i in range(400)]
            assert (await d2.generate("one")).text == "echo:one"
            # One watcher thread serves the semaphore and both dispatchers.
            assert len(_threads("batchgate-loop-notifier")) == 1
            assert not _threads("batchgate-dispatcher-watch")

    before = len(_threads("batchgate-loop-notifier"))
    assert before == 0, "a watcher thread of an earlier test is still alive"
    run(main(), _NoReaderLoop)


def test_semaphore_still_wakes_after_dispatcher_closes(fake):
    async def main():
        sem = batchgate.Semaphore(0)
        d = make(fake, semaphore=batchgate.Semaphore(4))
        assert len(await d.map(["a", "b", "c"])) == 3
        await d.aclose()
        del d
        gc.collect()
        await _sem_woken_from_thread(sem)
        # A release from native code (like the engine thread) too.
        t = asyncio.create_task(sem.acquire())
        await spin()
        _native._sem_native_release_later(sem, 1, 20)
        assert await asyncio.wait_for(t, WAIT)
        # And a new dispatcher on the same loop and bridge.
        async with make(fake) as d2:
            assert (await d2.generate("again")).text == "echo:again"

    run(main())


def test_rebinding_to_a_new_loop_lets_the_old_one_go(fake):
    d = make(fake)
    loops = []

    async def use(tag):
        loops.append(weakref.ref(asyncio.get_running_loop()))
        sem = batchgate.Semaphore(0)
        res, _ = await asyncio.gather(d.map([f"{tag}{i}" for i in range(300)]),
                                      _sem_woken_from_thread(sem))
        return [r.text for r in res]

    try:
        assert run(use("a")) == [f"echo:a{i}" for i in range(300)]
        assert run(use("b")) == [f"echo:b{i}" for i in range(300)]
        gc.collect()
        # Neither the dispatcher nor the bridge keeps the first loop alive.
        assert loops[0]() is None
    finally:
        d.close()


def test_loops_in_many_threads_each_deliver_on_their_own(fake):
    errors = []

    def worker(k):
        async def main():
            sem = batchgate.Semaphore(0)
            async with make(fake, max_concurrent=4) as d:
                res, _ = await asyncio.gather(d.map([f"t{k}-{i}" for i in range(200)]),
                                              _sem_woken_from_thread(sem, 10))
                assert [r.text for r in res] == [f"echo:t{k}-{i}" for i in range(200)]

        try:
            # debug: asyncio raises if a future is completed off its loop's thread.
            run(main(), debug=True)
        except BaseException as e:  # reported below
            errors.append(e)

    sync = batchgate.SyncDispatcher(fake.base_url, model="fake-model")
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        # A SyncDispatcher runs its own loop in its own thread meanwhile.
        out = sync.map([f"s{i}" for i in range(200)])
        assert [r.text for r in out] == [f"echo:s{i}" for i in range(200)]
        for t in threads:
            t.join(WAIT * 3)
            assert not t.is_alive()
    finally:
        sync.close()
    assert not errors, errors


def test_wake_left_on_a_closed_loops_bridge_does_not_block_the_next_loop(fake):
    d = make(fake, max_concurrent=20)
    loop1 = asyncio.new_event_loop()
    try:
        for i in range(20):
            loop1.create_task(d.generate(f"slow {i} [[delay=0.2]]"))
        loop1.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop1.close()  # tasks left pending on purpose
    # The answers arrive now: their wake-up goes to loop1's bridge, which
    # never runs again. The next loop must not depend on it.
    time.sleep(0.5)
    try:
        assert run(d.generate("next")).text == "echo:next"
    finally:
        d.close()


def _wait_completed(core, n):
    deadline = time.monotonic() + WAIT
    while core.stats()["completed"] < n:
        assert time.monotonic() < deadline, core.stats()
        time.sleep(0.01)


def test_completions_while_unbound_wait_and_wake_the_next_bind(fake):
    # The engine finishes requests on a core bound to no loop (before its
    # first bind, and after bind(None)): they wait in the core's queue, and
    # the bind that follows delivers them through that loop's bridge.
    core = _native._Dispatcher(base_url=fake.base_url)
    tmpl = core.template("fake-model", None)
    loop = _ReaderCountingLoop()
    try:
        for round_, (prompt, stop) in enumerate((("first", False), ("again", True))):
            if stop:
                core.bind(loop)
                core.bind(None)  # unbound again: the next answer must still arrive
            fut = loop.create_future()
            core.submit(_native.JOB_ONE, False, prompt, tmpl, fut, 1, False)
            _wait_completed(core, round_ + 1)
            loop.run_until_complete(asyncio.sleep(0.05))
            assert not fut.done()  # nobody is bound to deliver it yet
            core.bind(loop)
            res = loop.run_until_complete(asyncio.wait_for(fut, WAIT))
            assert res.text == f"echo:{prompt}"
            assert core.live == 0
        assert len(loop.reader_fds) == 1, loop.reader_fds  # the loop's bridge, nothing else
    finally:
        core.close()
        loop.close()
