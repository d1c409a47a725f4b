"""Stopping a loopback test server in the very loop round that accepted a connection."""
import asyncio
import gc
import socket
import sys

import pytest


def leftovers_of_stop_in_accept_round(start, stop):
    """Start a server with `start()` (a coroutine returning its port) on a fresh
    loop, connect once, and begin `stop()` in the callback that accepted that
    connection, before asyncio's own task has made it into a transport. Returns
    what the garbage collector then reports unraisable (should be nothing):
    a transport made after Server.close() fails an assert in Server._attach
    and is left half-made, warning later inside some other test."""
    if not hasattr(asyncio, "eager_task_factory"):
        pytest.skip("needs asyncio.eager_task_factory (3.12+) to run stop() inside the round")
    reported = []
    loop = asyncio.new_event_loop()
    orig = getattr(loop, "_accept_connection", None)
    if orig is None:
        loop.close()
        pytest.skip("not asyncio's selector loop")
    stopped = loop.create_future()  # a plain future: no task of ours but stop()'s

    def accept_then_stop(*args, **kw):
        orig(*args, **kw)  # schedules the transport's setup task
        if not stopped.done() and not getattr(stopped, "started", False):
            stopped.started = True  # stop's first step runs now, in this callback
            task = asyncio.eager_task_factory(loop, stop())
            task.add_done_callback(lambda t: stopped.set_result(t.result()))

    loop._accept_connection = accept_then_stop  # read when the listener starts
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: reported.append(f"{u.exc_type.__name__}: {u.exc_value}")
    try:
        port = loop.run_until_complete(start())
        with socket.create_connection(("127.0.0.1", port)):
            timer = loop.call_later(10, lambda: stopped.done() or stopped.set_exception(
                TimeoutError("the connection was not accepted, or stop() hung")))
            loop.run_until_complete(stopped)
            timer.cancel()
        loop.close()
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    return reported
