"""Ctrl-C for the long-running commands (``batchgate run``, ``batchgate batch``):
the first SIGINT or SIGTERM asks the job to stop cleanly (what is finished is
kept), a second Ctrl-C gets Python's default and aborts."""
from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(say: Callable[[str], None], message: str) -> Iterator[asyncio.Event]:
    """Within the running loop: an Event set by the first SIGINT/SIGTERM,
    after ``say(message)``. The handlers are removed on exit. Where the loop
    cannot take signal handlers (not the main thread, Windows) the event is
    simply never set."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        say(message)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # the next Ctrl-C aborts

    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        yield stop
    finally:
        for sig in STOP_SIGNALS:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
