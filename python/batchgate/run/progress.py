"""Progress on stderr: a bar redrawn in place on a terminal, otherwise one
plain line every few seconds (logs, CI, `2> file`)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

from .pipeline import DispatchStats


class Progress:
    def __init__(self, total: int, already: int = 0, stream: Any = None,
                 interval: Optional[float] = None) -> None:
        self.stream = stream or sys.stderr
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.enabled = True
        self.total = total
        self.already = already
        if interval is None:
            # BATCHGATE_PROGRESS_INTERVAL: seconds between plain lines (not a terminal).
            interval = float(os.getenv("BATCHGATE_PROGRESS_INTERVAL") or 5.0)
        self.interval = 0.1 if self.tty else interval
        self.t0 = time.monotonic()
        self._last = self.t0
        self._drawn = False

    def __call__(self, st: DispatchStats, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        done = self.already + st.ok + st.failed
        rate = (st.ok + st.failed) / max(now - self.t0, 1e-9)
        tail = f"{done}/{self.total} batches  {st.failed} failed  {rate:.1f} batches/s"
        if self.tty:
            width = 30
            fill = int(width * done / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {tail} ")
            self._drawn = True
        else:
            self.stream.write(f"batchgate: progress {tail}, {now - self.t0:.0f} s\n")
        self.stream.flush()

    def finish(self, st: DispatchStats) -> None:
        if self.tty:
            self(st, force=True)
            self.stream.write("\n")
            self.stream.flush()
