"""Reading review files (JSONL or CSV) grouped per restaurant."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

SAMPLE_REVIEWS = os.path.join(os.path.dirname(__file__), "data", "sample_reviews.jsonl")


class ReviewFileError(ValueError):
    """A review file line that cannot be used, with its 1-based line number."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


@dataclass
class Review:
    group: str
    text: str
    line: int


def read_reviews(path: str, *, text_field: str = "text",
                 group_field: str = "restaurant_id",
                 errors: Optional[List[ReviewFileError]] = None) -> Iterator[Review]:
    """Yield reviews from a .jsonl or .csv file.

    A malformed line raises ReviewFileError, or, when ``errors`` is a list, is
    appended there and skipped so the rest of the file is still read.
    """
    def bad(line: int, message: str) -> None:
        err = ReviewFileError(path, line, message)
        if errors is None:
            raise err
        errors.append(err)

    def build(rec: object, line: int) -> Optional[Review]:
        if not isinstance(rec, dict):
            bad(line, f"expected an object, got {type(rec).__name__}")
            return None
        text, group = rec.get(text_field), rec.get(group_field)
        if not isinstance(text, str):
            bad(line, f"field {text_field!r} must be a string, got {type(text).__name__}")
            return None
        if group is None or isinstance(group, (dict, list)):
            bad(line, f"field {group_field!r} is missing or not a scalar")
            return None
        return Review(str(group), text, line)

    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for rec in reader:
                r = build(rec, reader.line_num)
                if r:
                    yield r
        return
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                bad(lineno, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            r = build(rec, lineno)
            if r:
                yield r


def group_reviews(reviews: Iterator[Review]) -> Dict[str, List[Review]]:
    """Reviews per group, groups in order of first appearance."""
    groups: Dict[str, List[Review]] = {}
    for r in reviews:
        groups.setdefault(r.group, []).append(r)
    return groups
