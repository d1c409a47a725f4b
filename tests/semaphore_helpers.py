"""Helpers shared by test_semaphore.py, test_semaphore_native.py and
test_loop_bridge.py: loops to run on and a bounded asyncio.run."""
import asyncio

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - depends on the environment
    uvloop = None

WAIT = 10.0  # seconds: anything slower is a hang


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
