"""A small HTTP/1.1 server on asyncio.Protocol: keep-alive, pipelining,
Content-Length and chunked bodies, ``Expect: 100-continue``.

Requests on one connection are answered in order, one at a time; bytes that
arrive meanwhile wait in the buffer. A malformed request gets a 4xx answer and
the connection is closed; an exception in a handler becomes a 500. Neither
stops the server.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Awaitable, Callable, Dict, Optional, Set, Tuple, Union

log = logging.getLogger("batchgate.simserver")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 505: "HTTP Version Not Supported",
}

JSON_TYPE = "application/json"


class Request:
    __slots__ = ("method", "path", "query", "headers", "body")

    def __init__(self, method: str, path: str, query: str, headers: Dict[str, str],
                 body: bytes) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: str = JSON_TYPE,
                 headers: Tuple[Tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def json_response(status: int, obj: object, headers: Tuple[Tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), JSON_TYPE, headers)


Handler = Callable[[Request], Union[Response, Awaitable[Response]]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode_chunked(buf: bytearray, start: int) -> Optional[Tuple[bytes, int]]:
    """(body, end offset) of a complete chunked body at ``start``, or None."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > 1024:
                raise BadRequest(400, "chunk size line too long")
            return None
        size_field = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise BadRequest(400, f"invalid chunk size {size_field[:20]!r}") from None
        if size < 0:
            raise BadRequest(400, "negative chunk size")
        if len(out) + size > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        pos = eol + 2
        if size == 0:
            # Skip trailer fields up to the empty line.
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise BadRequest(400, "chunk not followed by CRLF")
        pos += size + 2


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler, connections: Set["HttpProtocol"]) -> None:
        self._handler = handler
        self._connections = connections
        # Set by connection_made before any other callback can run.
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._buf = bytearray()
        self._busy = False
        self._task: Optional[asyncio.Task] = None
        self._closing = False
        self._paused = False
        # Parsed head of the request whose body is still arriving.
        self._head: Optional[Tuple[str, str, str, Dict[str, str], bool, int, bool]] = None
        self._sent_continue = False

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._closing = True
        self._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the handler aborts its sequences
        self._task = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()
        elif len(self._buf) > MAX_HEADER_BYTES + MAX_BODY_BYTES and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> Optional[bool]:
        # As uvicorn (vLLM's server) does: EOF closes the connection, and the
        # request in progress is aborted, its KV blocks freed.
        return None

    def close(self) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.close()

    # -- parsing ----------------------------------------------------------------

    def _parse_head(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise BadRequest(431, "request headers too large")
            return False
        if end > MAX_HEADER_BYTES:
            raise BadRequest(431, "request headers too large")
        lines = buf[:end].decode("latin-1").split("\r\n")
        del buf[:end + 4]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise BadRequest(400, "malformed request line")
        method, target, version = parts
        if version == "HTTP/1.1":
            keep_alive = True
        elif version == "HTTP/1.0":
            keep_alive = False
        elif version.startswith("HTTP/"):
            raise BadRequest(505, f"unsupported HTTP version {version[:16]!r}")
        else:
            raise BadRequest(400, "malformed request line")
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(400, "malformed header line")
            name = name.lower()
            value = value.strip()
            if name in headers:
                if name == "content-length" and headers[name] != value:
                    raise BadRequest(400, "conflicting Content-Length headers")
                headers[name] = headers[name] + ", " + value
            else:
                headers[name] = value
        conn = headers.get("connection", "").lower()
        if "close" in conn:
            keep_alive = False
        elif "keep-alive" in conn:
            keep_alive = True
        chunked = False
        length = 0
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise BadRequest(501, f"unsupported Transfer-Encoding {te[:32]!r}")
            chunked = True
        elif "content-length" in headers:
            cl = headers["content-length"]
            if not cl.isdigit():
                raise BadRequest(400, "invalid Content-Length")
            length = int(cl)
            if length > MAX_BODY_BYTES:
                raise BadRequest(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        path, _, query = target.partition("?")
        expect = headers.get("expect", "").lower() == "100-continue"
        self._head = (method, path, query, headers, keep_alive, length, chunked)
        self._sent_continue = not expect
        return True

    def _process(self) -> None:
        """Answer every complete request in the buffer, in order."""
        while not self._busy and not self._closing:
            try:
                if self._head is None and not self._parse_head():
                    return
                assert self._head is not None  # set by _parse_head()
                method, path, query, headers, keep_alive, length, chunked = self._head
                if chunked:
                    got = _decode_chunked(self._buf, 0)
                    if got is None:
                        self._maybe_continue()
                        return
                    body, used = got
                    del self._buf[:used]
                else:
                    if len(self._buf) < length:
                        self._maybe_continue()
                        return
                    body = bytes(self._buf[:length])
                    del self._buf[:length]
            except BadRequest as e:
                self._write(json_response(e.status, {"detail": str(e)}), keep_alive=False)
                return
            self._head = None
            request = Request(method, path, query, headers, body)
            try:
                result = self._handler(request)
            except Exception:  # a handler bug must not take the server down
                log.exception("handler failed for %s %s", method, path)
                result = _internal_error()
            if isinstance(result, Response):
                self._write(result, keep_alive)
                continue
            self._busy = True
            self._task = asyncio.ensure_future(result)
            self._task.add_done_callback(functools.partial(self._done, keep_alive=keep_alive))

    def _maybe_continue(self) -> None:
        if not self._sent_continue:
            self._sent_continue = True
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _done(self, task: asyncio.Task, keep_alive: bool) -> None:
        self._task = None
        self._busy = False
        if self._closing:
            return
        if task.cancelled():
            response = _internal_error()
        elif task.exception() is not None:
            exc = task.exception()
            log.error("handler failed", exc_info=exc)
            response = _internal_error()
        else:
            response = task.result()
        self._write(response, keep_alive)
        if self._paused and not self._closing:
            self._paused = False
            self._transport.resume_reading()
        if self._buf:
            self._process()

    def _write(self, response: Response, keep_alive: bool) -> None:
        if self._closing:
            return
        status = response.status
        extra = "".join(f"{k}: {v}\r\n" for k, v in response.headers)
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
                f"server: batchgate-simserver\r\n"
                f"content-type: {response.content_type}\r\n"
                f"content-length: {len(response.body)}\r\n"
                f"{extra}"
                f"{'' if keep_alive else 'connection: close' + chr(13) + chr(10)}\r\n")
        self._transport.write(head.encode("latin-1") + response.body)
        if not keep_alive:
            self.close()


def _internal_error() -> Response:
    return json_response(500, {"error": {"message": "Internal server error",
                                         "type": "InternalServerError",
                                         "param": None, "code": 500}})
