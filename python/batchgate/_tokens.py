"""Exact prompt token counts from the server's own tokenizer (vLLM's /tokenize).

vLLM answers one prompt per call at the server root (``http://host:port/tokenize``,
not under ``/v1``): ``{model?, prompt, add_special_tokens}`` ->
``{count, max_model_len, tokens}``. The requests run on the native engine like
generation does (no GIL, concurrent, under the count cap, never charged to
the token budget or the KV admission). Texts are deduplicated per call and
counts are kept in a bounded LRU on the Dispatcher, so asking again costs no
request.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Hashable, Iterable, List, Optional, Tuple

from . import _native
from ._checks import str_list

#: Counts kept per Dispatcher (keyed by model, add_special_tokens and text).
DEFAULT_CACHE_SIZE = 100_000


class TokenCountCache:
    """A bounded LRU of token counts. Loop thread only (no lock)."""

    __slots__ = ("maxsize", "_d", "hits", "misses")

    def __init__(self, maxsize: int = DEFAULT_CACHE_SIZE) -> None:
        self.maxsize = maxsize
        self._d: "OrderedDict[Hashable, int]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Hashable) -> Optional[int]:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key: Hashable, value: int) -> None:
        if self.maxsize <= 0:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.maxsize:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def stats(self) -> Dict[str, int]:
        return {"size": len(self._d), "maxsize": self.maxsize, "hits": self.hits,
                "misses": self.misses}


def tokenize_url(base_url: str) -> str:
    """vLLM's /tokenize for an OpenAI-style base_url (the engine derives the
    same): the server root, a trailing /v1 dropped."""
    u = base_url.rstrip("/")
    if u.endswith("/v1"):
        u = u[:-3]
    return u + "/tokenize"


def check_texts(texts: Iterable[Any]) -> List[str]:
    """The texts as a list, each checked to be a str (errors name the index)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts must be an iterable of str, not a single "
                        f"{type(texts).__name__} (wrap one text in a list)")
    return str_list(texts, "texts", "an iterable of str")


def plan_missing(cache: TokenCountCache, key0: Tuple[Any, ...], texts: List[str]
                 ) -> Tuple[List[Optional[int]], Dict[str, List[int]]]:
    """Counts known from the cache, and the distinct missing texts with the
    positions each one fills (first-seen order)."""
    out: List[Optional[int]] = [None] * len(texts)
    missing: Dict[str, List[int]] = {}
    for i, t in enumerate(texts):
        slots = missing.get(t)
        if slots is not None:
            slots.append(i)
            continue
        c = cache.get(key0 + (t,))
        if c is None:
            missing[t] = [i]
        else:
            out[i] = c
    return out, missing


async def prompt_counts(d: Any, items: List[Any], chat: bool) -> Optional[List[int]]:
    """Exact prompt tokens per request item (a str, or a list of str sent as
    one request: the sum; chat: a messages JSON str), for the token cap; None
    when an item is none of these (the engine then raises its usual error)."""
    if chat:
        if not all(isinstance(x, str) for x in items):
            return None
        return await d._count_exact(items, _native.KIND_TOKENIZE_CHAT,
                                    {"add_generation_prompt": True}, "conversations")
    flat: List[str] = []
    spans: List[int] = []
    for x in items:
        if isinstance(x, str):
            flat.append(x)
            spans.append(1)
        elif isinstance(x, (list, tuple)) and x and all(isinstance(s, str) for s in x):
            flat.extend(x)
            spans.append(len(x))
        else:
            return None
    counts = await d.count_tokens(flat)
    out: List[int] = []
    k = 0
    for n in spans:
        out.append(sum(counts[k:k + n]))
        k += n
    return out


def renamed_error(exc: BaseException, where: str, url: str) -> BaseException:
    """The engine's error for a unique text, re-said for the caller's index;
    a 404/405 says the server has no /tokenize."""
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, _native.HTTPStatusError) and status in (404, 405):
        text = (f"{where}: the server has no vLLM /tokenize endpoint (HTTP {status} "
                f"from {url}): exact counts need a vLLM server; use "
                f"batchgate.estimate_tokens/estimate_many for estimates instead")
    elif isinstance(exc, _native.HTTPStatusError):
        text = f"{where}: /tokenize answered HTTP {status}: {message}"
    else:
        text = f"{where}: counting tokens failed: {message}"
    if not isinstance(exc, _native.BatchgateError):
        return exc
    new = type(exc)(text)
    for name in ("status", "attempts", "curl_code"):
        try:
            setattr(new, name, getattr(exc, name, None))
        except AttributeError:  # pragma: no cover - every batchgate error has them
            pass
    new.message = message  # type: ignore[attr-defined]
    new.index = int(where[where.index("[") + 1:-1])  # type: ignore[attr-defined]
    return new
