"""Closed-loop admission: Dispatcher(max_inflight_tokens="auto").

Against the simulated vLLM (batchgate.simserver, real HTTP on loopback): the
KV limit keeps a naive-mode server (which fails requests when its KV cache
overflows) free of out-of-memory failures, and follows a second client that
comes and goes. Against a fake server whose /metrics is missing, garbage or
switched off mid-run: a logged fallback, never a crash; stale metrics stop
new admissions until they return.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from typing import Any, Dict

import pytest

from batchgate import Dispatcher
from batchgate.simserver import SimServerThread
from fake_vllm import FakeVLLM

pytestmark = pytest.mark.timeout(240)


def review_prompts(n: int, words: int = 120, tag: str = "r") -> list:
    return [f"Review {tag}{i}: " + " ".join(f"food{(i * 7 + k) % 97}" for k in range(words))
            for i in range(n)]


# ---- the simulator ---------------------------------------------------------


def test_auto_reads_the_server_and_learns():
    with SimServerThread(mode="naive", kv_cache_tokens=8192, max_model_len=2048,
                         step_base_s=0.005) as srv:
        async def main() -> Dict[str, Any]:
            async with Dispatcher(srv.base_url + "/v1", max_inflight_tokens="auto") as d:
                assert d.admission is not None
                assert d.admission["kv_blocks"] == 512 and d.admission["block_size"] == 16
                assert d.admission["max_model_len"] == 2048
                st = d.stats()["admission"]
                assert st["kv_tokens"] == 8192
                assert 0 < st["limit_blocks"] <= 512
                assert st["learned"] is False and st["reserved_output_tokens"] == -1
                rs = await d.map(review_prompts(60), max_tokens=300)
                assert len(rs) == 60
                return d.stats()["admission"]

        st = asyncio.run(main())
    assert st["scrapes"] > 0 and st["scrape_errors"] == 0
    assert st["learned"] is True
    # The simulator's answers are ~20 tokens: far below max_tokens=300.
    assert 0 < st["output_tokens_p50"] < 100
    assert st["reserved_output_tokens"] < 150
    assert 0.5 <= st["prompt_ratio"] <= 4


def sim_debug(srv: SimServerThread, what: str) -> Dict[str, Any]:
    req = urllib.request.Request(srv.base_url + "/debug/" + what,
                                 method="POST" if what == "reset" else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def run_naive(d_kwargs: Dict[str, Any], n: int, srv: SimServerThread) -> Dict[str, Any]:
    async def main() -> Dict[str, Any]:
        async with Dispatcher(srv.base_url + "/v1", **d_kwargs) as d:
            rs = await d.map(review_prompts(n), max_tokens=256, return_exceptions=True)
            return {"errors": sum(isinstance(r, BaseException) for r in rs),
                    "stats": d.stats()}

    sim_debug(srv, "reset")
    out = asyncio.run(main())
    out["server"] = sim_debug(srv, "stats")
    return out


def test_auto_never_overflows_a_naive_server():
    """A count cap that a user might pick (64) overflows this small cache
    (requests fail with the simulated CUDA OOM); auto never does."""
    with SimServerThread(mode="naive", kv_cache_tokens=8192, max_model_len=2048,
                         step_base_s=0.005) as srv:
        fixed = run_naive({"max_concurrent": 64, "max_retries": 0}, 120, srv)
        # the workload does stress the cache
        assert fixed["server"]["num_oom_errors"] > 0, fixed["server"]
        auto = run_naive({"max_inflight_tokens": "auto", "max_retries": 0}, 300, srv)
    adm = auto["stats"]["admission"]
    assert auto["errors"] == 0, adm
    assert auto["server"]["num_oom_errors"] == 0, adm
    assert auto["server"]["peak_kv_cache_usage"] <= 1.0, adm
    assert adm["peak_kv_usage"] <= 0.95, adm
    assert adm["learned"] and adm["preemptions_seen"] == 0, adm
    # It did fill the cache well beyond the cold start's conservative charge.
    assert auto["server"]["peak_kv_cache_usage"] > 0.5, (auto["server"], adm)


def test_auto_fast_steps_long_prompts_short_answers_no_overbooking():
    """The demo's shape, small: long prompts, ~20-token answers, engine steps
    of 0.5 ms. Requests live for less than a scrape interval, so KV usage
    swings from sample to sample and an average of the readings under-reads
    what the charges can occupy; overbooking on it ran a naive server out of
    memory. Charges are almost all prompt, which the server holds whole, so
    the limit must stay under the KV size and the cache never overflows."""
    with SimServerThread(mode="naive", kv_cache_tokens=16384, max_model_len=4096,
                         step_base_s=0.0005, step_per_token_s=2.5e-7) as srv:
        sim_debug(srv, "reset")

        async def main() -> Dict[str, Any]:
            async with Dispatcher(srv.base_url + "/v1", max_inflight_tokens="auto",
                                  max_retries=0) as d:
                rs = await d.map(review_prompts(800, words=500), max_tokens=64,
                                 return_exceptions=True)
                return {"errors": sum(isinstance(r, BaseException) for r in rs),
                        "adm": d.stats()["admission"]}

        out = asyncio.run(main())
        server = sim_debug(srv, "stats")
    adm = out["adm"]
    assert out["errors"] == 0 and server["num_oom_errors"] == 0, (server, adm)
    assert adm["learned"] and adm["prompt_share"] > 0.9, adm
    # Overbooking may reach the KV size, but charges that are almost all
    # prompt leave it nothing to bet on: the limit stays under N.
    assert adm["limit_max_blocks"] == adm["kv_blocks"], adm
    assert adm["peak_limit_blocks"] < adm["kv_blocks"], adm
    assert server["peak_kv_cache_usage"] <= 0.95, (server, adm)


def test_auto_backs_off_for_another_client_and_grows_back():
    """Preempt mode: a second, uncapped client loads the server for a while;
    the limit drops while it is there and grows back once it leaves."""
    with SimServerThread(mode="preempt", kv_cache_tokens=16384, max_model_len=2048,
                         step_base_s=0.005) as srv:
        async def main() -> Dict[str, float]:
            async with Dispatcher(srv.base_url + "/v1", max_inflight_tokens="auto",
                                  metrics_interval=0.1) as d, \
                    Dispatcher(srv.base_url + "/v1", max_concurrent=200) as other:
                limits = []
                done = asyncio.Event()

                async def feed() -> None:  # our steady demand
                    while not done.is_set():
                        await d.map(review_prompts(100, tag="a"), max_tokens=64)

                async def watch() -> None:
                    while not done.is_set():
                        limits.append((time.monotonic(), d.stats()["admission"]["limit_blocks"]))
                        await asyncio.sleep(0.1)

                tasks = [asyncio.ensure_future(feed()), asyncio.ensure_future(watch())]
                await asyncio.sleep(3.0)
                t_on = time.monotonic()
                await other.map(review_prompts(300, words=250, tag="b"), max_tokens=64)
                t_off = time.monotonic()
                await asyncio.sleep(4.0)
                done.set()
                await asyncio.gather(*tasks)

                def peak(a: float, b: float) -> float:
                    return max(v for t, v in limits if a <= t <= b)

                def low(a: float, b: float) -> float:
                    return min(v for t, v in limits if a <= t <= b)

                return {"before": peak(t_on - 2.0, t_on), "during": low(t_on, t_off),
                        "after": peak(t_off + 1.0, t_off + 4.0),
                        "cuts": d.stats()["admission"]["cuts"]}

        r = asyncio.run(main())
    assert r["cuts"] >= 1
    assert r["during"] < 0.7 * r["before"], r
    assert r["after"] > 0.8 * r["before"], r


# ---- fallback and staleness --------------------------------------------------

VLLM_METRICS = (
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{{engine="0",model_name="fake"}} {usage}\n'
    'vllm:num_requests_running{{engine="0",model_name="fake"}} 0.0\n'
    'vllm:num_requests_waiting{{engine="0",model_name="fake"}} 0.0\n'
    'vllm:num_preemptions_total{{engine="0",model_name="fake"}} 0.0\n'
    'vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="256"}} 1.0\n')


class MetricsFake(FakeVLLM):
    """fake_vllm with a /metrics whose answer a test controls:
    "vllm" (valid), "missing" (404), "garbage" (200, HTML), "error" (500)."""

    def __init__(self, mode: str = "vllm") -> None:
        super().__init__()
        self.mode = mode
        self.scrapes = 0

    async def _dispatch(self, method, path, headers, body, writer, reader):  # type: ignore
        if path != "/metrics":
            return await super()._dispatch(method, path, headers, body, writer, reader)
        self.scrapes += 1
        if self.mode == "vllm":
            await self._send(writer, 200, raw=VLLM_METRICS.format(usage=0.1).encode(),
                             content_type="text/plain; version=0.0.4")
        elif self.mode == "garbage":
            await self._send(writer, 200, raw=b"<html><body>it works!</body></html>",
                             content_type="text/html")
        elif self.mode == "error":
            await self._send(writer, 500, {"error": {"message": "boom"}})
        else:
            await self._send(writer, 404, {"error": {"message": "no route"}})
        return True


@pytest.fixture
def metrics_fake():
    servers = []

    def make(mode: str) -> MetricsFake:
        srv = MetricsFake(mode).start_in_thread()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


@pytest.mark.parametrize("mode", ["missing", "garbage", "error"])
def test_metrics_unusable_falls_back_with_a_warning(metrics_fake, caplog, mode):
    srv = metrics_fake(mode)
    caplog.set_level(logging.WARNING, logger="batchgate")

    async def main() -> Dict[str, Any]:
        async with Dispatcher(srv.base_url, max_inflight_tokens="auto") as d:
            assert d.admission is None
            assert d.max_concurrent == 20  # the static count cap
            rs = await d.map([f"p{i}" for i in range(30)], max_tokens=8)
            assert [r.text for r in rs] == [f"echo:p{i}" for i in range(30)]
            return d.stats()

    st = asyncio.run(main())
    assert "admission" not in st
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("falling back" in m and "/metrics" in m for m in msgs), msgs


def test_auto_with_an_unreachable_server_falls_back(caplog):
    caplog.set_level(logging.WARNING, logger="batchgate")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    d = Dispatcher(f"http://127.0.0.1:{port}/v1", max_inflight_tokens="auto",
                   connect_timeout=1.0)
    try:
        assert d.admission is None
    finally:
        d.close()
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_stale_metrics_admit_nothing_until_they_return(metrics_fake, caplog):
    srv = metrics_fake("vllm")
    caplog.set_level(logging.INFO, logger="batchgate")

    async def main() -> None:
        async with Dispatcher(srv.base_url, max_inflight_tokens="auto",
                              metrics_interval=0.05, metrics_stale_after=0.4) as d:
            assert d.admission is not None and d.admission["kv_blocks"] == 256
            r = await d.generate("before", max_tokens=4)
            assert r.text == "echo:before"
            srv.mode = "error"
            await asyncio.sleep(0.8)
            st = d.stats()["admission"]
            assert st["stale"] is True and st["limit_blocks"] == 0
            assert st["scrape_errors"] > 0 and "500" in st["last_scrape_error"]
            task = asyncio.ensure_future(d.generate("during", max_tokens=4))
            await asyncio.sleep(0.5)
            assert not task.done()  # held back while the server says nothing
            srv.mode = "vllm"
            r = await asyncio.wait_for(task, 10)
            assert r.text == "echo:during"
            st = d.stats()["admission"]
            assert st["stale"] is False and st["stale_episodes"] == 1
            assert st["limit_blocks"] > 0
            await asyncio.sleep(0.6)  # let the logger run

    asyncio.run(main())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "no metrics from" in text and "metrics are back" in text


def test_auto_argument_errors(metrics_fake):
    srv = metrics_fake("vllm")
    url = srv.base_url
    with pytest.raises(ValueError, match="'auto'"):
        Dispatcher(url, max_inflight_tokens="automatic")
    with pytest.raises(ValueError, match="kv_target"):
        Dispatcher(url, max_inflight_tokens="auto", kv_target=0.9, kv_high=0.8)
    with pytest.raises(ValueError, match="metrics_interval"):
        Dispatcher(url, max_inflight_tokens="auto", metrics_interval=0)
    with pytest.raises(ValueError, match="metrics_stale_after"):
        Dispatcher(url, max_inflight_tokens="auto", metrics_interval=1.0,
                   metrics_stale_after=0.5)
    with pytest.raises(TypeError, match="kv_high"):
        Dispatcher(url, max_inflight_tokens="auto", kv_high="0.9")
    with pytest.raises(ValueError, match="metrics_url"):
        Dispatcher(url, max_inflight_tokens="auto", metrics_url="ftp://x/metrics")
    # An explicit metrics_url is used as given.
    d = Dispatcher(url, max_inflight_tokens="auto", metrics_url=srv.base_url[:-3] + "/metrics")
    try:
        assert d.admission is not None and d.admission["metrics_url"].endswith("/metrics")
    finally:
        d.close()


def test_fallback_message_hides_url_credentials(metrics_fake, caplog):
    srv = metrics_fake("missing")
    caplog.set_level(logging.INFO, logger="batchgate")
    url = srv.base_url.replace("http://", "http://user:s3cret@")
    d = Dispatcher(url, max_inflight_tokens="auto", api_key="sk-hidden")
    d.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "falling back" in text and "***@127.0.0.1" in text
    assert "s3cret" not in text and "sk-hidden" not in text
