"""Reading review files grouped per restaurant.

Formats: JSONL (one review per line, or one restaurant per line in the
original's nested shape ``{"restaurant_id": .., "reviews": [{"content": ..}]}``),
a JSON array of either, and CSV (a UTF-8 BOM is fine). Files are read line by
line: a line that is not valid in the file's encoding (``encoding=``, e.g.
cp949 for Korean Excel exports) or not valid JSON is reported with its 1-based
line number and the rest is still read. The review text field is detected
(``TEXT_FIELDS``) unless given; ids keep their JSON type (16 stays 16).
"""
from __future__ import annotations

import codecs
import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

SAMPLE_REVIEWS = os.path.join(os.path.dirname(__file__), "data", "sample_reviews.jsonl")

# Tried in this order when no text field is given.
TEXT_FIELDS = ("content", "text", "review", "review_text", "review_content", "comment",
               "body", "contents", "message")


class ReviewFileError(ValueError):
    """A review file line that cannot be used, with its 1-based line number."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


@dataclass
class Review:
    group: Any
    text: str
    line: int


@dataclass
class ReadInfo:
    """What read_reviews found: the format, the text field used (and whether it
    was detected), the fields of the first record."""
    format: str = ""
    text_field: Optional[str] = None
    detected: bool = False
    fields: List[str] = field(default_factory=list)


def detect_text_field(record: Dict[str, Any]) -> Optional[str]:
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return name
    return None


def _scalar_id(v: Any) -> bool:
    return v is not None and not isinstance(v, (dict, list, bool))


class _Reader:
    def __init__(self, path: str, text_field: Optional[str], group_field: str,
                 errors: Optional[List[ReviewFileError]], info: ReadInfo,
                 flag: str = "--text-field") -> None:
        self.path, self.text_field, self.group_field = path, text_field, group_field
        self.errors, self.info, self.flag = errors, info, flag
        info.text_field = text_field

    def bad(self, line: int, message: str) -> None:
        err = ReviewFileError(self.path, line, message)
        if self.errors is None:
            raise err
        self.errors.append(err)

    def _field_for(self, rec: Dict[str, Any], line: int) -> Optional[str]:
        if self.text_field is None:
            found = detect_text_field(rec)
            if found is None:
                # Nothing to go on: one clear error, not one per line.
                raise ReviewFileError(
                    self.path, line,
                    f"no review text field found; fields are {sorted(rec)}; tried "
                    f"{', '.join(TEXT_FIELDS)}; pass {self.flag} NAME")
            self.text_field = self.info.text_field = found
            self.info.detected = True
        return self.text_field

    def records(self, rec: Any, line: int) -> Iterator[Review]:
        """Reviews of one record: a flat review, or a restaurant with nested reviews."""
        if not isinstance(rec, dict):
            self.bad(line, f"expected an object, got {type(rec).__name__}")
            return
        if not self.info.fields:
            self.info.fields = sorted(rec)
        group = rec.get(self.group_field)
        nested = rec.get("reviews")
        if isinstance(nested, list) and (self.text_field is None or self.text_field not in rec):
            if not _scalar_id(group):
                self.bad(line, f"field {self.group_field!r} is missing or not a scalar "
                         f"(fields: {sorted(rec)}; use --group-field)")
                return
            if not self.info.format.endswith(", nested reviews"):
                self.info.format += ", nested reviews"
            for k, item in enumerate(nested):
                if isinstance(item, str):
                    yield Review(group, item, line)
                    continue
                if not isinstance(item, dict):
                    self.bad(line, f"reviews[{k}] must be an object or a string, "
                             f"got {type(item).__name__}")
                    continue
                r = self._one(item, group, line, where=f"reviews[{k}]: ")
                if r is not None:
                    yield r
            return
        if not _scalar_id(group):
            self.bad(line, f"field {self.group_field!r} is missing or not a scalar "
                     f"(fields: {sorted(rec)}; use --group-field)")
            return
        r = self._one(rec, group, line)
        if r is not None:
            yield r

    def _one(self, rec: Dict[str, Any], group: Any, line: int, where: str = "") -> Optional[Review]:
        name = self._field_for(rec, line)
        if name not in rec:
            self.bad(line, f"{where}field {name!r} is missing (fields: {sorted(rec)}; "
                     f"use {self.flag} NAME)")
            return None
        text = rec[name]
        if not isinstance(text, str):
            self.bad(line, f"{where}field {name!r} must be a string, got {type(text).__name__}")
            return None
        return Review(group, text, line)


def _decoded_lines(path: str, encoding: str, bad: Any) -> Iterator[Tuple[int, str]]:
    """(line number, text) of each line; undecodable lines are reported and skipped."""
    codecs.lookup(encoding)  # LookupError (a ValueError for the CLI) for a bad name
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield lineno, raw.decode(encoding)
            except UnicodeDecodeError as e:
                bad(lineno, f"not valid {encoding} (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); line skipped (another encoding? --encoding, e.g. cp949)")


def read_reviews(path: str, *, text_field: Optional[str] = None,
                 group_field: str = "restaurant_id", encoding: str = "utf-8",
                 errors: Optional[List[ReviewFileError]] = None,
                 info: Optional[ReadInfo] = None) -> Iterator[Review]:
    """Yield reviews from a .jsonl/.json or .csv file (formats in the module doc).

    A malformed line raises ReviewFileError, or, when ``errors`` is a list, is
    appended there and skipped so the rest of the file is still read. A file
    whose text field cannot be detected raises ReviewFileError at once.
    """
    info = info if info is not None else ReadInfo()
    rd = _Reader(path, text_field, group_field, errors, info)
    lines = _decoded_lines(path, encoding, rd.bad)
    if path.lower().endswith(".csv"):
        info.format = "csv"
        yield from _read_csv(rd, lines)
        return
    first: Optional[Tuple[int, str]] = None
    for lineno, text in lines:
        if text.strip():
            first = (lineno, text)
            break
    if first is None:
        return
    if first[1].lstrip().startswith("["):
        yield from _read_array(rd, first, lines)
        return
    info.format = "jsonl"
    for lineno, text in _chain(first, lines):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            rd.bad(lineno, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        yield from rd.records(rec, lineno)


def _chain(first: Tuple[int, str], rest: Iterable[Tuple[int, str]]) -> Iterator[Tuple[int, str]]:
    yield first
    yield from rest


def _read_array(rd: _Reader, first: Tuple[int, str], lines: Iterable[Tuple[int, str]]
                ) -> Iterator[Review]:
    # A JSON array is one value: parse it whole (undecodable lines were
    # reported already), then give each element the line it starts on.
    rd.info.format = "json array"
    starts: List[int] = []
    parts: List[str] = []
    offsets: List[int] = []
    pos = 0
    for lineno, text in _chain(first, lines):
        offsets.append(pos)
        starts.append(lineno)
        parts.append(text)
        pos += len(text)
    doc = "".join(parts)
    dec = json.JSONDecoder()
    import bisect
    i = doc.index("[") + 1
    n = len(doc)

    def line_at(off: int) -> int:
        return starts[max(0, bisect.bisect_right(offsets, off) - 1)]

    while True:
        while i < n and doc[i] in " \t\r\n,":
            i += 1
        if i >= n:
            rd.bad(line_at(n - 1), "JSON array is not closed")
            return
        if doc[i] == "]":
            return
        try:
            rec, end = dec.raw_decode(doc, i)
        except json.JSONDecodeError as e:
            rd.bad(line_at(e.pos), f"not valid JSON ({e.msg}); the rest of the array is skipped")
            return
        yield from rd.records(rec, line_at(i))
        i = end


def _read_csv(rd: _Reader, lines: Iterable[Tuple[int, str]]) -> Iterator[Review]:
    numbered: List[int] = []

    def feed() -> Iterator[str]:
        for lineno, text in lines:
            numbered.append(lineno)
            yield text

    reader = csv.DictReader(feed())
    try:
        for rec in reader:
            line = numbered[-1] if numbered else reader.line_num
            if None in rec:  # more cells than headers
                rec.pop(None)
            yield from rd.records(rec, line)
    except csv.Error as e:
        rd.bad(numbered[-1] if numbered else 0, f"not valid CSV ({e}); the rest is skipped")


def group_reviews(reviews: Iterable[Review]) -> Dict[Any, List[Review]]:
    """Reviews per group, groups in order of first appearance."""
    groups: Dict[Any, List[Review]] = {}
    for r in reviews:
        groups.setdefault(r.group, []).append(r)
    return groups


def groups_from_restaurants(restaurants: Sequence[Any], *, text_field: Optional[str] = None,
                            id_field: str = "restaurant_id"
                            ) -> Tuple[Dict[Any, List[Tuple[str, int]]], Optional[str]]:
    """The original's in-memory shape (a list of {"restaurant_id": ..,
    "reviews": [{"content": ..}, ...]}; reviews may also be plain strings) as
    {id: [(text, position), ...]}, and the text field used. Bad input raises
    TypeError/ValueError naming the restaurant and review."""
    if isinstance(restaurants, (str, bytes, dict)) or not hasattr(restaurants, "__iter__"):
        raise TypeError(f"restaurants_data must be a list of dicts, not "
                        f"{type(restaurants).__name__}")
    groups: Dict[Any, List[Tuple[str, int]]] = {}
    name = text_field
    for i, r in enumerate(restaurants):
        if not isinstance(r, dict):
            raise TypeError(f"restaurants_data[{i}] must be a dict, not {type(r).__name__}")
        if id_field not in r or not _scalar_id(r[id_field]):
            raise ValueError(f"restaurants_data[{i}] has no usable {id_field!r} "
                             f"(keys: {sorted(r)})")
        revs = r.get("reviews")
        if not isinstance(revs, (list, tuple)):
            raise TypeError(f"restaurants_data[{i}]['reviews'] must be a list, not "
                            f"{type(revs).__name__}")
        items = groups.setdefault(r[id_field], [])
        for k, rv in enumerate(revs):
            if isinstance(rv, str):
                items.append((rv, k + 1))
                continue
            if not isinstance(rv, dict):
                raise TypeError(f"restaurants_data[{i}]['reviews'][{k}] must be a dict or "
                                f"str, not {type(rv).__name__}")
            if name is None:
                name = detect_text_field(rv)
                if name is None:
                    raise ValueError(f"restaurants_data[{i}]['reviews'][{k}] has no review "
                                     f"text field (keys: {sorted(rv)}; tried "
                                     f"{', '.join(TEXT_FIELDS)}); pass text_field=")
            text = rv.get(name)
            if not isinstance(text, str):
                what = "is missing" if name not in rv else f"is {type(text).__name__}, not str"
                raise ValueError(f"restaurants_data[{i}]['reviews'][{k}][{name!r}] {what} "
                                 f"(keys: {sorted(rv)})")
            items.append((text, k + 1))
    return groups, name
