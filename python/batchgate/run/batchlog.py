"""The durable batch log: one JSONL record per finished batch, flushed at once."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional


class BatchLog:
    """Append-only JSONL, one record per finished batch, flushed at once.

    On resume, the latest record per batch key wins; a torn last line (the
    process was killed mid-write) is cut off before appending. ``path=None``
    keeps the records in memory only.
    """

    def __init__(self, path: Optional[str], resume: bool) -> None:
        self.path = path
        self.records: Dict[str, Dict[str, Any]] = {}
        self._f = None
        if path is None:
            return
        if resume and os.path.exists(path):
            good = 0
            with open(path, "rb") as f:
                data = f.read()
            for raw in data.splitlines(keepends=True):
                if not raw.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(raw)
                    key = rec["key"]
                except (ValueError, KeyError, TypeError):
                    break
                self.records[key] = rec
                good += len(raw)
            if good < len(data):
                with open(path, "r+b") as f:
                    f.truncate(good)
        self._f = open(path, "a" if resume else "w", encoding="utf-8")

    def done(self, key: str) -> bool:
        rec = self.records.get(key)
        return rec is not None and rec.get("status") == "ok"

    def append(self, rec: Dict[str, Any]) -> None:
        self.records[rec["key"]] = rec
        if self._f is not None:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
