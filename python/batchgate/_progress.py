"""Progress reporting for map, chat_map, as_completed and process_batches.

``progress=`` takes a callable ``progress(done, total)`` (total is None when
the input has no len()), an object with ``update(n)`` (a tqdm bar you made),
or True: a tqdm bar when tqdm is installed, else a log line on the
"batchgate" logger every 10 s and at the end. It runs on the event loop's
thread, once per delivered chunk (not per request).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

log = logging.getLogger("batchgate")


def total_of(items: Any) -> Optional[int]:
    try:
        return len(items)
    except TypeError:
        return None


class Progress:
    def __init__(self, spec: Any, total: Optional[int], what: str) -> None:
        self.done = 0
        self.total = total
        self._bar = None
        self._fn: Optional[Callable[[int, Optional[int]], Any]] = None
        self._what = what
        self._t0 = self._last_log = time.monotonic()
        if spec is True:
            try:
                from tqdm.auto import tqdm  # type: ignore[import-untyped]
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=what, unit="req")
                self._own_bar = True
        elif hasattr(spec, "update") and not callable(spec):
            self._bar = spec
        elif hasattr(spec, "update") and hasattr(spec, "total"):  # a tqdm bar is callable too
            self._bar = spec
        elif callable(spec):
            self._fn = spec
        else:
            raise TypeError(f"progress must be a callable(done, total), a bar with update(n) or "
                            f"True, not {type(spec).__name__}")
        if self._bar is not None and getattr(self._bar, "total", 0) is None and total:
            self._bar.total = total
        self._own_bar = spec is True and self._bar is not None

    def advance(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        if self._fn is not None:
            self._fn(self.done, self.total)
        elif self._bar is not None:
            self._bar.update(n)
        else:
            now = time.monotonic()
            if now - self._last_log >= 10:
                self._last_log = now
                self._log()

    def _log(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s done (%.0f s)", self._what, self.done, of,
                 time.monotonic() - self._t0)

    def close(self) -> None:
        if self._own_bar:
            self._bar.close()  # type: ignore[union-attr]
        elif self._bar is None and self._fn is None:
            self._log()


def make(spec: Any, items: Any, what: str) -> Optional[Progress]:
    if spec is None or spec is False:
        return None
    return Progress(spec, total_of(items), what)
