"""Per-call options as openai-python means them, and configuration from the
environment.

Reserved keywords of generate/chat/map/chat_map/as_completed (never sent as
body fields): ``timeout`` (seconds per attempt; None = no timeout; an
``httpx.Timeout`` counts by its ``read`` part, which bounds the connect as well),
``max_retries``, ``extra_headers`` (HTTP headers; a None value removes one),
``extra_query`` (URL query parameters), ``extra_body`` (merged into the JSON
body, winning over the other keywords) and ``raw`` (keep the answer's JSON in
``Result.raw``). Every other keyword is a body field and must be a JSON value.
"""
from __future__ import annotations

import json
import math
import os
import urllib.parse
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Protocol, Tuple, Union

RESERVED = ("timeout", "max_retries", "extra_headers", "extra_query", "extra_body", "raw")
_RESERVED_SET = frozenset(RESERVED)

# with_options() also takes openai-python's client-level names.
ALIASES = {"default_headers": "extra_headers", "default_query": "extra_query"}


class CallOptions(NamedTuple):
    extra_body: Optional[Dict[str, Any]]
    # (timeout_ms, max_retries, header_lines, query, raw) for the native
    # template, or None when nothing differs from the engine's defaults.
    native: Optional[Tuple[int, int, Tuple[str, ...], Optional[str], bool]]


_NO_OPTIONS = CallOptions(None, None)


class TimeoutLike(Protocol):
    """What openai-python users pass as a timeout besides a number: an
    ``httpx.Timeout`` (read, connect, write and pool parts, each seconds or None)."""
    @property
    def connect(self) -> Optional[float]: ...
    @property
    def read(self) -> Optional[float]: ...
    @property
    def write(self) -> Optional[float]: ...
    @property
    def pool(self) -> Optional[float]: ...


Timeout = Union[float, TimeoutLike, None]
_PARTS = ("connect", "read", "write", "pool")


def _seconds(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, "
                        f"not {type(value).__name__}")
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def is_timeout_like(value: Any) -> bool:
    return not isinstance(value, (int, float)) and all(hasattr(value, p) for p in _PARTS)


def timeout_parts(value: Any, name: str = "timeout") -> Tuple[Optional[float], Optional[float]]:
    """(seconds per attempt, connect seconds); either may be None. A plain
    number or None has no connect part (None).

    An httpx.Timeout's ``read`` is how long an answer may take, the closest
    to batchgate's per-attempt timeout (which also bounds the connect); its
    ``connect`` is the connect timeout. write and pool have no counterpart
    (requests are small; the pool never waits) and are only checked."""
    if is_timeout_like(value):
        for p in _PARTS:
            _seconds(f"{name}.{p}", getattr(value, p))
        return _seconds(f"{name}.read", value.read), _seconds(f"{name}.connect", value.connect)
    return _seconds(name, value), None


def check_option(name: str, value: Any) -> Any:
    """Validate one reserved option; returns its normalized value."""
    if name == "timeout":
        return timeout_parts(value)[0]
    if name == "max_retries":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"max_retries must be an int, not {type(value).__name__}")
        if not 0 <= value <= 1000:
            raise ValueError(f"max_retries must be in 0..1000, got {value}")
        return value
    if name in ("extra_headers", "extra_query", "extra_body"):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict, not {type(value).__name__}")
        if name == "extra_headers":
            for k, v in value.items():
                _check_header(k, v)
        elif name == "extra_query":
            for k in value:
                if not isinstance(k, str):
                    raise TypeError(f"extra_query key {k!r} must be a str")
        else:
            for k in value:
                if not isinstance(k, str):
                    raise TypeError(f"extra_body key {k!r} must be a str")
        return dict(value)
    if name == "raw":
        if not isinstance(value, bool):
            raise TypeError(f"raw must be a bool, not {type(value).__name__}")
        return value
    raise TypeError(f"unknown option {name!r}")


_TOKEN_BAD = set(' \t\r\n\0:()<>@,;\\"/[]?={}')


def _check_header(k: Any, v: Any) -> None:
    if not isinstance(k, str) or not (v is None or isinstance(v, str)):
        raise TypeError(f"header {k!r} must map a str name to a str value (or None)")
    if not k or any(c in _TOKEN_BAD or ord(c) < 0x20 or ord(c) > 0x7e for c in k):
        raise ValueError(f"invalid header name {k!r}")
    if v is not None and any(c in "\r\n\0" for c in v):
        raise ValueError(f"header {k!r}: value must not contain CR, LF or NUL")


def header_lines(headers: Mapping[str, Optional[str]]) -> List[str]:
    # libcurl: "Name:" removes a header, "Name;" sends it with an empty value.
    out = []
    for k, v in headers.items():
        if v is None:
            out.append(f"{k}:")
        elif v == "":
            out.append(f"{k};")
        else:
            out.append(f"{k}: {v}")
    return out


def call_options(defaults: Mapping[str, Any], params: Dict[str, Any]) -> CallOptions:
    """Pop the reserved keywords from params (in place) and combine them with
    the view's defaults (with_options)."""
    if not defaults and _RESERVED_SET.isdisjoint(params):
        return _NO_OPTIONS
    o = dict(defaults)
    for k in RESERVED:
        if k in params:
            v = check_option(k, params.pop(k))
            if k in ("extra_headers", "extra_query", "extra_body") and k in o:
                v = {**o[k], **v}  # the call's entries win over the view's
            o[k] = v
    timeout_ms = -1
    if "timeout" in o:
        t = o["timeout"]
        timeout_ms = 0 if not t else max(1, int(round(t * 1000)))
    query = None
    if o.get("extra_query"):
        query = urllib.parse.urlencode(o["extra_query"], doseq=True)
    native: Optional[Tuple[int, int, Tuple[str, ...], Optional[str], bool]] = (
              timeout_ms, o.get("max_retries", -1),
              tuple(header_lines(o.get("extra_headers") or {})), query, bool(o.get("raw")))
    if native == (-1, -1, (), None, False):
        native = None
    return CallOptions(o.get("extra_body") or None, native)


def body_json(body: Mapping[str, Any]) -> str:
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        pass
    for k, v in body.items():  # name the culprit
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"keyword {k}={v!r:.80} is not a JSON value and not an option of "
                            f"this call (body fields must be JSON; options: "
                            f"{', '.join(RESERVED)}): {e}") from None
    raise TypeError("request fields are not JSON")


# ---- environment ---------------------------------------------------------

def resolve_connection(base_url: Optional[str], api_key: Optional[str]
                       ) -> Tuple[str, Optional[str]]:
    """base_url and api_key from the arguments or the environment.

    Precedence: explicit arguments, then VLLM_BASE_URL / VLLM_API_KEY, then
    OPENAI_BASE_URL / OPENAI_API_KEY. A key is only taken from the family
    its URL came from, so an OPENAI_API_KEY meant for api.openai.com is never
    sent to a VLLM_BASE_URL server.
    """
    family = None
    if base_url is None:
        for fam in ("VLLM", "OPENAI"):
            v = os.environ.get(f"{fam}_BASE_URL", "").strip()
            if v:
                base_url, family = v, fam
                break
        if base_url is None:
            raise ValueError("no base_url: pass Dispatcher(base_url=...) or set VLLM_BASE_URL "
                             "(or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1")
    if api_key is None:
        for fam in ((family,) if family else ("VLLM", "OPENAI")):
            v = os.environ.get(f"{fam}_API_KEY", "").strip()
            if v:
                api_key = v
                break
    return base_url, api_key


def env_model() -> Optional[str]:
    for name in ("LLM_MODEL", "VLLM_MODEL"):
        v = os.environ.get(name, "").strip()
        if v:
            return v
    return None
