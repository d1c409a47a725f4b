"""FALLBACK dispatcher in pure Python (asyncio streams, HTTP/1.1 keep-alive).

Used by ``batchgate run`` / ``batchgate demo`` only when the native
``batchgate.Dispatcher`` is not available in this build. It has the same
interface (``generate``, ``stats``, ``aclose``, ``async with``) and the same
caps (request count, and optionally estimated tokens in flight), but none of
the native engine's speed. Plain ``http://`` only.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from ._native import BatchgateError
from .sizing import estimate_tokens

RETRY_STATUS = frozenset((408, 429, 500, 502, 503, 504))


class FallbackHTTPStatusError(BatchgateError):
    def __init__(self, status: int, message: str, attempts: int) -> None:
        super().__init__(f"HTTP {status}: {message} (after {attempts} attempt(s))")
        self.status = status
        self.message = message
        self.attempts = attempts


class FallbackTransportError(BatchgateError):
    pass


class FallbackResult:
    __slots__ = ("text", "finish_reason", "usage", "latency", "attempts")

    def __init__(self, text: str, finish_reason: Optional[str], usage: Dict[str, Any],
                 latency: float, attempts: int) -> None:
        self.text = text
        self.finish_reason = finish_reason
        self.usage = usage
        self.latency = latency
        self.attempts = attempts


class _WeightedGate:
    """FIFO gate: count permits and (optionally) token weight in flight."""

    def __init__(self, max_count: int, max_tokens: Optional[int]) -> None:
        self.max_count = max_count
        self.max_tokens = max_tokens
        self.count = 0
        self.tokens = 0
        self.peak_count = 0
        self.peak_tokens = 0
        self._waiters: Deque[Tuple[int, asyncio.Future]] = deque()

    def _fits(self, w: int) -> bool:
        if self.count >= self.max_count:
            return False
        return self.max_tokens is None or self.tokens + w <= self.max_tokens

    def _take(self, w: int) -> None:
        self.count += 1
        self.tokens += w
        self.peak_count = max(self.peak_count, self.count)
        self.peak_tokens = max(self.peak_tokens, self.tokens)

    async def acquire(self, w: int) -> None:
        if not self._waiters and self._fits(w):
            self._take(w)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((w, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(w)  # woken and cancelled at once: hand the permit on
            else:
                try:
                    self._waiters.remove((w, fut))
                except ValueError:
                    pass
            raise

    def release(self, w: int) -> None:
        self.count -= 1
        self.tokens -= w
        # Wake in FIFO order only: a big head waiter is not starved by small ones.
        while self._waiters and self._fits(self._waiters[0][0]):
            w2, fut = self._waiters.popleft()
            if fut.done():
                continue
            self._take(w2)
            fut.set_result(None)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class FallbackDispatcher:
    """Pure-Python stand-in for ``batchgate.Dispatcher`` (see the module doc)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 *, max_concurrent: int = 20, max_inflight_tokens: Optional[int] = None,
                 timeout: Optional[float] = 600.0, connect_timeout: Optional[float] = 10.0,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retry_after: float = 60.0, **_ignored: Any) -> None:
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"the fallback dispatcher supports http:// URLs only, got {base_url!r}")
        self.base_url = base_url
        self.model = model
        self.max_concurrent = max_concurrent
        self.max_inflight_tokens = max_inflight_tokens
        self._host = u.hostname
        self._port = u.port or 80
        self._path = u.path.rstrip("/") + "/completions"
        self._api_key = api_key
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_retries = max_retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._max_retry_after = max_retry_after
        self._gate = _WeightedGate(max_concurrent, max_inflight_tokens)
        self._idle: List[_Conn] = []
        self._closed = False
        self._submitted = self._completed = self._attempts = self._retries = 0

    def __repr__(self) -> str:
        return f"<batchgate FallbackDispatcher {self.base_url} max_concurrent={self.max_concurrent}>"

    def stats(self) -> Dict[str, int]:
        return {"submitted": self._submitted, "completed": self._completed,
                "attempts": self._attempts, "retries": self._retries,
                "in_flight": self._gate.count, "max_in_flight": self._gate.peak_count,
                "tokens_in_flight": self._gate.tokens,
                "max_tokens_in_flight": self._gate.peak_tokens}

    async def __aenter__(self) -> "FallbackDispatcher":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for c in self._idle:
            c.close()
        self._idle.clear()

    async def generate(self, prompt: str, **params: Any) -> FallbackResult:
        if self._closed:
            raise BatchgateError("the dispatcher is closed")
        t0 = time.monotonic()
        body: Dict[str, Any] = {"prompt": prompt}
        if self.model is not None:
            body["model"] = self.model
        body.update(params)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        weight = estimate_tokens(prompt) + int(params.get("max_tokens") or 16)
        if self.max_inflight_tokens is not None:
            weight = min(weight, self.max_inflight_tokens)
        self._submitted += 1
        attempt = 0
        while True:
            attempt += 1
            await self._gate.acquire(weight)
            try:
                self._attempts += 1
                status, headers, data, transport_err = await self._post(payload)
            finally:
                self._gate.release(weight)
            if transport_err is None and status == 200:
                self._completed += 1
                return self._result(data, time.monotonic() - t0, attempt)
            retryable = transport_err is not None or status in RETRY_STATUS
            if not retryable or attempt > self._max_retries:
                self._completed += 1
                if transport_err is not None:
                    raise FallbackTransportError(
                        f"{self.base_url}: {transport_err} (after {attempt} attempt(s))")
                raise FallbackHTTPStatusError(status, _error_message(data), attempt)
            self._retries += 1
            delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2
            ra = headers.get("retry-after", "") if headers else ""
            if ra.strip().isdigit():
                delay = min(float(ra), self._max_retry_after)
            await asyncio.sleep(delay)

    def _result(self, data: bytes, latency: float, attempts: int) -> FallbackResult:
        try:
            obj = json.loads(data)
            choice = obj["choices"][0]
            text = choice["text"]
            if not isinstance(text, str):
                raise TypeError("choices[0].text is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise BatchgateError(f"malformed response from {self.base_url}: {e!r}") from None
        return FallbackResult(text, choice.get("finish_reason"), obj.get("usage") or {},
                              latency, attempts)

    async def _connect(self) -> _Conn:
        if self._idle:
            return self._idle.pop()
        r, w = await asyncio.wait_for(asyncio.open_connection(self._host, self._port),
                                      self._connect_timeout)
        return _Conn(r, w)

    async def _post(self, payload: bytes
                    ) -> Tuple[int, Dict[str, str], bytes, Optional[str]]:
        head = (f"POST {self._path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n")
        if self._api_key:
            head += f"Authorization: Bearer {self._api_key}\r\n"
        request = head.encode("latin-1") + b"\r\n" + payload
        conn: Optional[_Conn] = None
        try:
            conn = await self._connect()
            conn.writer.write(request)
            status, headers, data = await asyncio.wait_for(self._read_response(conn),
                                                           self._timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
            if conn is not None:
                conn.close()
            what = "timed out" if isinstance(e, asyncio.TimeoutError) else (str(e) or type(e).__name__)
            return 0, {}, b"", what
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if headers.get("connection", "").lower() == "close" or self._closed:
            conn.close()
        else:
            self._idle.append(conn)
        return status, headers, data, None

    @staticmethod
    async def _read_response(conn: _Conn) -> Tuple[int, Dict[str, str], bytes]:
        line = await conn.reader.readuntil(b"\r\n")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError(f"not an HTTP response: {line[:80]!r}")
        status = int(parts[1])
        headers: Dict[str, str] = {}
        while True:
            h = await conn.reader.readuntil(b"\r\n")
            if h == b"\r\n":
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await conn.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await conn.reader.readuntil(b"\r\n")
                    break
                chunks.append(await conn.reader.readexactly(size))
                await conn.reader.readexactly(2)
            return status, headers, b"".join(chunks)
        n = int(headers.get("content-length", "0"))
        return status, headers, await conn.reader.readexactly(n)


def _error_message(data: bytes) -> str:
    try:
        obj = json.loads(data)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    except ValueError:
        return data[:200].decode("utf-8", "replace")
