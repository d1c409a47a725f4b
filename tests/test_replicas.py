"""Dispatcher(base_url=[...]): routing, health and failover over real loopback
servers (batchgate.simserver replicas and a small always-500 server)."""
import asyncio
import http.server
import json
import logging
import threading
import time

import pytest

import batchgate
from batchgate import Dispatcher, HTTPStatusError
from batchgate import replicas
from batchgate.simserver import DEFAULT_MODEL as MODEL, SimServerThread

pytestmark = pytest.mark.timeout(120)

FAST = dict(step_base_s=0.005, step_per_token_s=0.0)


def prompt(i):
    return f"item {i} end"


def check_answer(i, r):
    assert isinstance(r, batchgate.Result), (i, r)
    assert f"item {i} end" in r.text, (i, r.text)  # the simulator echoes the prompt


@pytest.fixture
def three():
    servers = [SimServerThread(**FAST) for _ in range(3)]
    urls = [s.start() + "/v1" for s in servers]
    yield servers, urls
    for s in servers:
        s.stop()


class Flaky:
    """A loopback server answering POSTs with 500 while `broken`, else a
    minimal completion; GET /health is always 200 (the process is up)."""

    def __init__(self):
        self.broken = True
        self.posts = 0
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (ejected): fine
                    pass

            def do_GET(self):
                self._send(200, {"ok": True})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n))
                outer.posts += 1
                if outer.broken:
                    self._send(500, {"error": {"message": "boom", "type": "InternalServerError"}})
                    return
                self._send(200, {"id": "x", "object": "text_completion", "model": "m",
                                 "choices": [{"index": 0, "text": "flaky: " + body["prompt"],
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                           "total_tokens": 2}})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def by_url(d):
    return {e["url"]: e for e in d.stats()["endpoints"]}


def test_a_single_url_is_the_plain_dispatcher(three):
    _, urls = three
    for arg in (urls[0], [urls[0]]):
        d = Dispatcher(arg, max_concurrent=4)
        assert type(d) is Dispatcher  # no routing layer for one endpoint
        assert "endpoints" not in d.stats()

        async def go():
            async with d:
                return await d.map([prompt(i) for i in range(20)], max_tokens=64)
        for i, r in enumerate(asyncio.run(go())):
            check_answer(i, r)


def test_bad_lists_are_refused_clearly():
    with pytest.raises(ValueError, match="empty"):
        Dispatcher([])
    with pytest.raises(ValueError, match="twice"):
        Dispatcher(["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1/"])
    with pytest.raises(TypeError, match=r"base_url\[1\]"):
        Dispatcher(["http://127.0.0.1:1/v1", 5])
    with pytest.raises(ValueError, match="base_url"):
        Dispatcher(["http://127.0.0.1:1/v1", "ftp://x"])


def test_map_keeps_input_order_and_spreads_the_load(three):
    _, urls = three

    async def go():
        async with Dispatcher(urls, max_concurrent=8, model=MODEL) as d:
            res = await d.map([prompt(i) for i in range(600)], max_tokens=64)
            return res, by_url(d), d.stats()
    res, eps, total = asyncio.run(go())
    assert len(res) == 600
    for i, r in enumerate(res):
        check_answer(i, r)
    counts = [eps[u]["delivered"] for u in urls]
    assert sum(counts) == 600 and total["completed"] == 600, counts
    assert min(counts) >= 100, counts  # each equal replica pulls a fair share


def test_single_calls_go_to_the_least_loaded():
    # One replica 10x slower: its calls stay in flight longer, so a caller
    # keeping 12 calls going sends it fewer (round-robin would send a third).
    servers = [SimServerThread(step_base_s=0.05, step_per_token_s=0.0),
               SimServerThread(**FAST), SimServerThread(**FAST)]
    urls = [s.start() + "/v1" for s in servers]
    try:
        async def go():
            async with Dispatcher(urls, max_concurrent=4, model=MODEL) as d:
                todo = iter(range(120))
                res = {}

                async def worker():
                    for i in todo:
                        res[i] = await d.generate(prompt(i), max_tokens=8)
                await asyncio.gather(*(worker() for _ in range(12)))
                return res, by_url(d)
        res, eps = asyncio.run(go())
    finally:
        for s in servers:
            s.stop()
    assert sorted(res) == list(range(120))
    counts = [eps[u]["delivered"] for u in urls]
    assert sum(counts) == 120
    assert counts[0] < 25 and min(counts[1:]) > 40, counts


def test_replica_stopped_mid_run_every_item_exactly_once(three, caplog):
    servers, urls = three
    n = 1500

    async def go():
        async with Dispatcher(urls, max_concurrent=8, model=MODEL, max_retries=3,
                              backoff=0.05) as d:
            seen = {}
            async for i, r in d.as_completed((prompt(i) for i in range(n)), max_tokens=64,
                                             return_exceptions=True):
                assert i not in seen, f"item {i} delivered twice"
                seen[i] = r
                if len(seen) == 200:
                    servers[1].stop()
            return seen, by_url(d)
    with caplog.at_level(logging.WARNING, "batchgate"):
        seen, eps = asyncio.run(go())
    assert sorted(seen) == list(range(n))  # none lost
    for i, r in seen.items():
        check_answer(i, r)  # two replicas were left: nothing failed
    dead = eps[urls[1]]
    assert not dead["healthy"] and dead["ejections"] == 1
    assert dead["failed_over"] > 0  # its queued/retrying work moved
    assert sum(e["delivered"] for e in eps.values()) == n
    assert any("ejected" in m for m in caplog.messages)


def test_single_calls_fail_over_from_a_dead_replica(three):
    servers, urls = three
    servers[0].stop()

    async def go():
        async with Dispatcher(urls, max_concurrent=4, model=MODEL, backoff=0.05) as d:
            res = await asyncio.gather(*(d.generate(prompt(i), max_tokens=64)
                                         for i in range(30)))
            return res, by_url(d)
    res, eps = asyncio.run(go())
    for i, r in enumerate(res):
        check_answer(i, r)
    assert not eps[urls[0]]["healthy"]
    assert eps[urls[0]]["delivered"] == 0


def test_always_500_replica_is_ejected_then_probed_back(three, monkeypatch):
    _, urls = three
    flaky = Flaky()
    monkeypatch.setattr(replicas, "PROBE_FIRST_S", 0.2)
    monkeypatch.setattr(replicas, "PROBE_MAX_S", 0.4)
    first_eject = []
    eject = replicas.ReplicaDispatcher._eject

    def spy(self, ep, why):
        if ep.url == flaky.url and not first_eject:
            first_eject.append(flaky.posts)
        eject(self, ep, why)
    monkeypatch.setattr(replicas.ReplicaDispatcher, "_eject", spy)
    try:
        mixed = urls[:2] + [flaky.url]

        async def go():
            async with Dispatcher(mixed, max_concurrent=4, model=MODEL, max_retries=0) as d:
                res = await d.map([prompt(i) for i in range(300)], max_tokens=64)
                bad = by_url(d)[flaky.url]
                broken_posts = flaky.posts
                flaky.broken = False
                # Probed back (its /health says 200), it pulls work again.
                back = []
                deadline = time.monotonic() + 20
                while not any(r.text.startswith("flaky: ") for r in back) and \
                        time.monotonic() < deadline:
                    back = await d.map([prompt(i) for i in range(300)], max_tokens=64)
                    for i, r in enumerate(back):
                        check_answer(i, r)
                return res, bad, broken_posts, back, by_url(d)[flaky.url]
        res, bad, broken_posts, back, after = asyncio.run(go())
        for i, r in enumerate(res):
            check_answer(i, r)  # its 500s moved to the healthy replicas
        assert bad["ejections"] >= 1 and "HTTPStatusError" in bad["last_error"]
        # After the first ejection (a streak, plus what its engine had queued
        # meanwhile), one request per probe: on probation it gets one at a time.
        assert first_eject and first_eject[0] >= replicas.EJECT_STREAK
        assert broken_posts - first_eject[0] <= bad["ejections"] - 1 + 4, \
            (broken_posts, first_eject, bad)
        assert any(r.text.startswith("flaky: ") for r in back)
        assert after["healthy"] and after["delivered"] > bad["delivered"]
    finally:
        flaky.stop()


def test_an_item_every_replica_fails_ends_in_one_error(three):
    _, urls = three

    async def go():
        async with Dispatcher(urls, max_concurrent=4, model=MODEL, max_retries=0) as d:
            items = [prompt(i) for i in range(50)]
            items[7] = "[[sim:error]] always"
            res = await d.map(items, max_tokens=64, return_exceptions=True)
            with pytest.raises(HTTPStatusError):
                await d.map(items, max_tokens=64)
            return res, by_url(d)
    res, eps = asyncio.run(go())
    assert len(res) == 50
    assert isinstance(res[7], HTTPStatusError) and res[7].status == 500
    for i, r in enumerate(res):
        if i != 7:
            check_answer(i, r)
    # tried on each replica once; one failure each is no streak
    assert sum(e["failed_over"] for e in eps.values()) >= 2
    assert all(e["healthy"] for e in eps.values())


def test_bad_input_names_the_input_index(three):
    _, urls = three

    async def go():
        async with Dispatcher(urls, max_concurrent=4, model=MODEL) as d:
            await d.map([prompt(0), prompt(1), 3], max_tokens=8)
    with pytest.raises(TypeError, match=r"prompts\[2\]"):
        asyncio.run(go())


def test_chat_map_views_and_redacted_stats(three):
    _, urls = three
    secret = [u.replace("http://", "http://user:s3cret@") for u in urls]

    async def go():
        async with Dispatcher(secret, max_concurrent=4, model=MODEL) as d:
            v = d.with_options(timeout=30)
            res = await v.chat_map([[{"role": "user", "content": prompt(i)}]
                                    for i in range(30)], max_tokens=64)
            one = await v.chat([{"role": "user", "content": prompt(99)}], max_tokens=64)
            return res, one, d.stats(), repr(d)
    res, one, stats, text = asyncio.run(go())
    for i, r in enumerate(res):
        check_answer(i, r)
    check_answer(99, one)
    assert "s3cret" not in json.dumps(stats, default=str) and "s3cret" not in text
    assert stats["completed"] == 31 and stats["healthy"] == 3


def test_run_command_takes_several_base_urls(tmp_path, three):
    from test_run import bg, check_results, write_corpus
    servers, urls = three
    corpus = str(tmp_path / "reviews.jsonl")
    write_corpus(corpus, n_restaurants=6, reviews_per_restaurant=120, seed=7)
    out = str(tmp_path / "r.jsonl")
    p = bg("run", corpus, "--out", out, "--base-url", f"{urls[0]},{urls[1]}",
           "--base-url", urls[2], "--max-concurrent", "2", "--max-tokens-per-batch", "600")
    assert p.returncode == 0, p.stderr
    check_results(out, corpus)
    done = [s.stats()["finished"] for s in servers]
    assert all(n > 0 for n in done), done  # all three replicas served


def test_sync_dispatcher_over_replicas_leaves_no_task_behind(three, caplog):
    import gc
    _, urls = three
    with caplog.at_level(logging.ERROR, "asyncio"):
        with batchgate.SyncDispatcher(urls, max_concurrent=4, model=MODEL) as d:
            res = d.map([prompt(i) for i in range(40)], max_tokens=64)
            check_answer(99, d.generate(prompt(99), max_tokens=64))
            assert sorted(e["delivered"] > 0 for e in d.stats()["endpoints"]) == [True] * 3
        gc.collect()
    for i, r in enumerate(res):
        check_answer(i, r)
    assert not [m for m in caplog.messages if "destroyed" in m], caplog.messages


def test_count_tokens_asks_a_replica(three):
    _, urls = three

    async def go():
        texts = [prompt(i) for i in range(5)]
        async with Dispatcher(urls, model=MODEL) as d, Dispatcher(urls[0], model=MODEL) as one:
            return await d.count_tokens(texts), await one.count_tokens(texts)
    many, one = asyncio.run(go())
    assert many == one and all(n > 0 for n in many)


def test_auto_admission_per_replica_spreads_the_load():
    # Each replica's own KV controller (its /metrics); the count cap under
    # "auto" only bounds connections, so the pull window follows the KV size.
    servers = [SimServerThread(kv_cache_tokens=8192, max_model_len=2048, **FAST)
               for _ in range(3)]
    urls = [s.start() + "/v1" for s in servers]
    try:
        async def go():
            async with Dispatcher(urls, max_inflight_tokens="auto", model=MODEL) as d:
                res = await d.map([prompt(i) for i in range(600)], max_tokens=64)
                return res, d.stats()
        res, st = asyncio.run(go())
    finally:
        for s in servers:
            s.stop()
    for i, r in enumerate(res):
        check_answer(i, r)
    eps = st["endpoints"]
    assert all(e["admission"] and e["admission"]["kv_blocks"] == 512 for e in eps)
    assert min(e["delivered"] for e in eps) >= 100, [e["delivered"] for e in eps]
