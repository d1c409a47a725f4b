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


_flaky: Dict[str, int] = {}
_flaky_lock = threading.Lock()


def default_answer(path: str, body: Dict[str, Any]) -> Answer:
    """Echo answers; a prompt containing [slow] waits 1.5 s, [fail] always
    gets 503, [flaky] gets 503 (Retry-After: 0) on its first two attempts."""
    chat = path.endswith("/chat/completions")
    text = json.dumps(body.get("messages") if chat else body.get("prompt"))
    if "[slow]" in text:
        time.sleep(1.5)
    if "[fail]" in text:
        return 503, {}, {"error": {"message": "overloaded"}}
    if "[flaky]" in text:
        with _flaky_lock:
            _flaky[text] = _flaky.get(text, 0) + 1
            if _flaky[text] <= 2:
                return 503, {"Retry-After": "0"}, {"error": {"message": "warming up"}}
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
                entry = {"method": self.command, "path": u.path, "target": self.path,
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


def test_without_raw_a_bulk_result_keeps_nothing_extra(rec):
    import sys
    import tracemalloc

    async def main():
        async with Dispatcher(rec.base_url, model="m", max_concurrent=8) as d:
            prompts = ["p" * 40] * 400
            await d.map(prompts[:8])  # warm up (templates, caches)
            out = []
            for raw in (False, True):
                tracemalloc.start()
                before = tracemalloc.get_traced_memory()[0]
                rs = await d.map(prompts, raw=raw)
                out.append((tracemalloc.get_traced_memory()[0] - before) / len(rs))
                tracemalloc.stop()
                out.append(sys.getsizeof(rs[0]))
                del rs
            return out
    plain, plain_size, raw, raw_size = run(main())
    assert plain_size == raw_size <= 80  # the fixed part did not grow
    assert raw > plain + 150  # raw keeps the ~300-byte answer; plain keeps none of it


def test_bulk_results_keep_no_id_unless_raw(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            return (await d.generate("one"), await d.map(["a"]), await d.map(["a"], raw=True))
    one, plain, raw = run(main())
    assert one.id and one.id.startswith("cmpl-")
    assert plain[0].id is None
    assert raw[0].id == raw[0].raw["id"]
    assert one.model == "m" and plain[0].model is raw[0].model  # one shared str


def test_tool_call_answer_keeps_the_call(rec):
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object"}}}]

    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            return await d.chat([{"role": "user", "content": "weather?"}], tools=tools)
    r = run(main())
    assert r.finish_reason == "tool_calls" and r.text == ""
    call = r.tool_calls[0]
    assert call.id == "call_1" and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Seoul"}
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content is None
    assert msg.tool_calls[0]["function"]["name"] == "get_weather"  # dict style too
    assert rec.posts()[0]["body"]["tools"] == tools


def test_choices_logprobs_usage_and_several_choices(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            a = await d.generate(["x", "y"], logprobs=1)
            b = await d.chat([{"role": "user", "content": "hi"}], logprobs=True)
            c = await d.generate("z")
            return a, b, c
    a, b, c = run(main())
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.text for ch in a.choices] == ["echo:x", "echo:y"] == list(a.texts)
    assert a.choices[1].finish_reason == "length"
    assert a.choices[0].logprobs.token_logprobs == [-0.5]
    assert b.choices[0].message.content == "echo:hi"
    assert b.choices[0].logprobs.content[0].logprob == -0.25
    assert c.choices[0].logprobs is None and c.choices[0].text == "echo:z"
    assert c.usage.total_tokens == 5 and c.usage["prompt_tokens"] == 3


# ---- 1. per-call options ---------------------------------------------------

def test_options_are_sent_as_openai_python_means_them(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            return await d.generate("hi", temperature=0.0, timeout=5, max_retries=1,
                                    extra_body={"guided_json": {"type": "object"},
                                                "temperature": 0.5},
                                    extra_headers={"X-Trace": "abc"},
                                    extra_query={"api-version": "2024 01"})
    r = run(main())
    assert r.text == "echo:hi"
    req = rec.posts()[0]
    assert req["body"] == {"model": "m", "prompt": "hi", "temperature": 0.5,
                           "guided_json": {"type": "object"}}  # extra_body merged, wins
    assert req["headers"]["x-trace"] == "abc"
    assert req["query"] == {"api-version": ["2024 01"]}
    assert req["path"] == "/v1/completions"


def test_extra_headers_replace_and_are_checked(rec):
    async def main():
        async with Dispatcher(rec.base_url, api_key="k1", model="m") as d:
            await d.generate("a", extra_headers={"Authorization": "Bearer k2"})
            await d.generate("b")
            for bad in ({"X-A": "1\r\nX-B: 2"}, {"X-A": "1\n"}, {"X-A": "a\0b"},
                        {"Bad Name": "1"}, {"": "1"}):
                with pytest.raises(ValueError):
                    await d.generate("c", extra_headers=bad)
            with pytest.raises(TypeError):
                await d.generate("c", extra_headers={"X-A": 1})
            with pytest.raises(TypeError):
                await d.generate("c", extra_headers=["X-A: 1"])
    run(main())
    a, b = rec.posts()
    assert a["headers"]["authorization"] == "Bearer k2"
    assert list(a["headers"]).count("authorization") == 1
    assert b["headers"]["authorization"] == "Bearer k1"
    assert "x-a" not in a["headers"] and len(rec.posts()) == 2


def test_per_call_timeout_is_per_attempt(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m", timeout=60, max_retries=0) as d:
            t0 = time.monotonic()
            with pytest.raises(batchgate.TimeoutError):
                await d.generate("[slow]", timeout=0.3)
            quick = time.monotonic() - t0
            r = await d.generate("[slow] again")  # the dispatcher's 60 s
            return quick, r
    quick, r = run(main())
    assert quick < 1.2 and r.text.startswith("echo:")


def test_an_httpx_timeout_counts_by_its_read_part(rec):
    httpx = pytest.importorskip("httpx")  # in the test extra; openai-python's type

    async def main():
        # The dispatcher's: read 0.3 s per attempt.
        async with Dispatcher(rec.base_url, model="m", max_retries=0,
                              timeout=httpx.Timeout(0.3, connect=2.0)) as d:
            assert (d.timeout, d.connect_timeout) == (0.3, 2.0)  # both parts taken
            t0 = time.monotonic()
            with pytest.raises(batchgate.TimeoutError):
                await d.generate("[slow] a")
            quick = time.monotonic() - t0
            # Per call: read=None is no timeout, whatever the dispatcher says.
            r = await d.generate("[slow] b", timeout=httpx.Timeout(None))
            with pytest.raises(ValueError, match=r"timeout\.read"):
                await d.generate("x", timeout=httpx.Timeout(5.0, read=-1.0))
            with pytest.raises(TypeError, match=r"timeout\.pool"):
                await d.generate("x", timeout=httpx.Timeout(5.0, pool="1"))
            return quick, r
    quick, r = run(main())
    assert quick < 1.2 and r.text == "echo:[slow] b"
    with pytest.raises(ValueError, match=r"timeout\.connect"):
        Dispatcher(rec.base_url, model="m", timeout=httpx.Timeout(5.0, connect=float("inf")))


def test_per_call_max_retries(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m", max_retries=2, backoff=0.01) as d:
            with pytest.raises(batchgate.HTTPStatusError) as e0:
                await d.generate("[fail] a", max_retries=0)
            with pytest.raises(batchgate.HTTPStatusError) as e2:
                await d.generate("[fail] b")
            return e0.value.attempts, e2.value.attempts
    assert run(main()) == (1, 3)
    assert [r["body"]["prompt"] for r in rec.posts()].count("[fail] a") == 1


def test_unknown_non_json_keyword_is_a_type_error_naming_it(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            with pytest.raises(TypeError, match="frobnicate"):
                await d.generate("x", frobnicate=object())
            with pytest.raises(TypeError, match="when"):
                await d.map(["x"], when=time)
            with pytest.raises(TypeError, match="timeout"):
                await d.generate("x", timeout="5")
            with pytest.raises(ValueError, match="timeout"):
                await d.generate("x", timeout=-1)
            await d.generate("x", seed=7)  # a JSON value is a body field
    run(main())
    assert [r["body"].get("seed") for r in rec.posts()] == [7]


def test_with_options_is_a_view_sharing_the_engine(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m", max_retries=3, backoff=0.01) as d:
            v = d.with_options(default_headers={"X-View": "1"}, max_retries=0, model="other",
                               extra_body={"seed": 1})
            v2 = v.with_options(timeout=0.3)
            await v.generate("a", extra_headers={"X-Call": "2"})
            await d.generate("b")
            with pytest.raises(batchgate.HTTPStatusError) as e:
                await v.generate("[fail]")
            with pytest.raises(batchgate.TimeoutError):
                await v2.generate("[slow]")
            with pytest.raises(TypeError, match="temperature"):
                d.with_options(temperature=1)
            assert v._core is d._core and v.semaphore is d.semaphore
            assert d.stats()["submitted"] == 4
            return e.value.attempts
    assert run(main()) == 1
    a, b = rec.posts()[:2]
    assert a["headers"]["x-view"] == "1" and a["headers"]["x-call"] == "2"
    assert a["body"]["model"] == "other" and a["body"]["seed"] == 1
    assert "x-view" not in b["headers"] and b["body"] == {"model": "m", "prompt": "b"}


# ---- 2. configuration from the environment ---------------------------------

def test_env_precedence_and_key_family(monkeypatch):
    with Recorder() as vl, Recorder() as oa:
        monkeypatch.setenv("OPENAI_BASE_URL", oa.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
        monkeypatch.setenv("LLM_MODEL", "env-model")

        async def one():
            async with Dispatcher() as d:
                return await d.generate("x")
        run(one())  # only OPENAI_*: its URL and its key
        assert oa.posts()[-1]["headers"]["authorization"] == "Bearer sk-openai"
        assert oa.posts()[-1]["body"]["model"] == "env-model"
        monkeypatch.setenv("VLLM_BASE_URL", vl.base_url)
        run(one())  # VLLM_BASE_URL wins; OPENAI's key is not sent to it
        assert len(oa.posts()) == 1 and len(vl.posts()) == 1
        assert "authorization" not in vl.posts()[0]["headers"]
        monkeypatch.setenv("VLLM_API_KEY", "vk")
        run(one())
        assert vl.posts()[-1]["headers"]["authorization"] == "Bearer vk"

        async def explicit():
            async with Dispatcher(oa.base_url, api_key="given", model="arg") as d:
                return await d.generate("x")
        run(explicit())  # arguments beat the environment
        assert oa.posts()[-1]["headers"]["authorization"] == "Bearer given"
        assert oa.posts()[-1]["body"]["model"] == "arg"


PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY", "no_proxy", "NO_PROXY")


def test_proxy_environment_applies_as_of_the_dispatchers_creation(monkeypatch):
    """libcurl's proxy variables still work (as httpx's trust_env does for
    openai-python); the engine reads them once, when it is made, so that
    without any it can skip libcurl's getenv calls on every transfer."""
    for k in PROXY_VARS:
        monkeypatch.delenv(k, raising=False)
    with Recorder() as server, Recorder() as proxy:
        proxy_url = proxy.base_url[:-len("/v1")]

        async def main():
            monkeypatch.setenv("http_proxy", proxy_url)
            async with Dispatcher(server.base_url, model="m", max_retries=0) as d:
                via = await d.generate("via the proxy")
            monkeypatch.delenv("http_proxy")
            async with Dispatcher(server.base_url, model="m", max_retries=0) as d:
                monkeypatch.setenv("http_proxy", proxy_url)  # too late for this one
                direct = await d.generate("direct")
            return via, direct
        via, direct = run(main())
    assert via.text == "echo:via the proxy" and direct.text == "echo:direct"
    # A proxy is asked for the absolute URL; the server itself saw only the second.
    assert [r["target"] for r in proxy.posts()] == [server.base_url + "/completions"]
    assert [r["body"]["prompt"] for r in server.posts()] == ["direct"]


def test_no_base_url_anywhere_says_what_to_set():
    with pytest.raises(ValueError, match="VLLM_BASE_URL"):
        Dispatcher()


def test_model_from_the_server_queried_once(rec):
    async def main():
        async with Dispatcher(rec.base_url) as d:
            await asyncio.gather(*(d.generate(f"p{i}") for i in range(5)))
            await d.map(["a", "b"])
    run(main())
    gets = [r for r in rec.requests if r["method"] == "GET"]
    assert [g["path"] for g in gets] == ["/v1/models"]
    assert gets[0]["headers"]["user-agent"].startswith("batchgate/")
    assert {r["body"]["model"] for r in rec.posts()} == {"served-model"}


def test_model_lookup_with_url_credentials_keeps_them_secret(caplog):
    with Recorder() as srv:
        url = srv.base_url.replace("http://", "http://alice:s3cret@")
        port = srv.base_url.split(":")[2].split("/")[0]

        async def main():
            async with Dispatcher(url) as d:
                return await d.generate("x")
        r = run(main())
        get = [q for q in srv.requests if q["method"] == "GET"][0]
        assert get["headers"]["authorization"].startswith("Basic ")
        assert r.model == "served-model"
        srv.models = None  # /v1/models now 404s: warn (without the password), go on
        url2 = f"http://bob:hunter2@127.0.0.1:{port}/v1"
        with caplog.at_level(logging.WARNING, logger="batchgate"):
            async def second():
                async with Dispatcher(url2) as d:
                    return await d.generate("y")
            r2 = run(second())
        assert r2.text == "echo:y" and "model" not in srv.posts()[-1]["body"]
        assert any("could not list" in m.getMessage() for m in caplog.records)
        assert not any("hunter2" in m.getMessage() for m in caplog.records)


def test_a_call_naming_its_model_needs_no_lookup(rec):
    with batchgate.SyncDispatcher(rec.base_url) as d:
        r = d.chat([{"role": "user", "content": "hi"}], model="per-call")
    assert r.model == "per-call" and rec.posts()[0]["body"]["model"] == "per-call"
    assert not [q for q in rec.requests if q["method"] == "GET"]


def test_model_env_and_ambiguous_server(monkeypatch):
    with Recorder(models=["base", "lora-a"]) as srv:
        async def main():
            async with Dispatcher(srv.base_url) as d:
                await d.generate("x")
        with pytest.raises(ValueError, match="lora-a"):
            run(main())
        monkeypatch.setenv("VLLM_MODEL", "base")
        run(main())
        assert srv.posts()[-1]["body"]["model"] == "base"
        assert len([r for r in srv.requests if r["method"] == "GET"]) == 1


# ---- 4. SyncDispatcher and the per-loop default ----------------------------

def test_sync_dispatcher_without_an_event_loop(rec):
    with batchgate.SyncDispatcher(rec.base_url, model="m") as d:
        assert d.generate("a").text == "echo:a"
        assert d.chat([{"role": "user", "content": "b"}]).text == "echo:b"
        assert [r.text for r in d.map(["c", "d"])] == ["echo:c", "echo:d"]
        assert [r.text for r in d.chat_map([[{"role": "user", "content": "e"}]])] == ["echo:e"]
        got = dict(d.as_completed([f"x{i}" for i in range(20)], window=4))
        assert sorted(got) == list(range(20)) and got[7].text == "echo:x7"
        assert d.with_options(timeout=0.3).generate("f").text == "echo:f"
    with pytest.raises(batchgate.ClosedError):
        d.generate("late")
    assert d.dispatcher._closed and not d._thread.is_alive()


def test_sync_dispatcher_shared_between_threads(rec):
    errors: List[BaseException] = []
    out: Dict[int, str] = {}
    with batchgate.SyncDispatcher(rec.base_url, model="m", max_concurrent=3) as d:
        def work(k: int) -> None:
            try:
                rs = d.map([f"t{k}-{i}" for i in range(10)])
                out[k] = rs[-1].text
                for i, r in d.as_completed([f"s{k}-{i}" for i in range(5)]):
                    assert r.text == f"echo:s{k}-{i}"
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert d.stats()["max_in_flight"] <= 3
    assert not errors and out == {k: f"echo:t{k}-9" for k in range(4)}


def test_sync_as_completed_runs_ahead_by_a_window_and_break_cancels(rec):
    with batchgate.SyncDispatcher(rec.base_url, model="m", max_concurrent=2) as d:
        it = d.as_completed([f"p{i}" for i in range(300)], window=4)
        next(it)
        time.sleep(0.5)  # a slow consumer: the loop side must wait for it
        assert d.stats()["submitted"] <= 16
        it.close()
        time.sleep(0.2)
        assert d.stats()["live"] == 0 and d.stats()["submitted"] <= 16
        it = d.as_completed([f"[slow] {i}" for i in range(40)], window=4)
        next(it)
        it.close()  # cancels what is in flight
        time.sleep(0.3)
        assert d.stats()["live"] == 0


def test_default_dispatcher_is_per_event_loop(rec, monkeypatch):
    monkeypatch.setenv("VLLM_BASE_URL", rec.base_url)
    monkeypatch.setenv("VLLM_MODEL", "m")
    results: Dict[int, Any] = {}
    seen = []

    def worker(k: int) -> None:
        async def main():
            seen.append(batchgate.dispatcher.default_dispatcher())
            return await batchgate.vllm_generate([f"w{k}", "x"])
        try:
            results[k] = asyncio.run(main())
        except BaseException as e:
            results[k] = e
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    # vllm_generate keeps a list per prompt (the drop-in's rule): one text each.
    assert results == {k: [f"echo:w{k}", "echo:x"] for k in range(4)}
    assert len({id(d) for d in seen}) == 4
    async def again():
        return batchgate.dispatcher.default_dispatcher()
    run(again())
    assert all(d._closed for d in seen)  # finished loops' dispatchers were closed


# ---- 6. progress, retry logging, User-Agent --------------------------------

def test_progress_callback_for_map_as_completed_and_process_batches(rec):
    calls: Dict[str, List[Tuple[int, Any]]] = {"map": [], "ac": [], "pb": [], "gen": []}

    async def main():
        async with Dispatcher(rec.base_url, model="m", max_concurrent=4) as d:
            rs = await d.map([f"p{i}" for i in range(30)],
                             progress=lambda n, t: calls["map"].append((n, t)))
            assert [r.text for r in rs] == [f"echo:p{i}" for i in range(30)]
            async for _ in d.as_completed((f"q{i}" for i in range(12)),
                                          progress=lambda n, t: calls["ac"].append((n, t))):
                pass
            await d.chat_map([[{"role": "user", "content": "c"}]] * 3,
                             progress=lambda n, t: calls["gen"].append((n, t)))
            out = await batchgate.process_batches(
                [["a"], ["b"], ["c"]], lambda b: b[0], dispatcher=d,
                progress=lambda n, t: calls["pb"].append((n, t)))
            assert out == ["echo:a", "echo:b", "echo:c"]
    run(main())
    assert calls["map"][-1] == (30, 30)
    assert [n for n, _ in calls["map"]] == sorted(n for n, _ in calls["map"])
    assert calls["ac"][-1] == (12, None)  # a generator has no len()
    assert calls["gen"][-1] == (3, 3) and calls["pb"][-1] == (3, 3)


def test_progress_true_uses_tqdm(rec, capsys):
    pytest.importorskip("tqdm")
    import io

    from tqdm import tqdm

    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            await d.map([f"p{i}" for i in range(7)], progress=True)
            bar = tqdm(total=None, file=io.StringIO())
            await d.map([f"p{i}" for i in range(5)], progress=bar)
            return bar
    bar = run(main())
    assert "7/7" in capsys.readouterr().err
    assert bar.n == 5 and bar.total == 5


def test_retries_are_logged_with_reason_and_wait(rec, caplog):
    async def main():
        async with Dispatcher(rec.base_url, model="m", max_retries=3, backoff=0.01) as d:
            r = await d.generate("[flaky] one")
            rs = await d.map(["[flaky] two", "fine"])
            return r, rs
    with caplog.at_level(logging.INFO, logger="batchgate"):
        r, rs = run(main())
    assert r.attempts == 3 and rs[0].attempts == 3 and rs[1].attempts == 1
    msgs = [m.getMessage() for m in caplog.records if m.name == "batchgate"]
    assert any("request succeeded after 3 attempts" in m and "HTTP 503" in m and "backoff" in m
               for m in msgs), msgs
    assert any(m.startswith("item 0 succeeded after 3 attempts") for m in msgs), msgs
    assert not any("item 1" in m for m in msgs)


def test_user_agent(rec):
    async def main():
        async with Dispatcher(rec.base_url, model="m") as d:
            await d.generate("x")
        async with Dispatcher(rec.base_url, model="m", headers={"User-Agent": "mine/1"}) as d:
            await d.generate("y")
    run(main())
    a, b = rec.posts()
    assert a["headers"]["user-agent"] == (f"batchgate/{batchgate.__version__} "
                                          f"libcurl/{batchgate.libcurl_version}")
    assert b["headers"]["user-agent"] == "mine/1"


def test_an_httpx_timeouts_connect_part_bounds_the_auto_probe():
    """The admission probe (max_inflight_tokens='auto') runs in the constructor:
    it must already use the Timeout's connect part, not the 10 s default."""
    httpx = pytest.importorskip("httpx")
    import socket
    lsock = socket.create_server(("127.0.0.1", 0))
    held: List[socket.socket] = []
    stop = threading.Event()

    def accept_and_stall() -> None:  # accepts, never answers
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept_and_stall, daemon=True)
    t.start()
    try:
        url = "http://127.0.0.1:%d/v1" % lsock.getsockname()[1]
        t0 = time.monotonic()
        d = Dispatcher(url, model="m", max_inflight_tokens="auto",
                       timeout=httpx.Timeout(30.0, connect=0.5))
        waited = time.monotonic() - t0
        fell_back = d.stats().get("admission") is None  # static caps, as logged
        d.close()
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        lsock.close()
    assert waited < 3.0, f"probe waited {waited:.1f} s"
    assert fell_back
