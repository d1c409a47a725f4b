#!/usr/bin/env python3
"""A fake OpenAI-compatible (vLLM-like) HTTP/1.1 server for tests, loopback only.

Answers are deterministic: completion text is "echo:" + prompt, chat content is
"echo:" + the last message's content. Faults are chosen per request by a
directive inside the prompt (or last message), e.g. "hello [[status=503,times=2]]":

  delay=S            sleep S seconds before answering
  status=N           answer with HTTP N and an OpenAI-style error body
  times=K            apply the fault only to the first K attempts of this exact
                     request (same prompts/messages); later attempts succeed
  retry_after=S      add "Retry-After: S" (seconds)
  retry_after_date=S add "Retry-After: <HTTP date S seconds from now>"
  msg=TEXT           error message (no commas or brackets)
  msg_repeat=K       the error message is TEXT repeated K times (long messages)
  msg_hex=HEX        the error message is these raw bytes, spliced into the JSON
                     body unescaped (invalid UTF-8 on purpose)
  fault=reset        headers + part of the body, then a TCP RST
  fault=truncate     Content-Length larger than the body, then a clean close
  fault=close        close the connection without any answer
  fault=nonjson      200 with an HTML body
  fault=oversize     200 with a valid body whose text has `size` bytes (default 8 MiB)
  fault=stall        say nothing for `stall` seconds (default 3600) or until the
                     client goes away
  fault=stall_body   headers and part of the body, then stall
  shape=NAME         200 with a wrong JSON shape: notobj nochoices choices_obj
                     text_int content_int index_oob index_dup index_str fewer extra
                     choice_str finish_int usage_str error200 (message from msg=)
                     trailing (a valid answer followed by garbage)

POST /tokenize (vLLM's, at the server root) answers {"count", "max_model_len",
"tokens"} with one token per whitespace-separated word of "prompt" (or of the
messages' contents), honouring delay= and status= directives; FakeVLLM(tokenize=
False) (or --no-tokenize) answers 404 there, like an OpenAI server.

Statistics (max concurrency seen, per-request attempt counts, ...) come from
FakeVLLM.stats() in-process or GET /_stats; POST /_reset clears them. A reset
starts a new record: requests begun before it are off it even if they end
after it (a client can read an answer before the handler has done its
bookkeeping), and open_connections stays the live count.

FakeVLLM.hold = N makes every answer (completions and chat) wait until N of
them have been in flight at once since the last reset, and 0.1 s more (so one
more let through shows too), so a test can check a concurrency cap exactly
instead of hoping the requests overlap. A hold that waits hold_timeout seconds
(5) answers anyway, counts in stats()["hold_timeouts"] and disarms (hold = 0),
so a cap that lets fewer through fails fast.

Use as a pytest fixture (FakeVLLM().start_in_thread()) or run it:
    python tests/fake_vllm.py --port 0     # prints "PORT <n>" on stdout
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from typing import Any, Dict, Optional

from batchgate.simserver.server import finish_accepts  # shared stop-race fix

DIRECTIVE = re.compile(r"\[\[([^\]]*)\]\]")

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
    422: "Unprocessable Entity", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


def parse_directives(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for m in DIRECTIVE.finditer(text):
        for part in m.group(1).split(","):
            if "=" in part:
                k, v = part.split("=", 1)
                out[k.strip()] = v.strip()
    return out


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.epoch = 0
        self.open_connections = 0  # live: a reset does not forget connections
        self.reset()

    def reset(self) -> None:
        # Requests begun before this carry an older epoch: their ends are not
        # counted (else in_flight would go negative and hide one request).
        self.epoch += 1
        self.requests = 0
        self.by_path: Counter = Counter()
        self.counts: Counter = Counter()  # attempts per request key
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_tokens = 0
        self.max_in_flight_tokens = 0
        self.connections = 0
        self.max_open_connections = self.open_connections
        self.hold_timeouts = 0
        self.hold_reached: Optional[float] = None  # when `hold` were first in flight
        self.auth: Counter = Counter()
        self.last_headers: Dict[str, str] = {}
        self.last_body: Any = None

    def snapshot(self) -> Dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "by_path": dict(self.by_path),
                "counts": dict(self.counts),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "in_flight_tokens": self.in_flight_tokens,
                "max_in_flight_tokens": self.max_in_flight_tokens,
                "connections": self.connections,
                "open_connections": self.open_connections,
                "max_open_connections": self.max_open_connections,
                "hold_timeouts": self.hold_timeouts,
                "auth": dict(self.auth),
                "last_headers": dict(self.last_headers),
                "last_body": self.last_body,
            }


class FakeVLLM:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0,
                 api_key: Optional[str] = None, tokenize: bool = True) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fake server listens on loopback only")
        self.host = host
        self.port = port
        self.latency = latency
        self.api_key = api_key
        self.tokenize = tokenize
        self.hold = 0
        self.hold_timeout = 5.0
        self._stats = _Stats()
        self._server: Optional[asyncio.AbstractServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._tasks: set = set()
        self._writers: set = set()

    # ---- lifecycle -------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> "FakeVLLM":
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, backlog=2048, limit=1 << 24)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stops listening and ends every connection, started or not (on the
        server's own loop: start_in_thread or main).

        A handler task that never ran, or a transport left open, would be
        destroyed later and warn inside whichever test runs then."""
        if self._server:
            # A connection accepted but not yet made into a transport when the
            # server closes is left half-made (an assert in Server._attach):
            # let asyncio's setup tasks finish, then close in the same step.
            await finish_accepts()
            self._server.close()
            # Connections accepted in the listener's last round are still being
            # set up by asyncio's own tasks, which then start handlers: end
            # rounds until the loop (this server's own) has no other task.
            me = asyncio.current_task()
            for _ in range(100):
                await asyncio.sleep(0)
                others = asyncio.all_tasks() - {me}
                if not others:
                    break
                for t in list(self._tasks):
                    t.cancel()
                await asyncio.wait(others, timeout=1)
            for w in list(self._writers):
                w.close()
            if hasattr(self._server, "close_clients"):  # 3.13+: also transports
                self._server.close_clients()  # whose handler was never started
            if self._writers:
                await asyncio.wait([asyncio.ensure_future(w.wait_closed())
                                    for w in self._writers], timeout=2)
            self._writers.clear()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
            self._server = None

    def start_in_thread(self) -> "FakeVLLM":
        ready = threading.Event()
        err: list = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # surfaced to the caller below
                err.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.aclose())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-vllm", daemon=True)
        self._thread.start()
        ready.wait()
        if err:
            raise err[0]
        return self

    def stop(self) -> None:
        if self._thread and self._loop:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "FakeVLLM":
        return self.start_in_thread()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> Dict[str, Any]:
        return self._stats.snapshot()

    def reset(self) -> None:
        with self._stats.lock:
            self._stats.reset()

    # ---- HTTP ------------------------------------------------------------
    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Plain function, so the connection and its task are on record at once,
        # before the task first runs: aclose() can then end both.
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        st = self._stats
        with st.lock:
            st.connections += 1
            st.open_connections += 1
            st.max_open_connections = max(st.max_open_connections, st.open_connections)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, path, version = lines[0].split(" ", 2)
                except ValueError:
                    return
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    await self._send(writer, 411, {"error": {"message": "no chunked bodies"}},
                                     close=True)
                    return
                else:
                    body = b""
                keep = (version == "HTTP/1.1" and headers.get("connection", "").lower() != "close")
                keep = await self._dispatch(method, path, headers, body, writer, reader) and keep
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return
        finally:
            with st.lock:
                st.open_connections -= 1
            try:
                writer.close()
            except Exception:
                pass
            self._writers.discard(writer)

    async def _send(self, writer: asyncio.StreamWriter, status: int, obj: Any = None,
                    raw: Optional[bytes] = None, extra: Optional[Dict[str, str]] = None,
                    close: bool = False, content_type: str = "application/json",
                    declared_len: Optional[int] = None, send_bytes: Optional[int] = None) -> None:
        body = raw if raw is not None else json.dumps(obj).encode()
        hdr = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
               f"Content-Type: {content_type}",
               f"Content-Length: {declared_len if declared_len is not None else len(body)}"]
        for k, v in (extra or {}).items():
            hdr.append(f"{k}: {v}")
        if close:
            hdr.append("Connection: close")
        data = ("\r\n".join(hdr) + "\r\n\r\n").encode() + (
            body if send_bytes is None else body[:send_bytes])
        writer.write(data)
        await writer.drain()

    def _auth_ok(self, headers: Dict[str, str]) -> bool:
        got = headers.get("authorization")
        with self._stats.lock:
            self._stats.auth["bearer" if got and got.startswith("Bearer ") else "none"] += 1
        return self.api_key is None or got == f"Bearer {self.api_key}"

    async def _dispatch(self, method: str, path: str, headers: Dict[str, str], body: bytes,
                        writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        st = self._stats
        if path == "/_stats":
            await self._send(writer, 200, self.stats())
            return True
        if path == "/_reset" and method == "POST":
            self.reset()
            await self._send(writer, 200, {"ok": True})
            return True
        if path == "/v1/models":
            await self._send(writer, 200, {"object": "list", "data": [{"id": "fake"}]})
            return True
        if method == "POST" and path == "/tokenize" and self.tokenize:
            return await self._tokenize(path, body, writer)
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
            return True
        if not self._auth_ok(headers):
            await self._send(writer, 401, {"error": {"message": "bad api key"}})
            return True
        try:
            req = json.loads(body)
        except ValueError:
            await self._send(writer, 400, {"error": {"message": "request body is not JSON"}})
            return True
        chat = path.endswith("/chat/completions")
        if chat:
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs:
                await self._send(writer, 400, {"error": {"message": "messages required"}})
                return True
            prompts = [str(msgs[-1].get("content", ""))]
            key = json.dumps(msgs, sort_keys=True)
        else:
            p = req.get("prompt")
            if isinstance(p, str):
                prompts = [p]
            elif isinstance(p, list) and all(isinstance(x, str) for x in p):
                prompts = p
            else:
                await self._send(writer, 400, {"error": {"message": "prompt must be str or list"}})
                return True
            key = json.dumps(p)
        n = int(req.get("n", 1) or 1)
        max_tokens = int(req.get("max_tokens") or 16)
        weight = max_tokens * len(prompts)
        d = {}
        for p in prompts:
            d.update(parse_directives(p))
        with st.lock:
            st.requests += 1
            st.by_path[path] += 1
            st.counts[key] += 1
            attempt = st.counts[key]
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            st.in_flight_tokens += weight
            st.max_in_flight_tokens = max(st.max_in_flight_tokens, st.in_flight_tokens)
            st.last_headers = dict(headers)
            st.last_body = req
            epoch = st.epoch
        try:
            await self._hold()
            return await self._answer(writer, reader, chat, req, prompts, n, d, attempt)
        finally:
            with st.lock:
                if st.epoch == epoch:
                    st.in_flight -= 1
                    st.in_flight_tokens -= weight

    async def _hold(self) -> None:
        """Wait until `hold` answers have been in flight at once (see the top)."""
        st = self._stats
        deadline = time.monotonic() + self.hold_timeout
        while self.hold:
            now = time.monotonic()
            if st.max_in_flight >= self.hold:
                if st.hold_reached is None:
                    st.hold_reached = now
                if now >= st.hold_reached + 0.1:
                    return
            elif now >= deadline:
                with st.lock:
                    st.hold_timeouts += 1
                self.hold = 0
                return
            await asyncio.sleep(0.002)

    async def _tokenize(self, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        st = self._stats
        try:
            req = json.loads(body)
        except ValueError:
            await self._send(writer, 400, {"error": {"message": "request body is not JSON"}})
            return True
        if "messages" in req:
            text = " ".join(str(m.get("content", "")) for m in req["messages"])
        else:
            text = req.get("prompt")
        if not isinstance(text, str):
            await self._send(writer, 400, {"error": {"message": "prompt must be a str"}})
            return True
        d = parse_directives(text)
        with st.lock:
            st.requests += 1
            st.by_path[path] += 1
            st.counts[text] += 1
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            st.last_body = req
            epoch = st.epoch
        try:
            delay = float(d.get("delay", self.latency))
            if delay > 0:
                await asyncio.sleep(delay)
            if "status" in d:
                await self._send(writer, int(d["status"]),
                                 {"error": {"message": d.get("msg", "fake tokenize error")}})
                return True
            n = len(text.split())
            await self._send(writer, 200, {"count": n, "max_model_len": 4096,
                                           "tokens": list(range(n))})
            return True
        finally:
            with st.lock:
                if st.epoch == epoch:
                    st.in_flight -= 1

    async def _answer(self, writer, reader, chat, req, prompts, n, d, attempt) -> bool:
        delay = float(d.get("delay", self.latency))
        if delay > 0:
            await asyncio.sleep(delay)
        times = int(d["times"]) if "times" in d else None
        faulty = times is None or attempt <= times
        ok_body = self._ok_body(chat, req, prompts, n)
        if faulty and "status" in d:
            status = int(d["status"])
            extra = {}
            if "retry_after" in d:
                extra["Retry-After"] = d["retry_after"]
            if "retry_after_date" in d:
                extra["Retry-After"] = email.utils.formatdate(
                    time.time() + float(d["retry_after_date"]), usegmt=True)
            msg = d.get("msg", f"fake error {status}") * int(d.get("msg_repeat", 1))
            if "msg_hex" in d:
                raw = (b'{"error":{"message":"' + bytes.fromhex(d["msg_hex"]) +
                       b'","code":' + str(status).encode() + b'}}')
                await self._send(writer, status, raw=raw, extra=extra)
                return True
            await self._send(writer, status, {"error": {"message": msg, "code": status}},
                             extra=extra)
            return True
        fault = d.get("fault") if faulty else None
        shape = d.get("shape") if faulty else None
        if fault == "close":
            writer.transport.abort()
            return False
        if fault in ("stall", "stall_body"):
            if fault == "stall_body":
                raw = json.dumps(ok_body).encode()
                await self._send(writer, 200, raw=raw, send_bytes=len(raw) // 2)
            try:
                # Ends early when the client gives up and closes.
                await asyncio.wait_for(reader.read(1), float(d.get("stall", 3600)))
            except asyncio.TimeoutError:
                pass
            writer.transport.abort()
            return False
        if fault == "reset":
            raw = json.dumps(ok_body).encode()
            await self._send(writer, 200, raw=raw, send_bytes=len(raw) // 2)
            sock = writer.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault == "truncate":
            raw = json.dumps(ok_body).encode()
            await self._send(writer, 200, raw=raw, declared_len=len(raw) + 100, close=True)
            return False
        if fault == "nonjson":
            await self._send(writer, 200, raw=b"<html><body>502 upstream oops</body></html>",
                             content_type="text/html")
            return True
        if fault == "oversize":
            size = int(d.get("size", 8 << 20))
            body = dict(ok_body)
            body["choices"] = [dict(ok_body["choices"][0])]
            key = "message" if chat else "text"
            if chat:
                body["choices"][0]["message"] = {"role": "assistant", "content": "x" * size}
            else:
                body["choices"][0][key] = "x" * size
            await self._send(writer, 200, body)
            return True
        if shape == "trailing":
            await self._send(writer, 200, raw=json.dumps(ok_body).encode() + b" {garbage")
            return True
        if shape:
            bad = self._bad_shape(shape, ok_body, chat)
            if shape == "error200" and "msg" in d:
                bad["error"]["message"] = d["msg"] * int(d.get("msg_repeat", 1))
            await self._send(writer, 200, bad)
            return True
        await self._send(writer, 200, ok_body)
        return True

    @staticmethod
    def _ok_body(chat: bool, req: Dict[str, Any], prompts, n: int) -> Dict[str, Any]:
        choices = []
        for i, p in enumerate(prompts):
            for j in range(n):
                text = "echo:" + p if n == 1 else f"echo{j}:" + p
                if chat:
                    choices.append({"index": i * n + j, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}})
                else:
                    choices.append({"index": i * n + j, "text": text, "finish_reason": "stop",
                                    "logprobs": None})
        # Answer out of order so clients must map by "index".
        choices.reverse()
        pt = sum(len(p.split()) for p in prompts)
        ct = sum(len(c.get("text", c.get("message", {}).get("content", "")).split())
                 for c in choices)
        return {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                "created": 0, "model": req.get("model", "fake"), "choices": choices,
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}

    @staticmethod
    def _bad_shape(shape: str, ok: Dict[str, Any], chat: bool) -> Any:
        b = json.loads(json.dumps(ok))
        ch = b["choices"]
        if shape == "notobj":
            return [1, 2, 3]
        if shape == "nochoices":
            del b["choices"]
        elif shape == "choices_obj":
            b["choices"] = {"0": ch[0]}
        elif shape == "text_int":
            ch[0]["text"] = 42
            ch[0].pop("message", None)
        elif shape == "content_int":
            ch[0]["message"] = {"role": "assistant", "content": 42}
        elif shape == "index_oob":
            ch[0]["index"] = len(ch) + 5
        elif shape == "index_dup":
            if len(ch) >= 2:
                ch[-1]["index"] = ch[0]["index"]
            else:
                ch.append(dict(ch[0]))
        elif shape == "index_str":
            ch[0]["index"] = "zero"
        elif shape == "fewer":
            ch.pop()
        elif shape == "extra":
            c = dict(ch[0])
            c["index"] = len(ch)
            ch.append(c)
        elif shape == "choice_str":
            ch[0] = "just a string"
        elif shape == "finish_int":
            ch[0]["finish_reason"] = 7
        elif shape == "usage_str":
            b["usage"] = "lots"
        elif shape == "error200":
            return {"error": {"message": "engine overloaded", "code": 500}}
        else:
            raise ValueError(f"unknown shape {shape!r}")
        return b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--no-tokenize", action="store_true")
    args = ap.parse_args(argv)
    srv = FakeVLLM(port=args.port, latency=args.latency, api_key=args.api_key,
                   tokenize=not args.no_tokenize)

    async def run() -> None:
        await srv.start()
        print(f"PORT {srv.port}", flush=True)
        # Exit when stdin closes (the parent died) or on SIGTERM.
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        try:
            import signal
            loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        except (NotImplementedError, RuntimeError):
            pass
        await stop
        await srv.aclose()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
