"""Keep secrets out of output: URL user info and API keys.

A ``base_url`` may carry credentials (``http://user:pw@host/v1``); libcurl
sends them as HTTP Basic auth, so such URLs are accepted, but whatever is
shown to a person (repr, exceptions, logs, CLI output) goes through
:func:`redact_url` or :func:`redact`. Header values built from user input go
through :func:`check_header_value` so they cannot inject headers.
"""
from __future__ import annotations

import base64
import re
from typing import Iterable, Optional, Tuple
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["redact_url", "redact", "split_userinfo", "secrets_of", "check_header_value", "MASK"]

MASK = "***"

# scheme://userinfo@ at the start of a URL or anywhere in a text.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#@\s]*)@")


def _mask_userinfo(m: "re.Match[str]") -> str:
    info = m.group(2)
    user, sep, _ = info.partition(":")
    # A lone user name may itself be a token: mask it too.
    return f"{m.group(1)}{user}:{MASK}@" if sep and user else f"{m.group(1)}{MASK}@"


def redact_url(url: object) -> str:
    """``url`` with any password (or a lone user name) replaced by ``***``.
    Not-a-string inputs are shown by type only."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    return _USERINFO.sub(_mask_userinfo, url)


def redact(text: str, secrets: Iterable[Optional[str]] = ()) -> str:
    """``text`` with every URL's user info masked and every given secret
    (API keys, passwords; empty/None ignored) replaced by ``***``."""
    out = redact_url(text)
    for s in secrets:
        if s and len(s) >= 3:
            out = out.replace(s, MASK)
    return out


def split_userinfo(url: str) -> Tuple[str, Optional[str]]:
    """(url without user info, ``Authorization: Basic`` value or None), for
    clients such as urllib that do not take credentials from the URL."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    info, _, host = parts.netloc.rpartition("@")
    user, _, pw = info.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(pw)}".encode()).decode("ascii")
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), \
        f"Basic {token}"


def check_header_value(name: str, value: str) -> None:
    """Raise ValueError if ``value`` has CR, LF or NUL (it would end the header
    and start another). The message names the field, never the value."""
    for ch, label in (("\r", "CR"), ("\n", "LF"), ("\0", "NUL")):
        if ch in value:
            raise ValueError(f"{name} must not contain {label} characters "
                             "(it would inject HTTP headers)")


def secrets_of(url: str) -> Tuple[str, ...]:
    """The password (and user name) in a URL, for :func:`redact`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ()
    return tuple(s for s in (parts.password, unquote(parts.password or "")) if s)
