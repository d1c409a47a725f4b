"""openai-python habits against a loopback server that records what was sent:
per-call options, environment configuration, openai-shaped results, the sync
client, progress, retry logging and the User-Agent (issue 14)."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

import batchgate
from batchgate import Dispatcher

Answer = Tuple[int, Dict[str, str], Any]


def default_answer(path: str, body: Dict[str, Any]) -> Answer:
    chat = path.endswith("/chat/completions")
    if chat:
        last = body["messages"][-1].get("content", "")
        if body.get("tools"):
            msg = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'}}]}
            fr = "tool_calls"
        else:
            msg = {"role": "assistant", "content": "echo:" + last}
            fr = "stop"
        choice: Dict[str, Any] = {"index": 0, "message": msg, "finish_reason": fr}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": "echo", "logprob": -0.25,
                                               "top_logprobs": []}]}
        else:
            choice["logprobs"] = None
        choices = [choice]
    else:
        p = body["prompt"]
        prompts = p if isinstance(p, list) else [p]
        choices = []
        for i, t in enumerate(prompts):
            c: Dict[str, Any] = {"index": i, "text": "echo:" + t, "finish_reason": "length",
                                 "logprobs": None}
            if body.get("logprobs"):
                c["logprobs"] = {"tokens": ["echo"], "token_logprobs": [-0.5],
                                 "top_logprobs": None, "text_offset": [0]}
            choices.append(c)
    return 200, {}, {"id": f"cmpl-{body.get('n', 1)}-{len(json.dumps(body))}",
                     "object": "chat.completion" if chat else "text_completion",
                     "created": 1, "model": body.get("model", "served-model"),
                     "choices": choices,
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


class Recorder:
    """A small HTTP server on 127.0.0.1 that records every request."""

    def __init__(self, answer: Callable[[str, Dict[str, Any]], Answer] = default_answer,
                 models: Optional[List[str]] = None) -> None:
        self.answer = answer
        self.models = ["served-model"] if models is None else models
        self.requests: List[Dict[str, Any]] = []
        self.lock = threading.Lock()
        rec = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _reply(self, status: int, headers: Dict[str, str], obj: Any) -> None:
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: Any) -> Dict[str, Any]:
                u = urllib.parse.urlsplit(self.path)
                entry = {"method": self.command, "path": u.path,
                         "query": urllib.parse.parse_qs(u.query),
                         "headers": {k.lower(): v for k, v in self.headers.items()},
                         "body": body, "t": time.monotonic()}
                with rec.lock:
                    rec.requests.append(entry)
                return entry

            def do_GET(self) -> None:
                e = self._record(None)
                if e["path"] == "/v1/models" and rec.models is not None:
                    self._reply(200, {}, {"object": "list",
                                          "data": [{"id": m, "object": "model"}
                                                   for m in rec.models]})
                else:
                    self._reply(404, {}, {"error": {"message": "no such route"}})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n))
                e = self._record(body)
                status, headers, obj = rec.answer(e["path"], body)
                self._reply(status, headers, obj)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def posts(self) -> List[Dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST"]

    def __enter__(self) -> "Recorder":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def rec():
    with Recorder() as r:
        yield r


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "VLLM_BASE_URL", "VLLM_API_KEY",
              "LLM_MODEL", "VLLM_MODEL"):
        monkeypatch.delenv(k, raising=False)


def run(coro):
    return asyncio.run(coro)


# ---- 3. openai-shaped results; raw ----------------------------------------

def test_raw_is_the_parsed_answer_only_when_asked(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            r = await d.generate("hi", raw=True)
            plain = await d.generate("hi")
            bulk = await d.map(["a", "b"], raw=True)
            bulk_plain = await d.map(["a", "b"])
            return r, plain, bulk, bulk_plain
    r, plain, bulk, bulk_plain = run(main())
    assert r.raw["object"] == "text_completion" and r.raw["choices"][0]["text"] == "echo:hi"
    assert r.raw is r.raw  # parsed once, then cached
    assert plain.raw is None and bulk_plain[0].raw is None
    assert [x.raw["choices"][0]["text"] for x in bulk] == ["echo:a", "echo:b"]
    assert "raw" not in rec.posts()[0]["body"]  # an option, not a body field
