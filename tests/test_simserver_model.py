"""The embedded vLLM look-alike over real HTTP on 127.0.0.1: the step-time model, what
preemption costs, vLLM's limits and errors, the timeline."""
import json
import socket
import threading
import time

import pytest

from batchgate import estimate_tokens
from simserver_client import (  # noqa: F401 (sim is a fixture)
    sim, request, post, metrics, metric, sentiment_prompt, concurrent_posts)


# -- the step-time model and what preemption costs -------------------------------------

def test_step_time_is_base_plus_prefill_tokens_plus_decode_seqs(sim):
    srv = sim(step_base_s=0.001, step_prefill_token_s=0.0002, step_decode_seq_s=0.004)
    t0 = time.monotonic()
    status, data = post(srv, "/v1/completions",
                        {"prompt": list(range(1, 301)), "max_tokens": 25, "ignore_eos": True})
    elapsed = time.monotonic() - t0
    assert status == 200
    st = srv.stats()
    # One prefill step (300 tokens, the first token) and 24 decode steps of one sequence.
    assert st["steps"] == 25
    assert st["busy_s"] == pytest.approx(25 * 0.001 + 300 * 0.0002 + 24 * 0.004)
    assert elapsed >= 0.95 * st["busy_s"]
    # Four at once: every decode step pays for four sequences; the base cost is shared.
    srv.reset_stats()
    time.sleep(0.1)  # idle time is wall time with nothing to run; busy_s is the model's
    idle = srv.stats()
    assert idle["busy_s"] == 0 and idle["idle_s"] >= 0.1
    bodies = [{"prompt": [i + 1] * 100, "max_tokens": 25, "ignore_eos": True} for i in range(4)]
    assert all(s == 200 for s, _ in concurrent_posts(srv, bodies))
    st = srv.stats()
    assert st["busy_s"] == pytest.approx(st["steps"] * 0.001 + 400 * 0.0002
                                         + (100 - 4) * 0.004)
    assert st["idle_s"] >= 0.1  # the idle gap before the batch stays counted


def test_e2e_latency_histogram_and_percentiles(sim):
    srv = sim(step_base_s=0.02)
    body = {"prompt": [5] * 10, "max_tokens": 20, "ignore_eos": True}
    assert post(srv, "/v1/completions", body)[0] == 200   # >= 20 steps of 20 ms
    assert post(srv, "/v1/completions", dict(body, max_tokens=1))[0] == 200
    st = srv.stats()
    assert st["finished"] == 2
    assert st["latency_p99_s"] >= 0.4 and st["latency_p50_s"] >= 0.02
    assert st["latency_p50_s"] < st["latency_p99_s"]
    text, values = metrics(srv)
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in text
    lab = 'model_name="sim-qwen2.5-7b",engine="0"'
    assert values[("vllm:e2e_request_latency_seconds_count", lab)] == 2
    assert values[("vllm:e2e_request_latency_seconds_sum", lab)] >= 0.42
    assert values[("vllm:e2e_request_latency_seconds_bucket", lab + ',le="0.3"')] <= 1
    assert values[("vllm:e2e_request_latency_seconds_bucket", lab + ',le="+Inf"')] == 2


def test_preemption_costs_the_recompute_time(sim):
    # 8 sequences of 100 + 60 tokens need 80 blocks of 16; the cache has 32.
    kw = dict(max_model_len=512, step_base_s=0.0, step_prefill_token_s=0.0001,
              step_decode_seq_s=0.0)
    bodies = [{"prompt": [i + 1] * 100, "max_tokens": 60, "ignore_eos": True} for i in range(8)]
    tight = sim(kv_cache_tokens=512, **kw)
    assert all(s == 200 for s, _ in concurrent_posts(tight, bodies))
    st = tight.stats()
    assert st["num_preemptions"] > 0 and st["recomputed_tokens"] > 0
    # A preempted sequence is prefilled again: prompt and the tokens it had made.
    assert st["recomputed_tokens"] >= 100 * st["num_preemptions"]
    assert st["busy_s"] == pytest.approx(0.0001 * (800 + st["recomputed_tokens"]))
    roomy = sim(kv_cache_tokens=65536, **kw)
    assert all(s == 200 for s, _ in concurrent_posts(roomy, bodies))
    assert roomy.stats()["busy_s"] == pytest.approx(0.0001 * 800)
    assert st["busy_s"] >= roomy.stats()["busy_s"] + 0.0001 * 100 * st["num_preemptions"]


def test_blocks_waste_their_tail(sim):
    # 4 blocks of 16 = 64 tokens. Three 17-token sequences are 51 tokens but need 6 blocks.
    srv = sim(kv_cache_tokens=64, max_model_len=64, block_size=16, mode="naive",
              step_base_s=0.01)
    text, values = metrics(srv)
    assert 'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="4"} 1.0' in text
    bodies = [{"prompt": [i + 1] * 17, "max_tokens": 10, "ignore_eos": True} for i in range(3)]
    results = concurrent_posts(srv, bodies)
    assert sorted(s for s, _ in results) == [200, 200, 500]
    assert srv.stats()["peak_kv_cache_usage"] == 1.0
    # One 17-token sequence holds 2 of 4 blocks: usage 50 %, not 17/64.
    one = sim(kv_cache_tokens=64, max_model_len=64, block_size=16, step_base_s=0.05)
    seen = []

    def watch():
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            st = one.stats()
            if st["num_requests_running"]:
                seen.append(st["kv_cache_usage_perc"])
            time.sleep(0.005)
    w = threading.Thread(target=watch)
    w.start()
    assert post(one, "/v1/completions", {"prompt": [7] * 17, "max_tokens": 3,
                                         "ignore_eos": True})[0] == 200
    w.join()
    assert seen and seen[0] == 0.5
    _, big = metrics(sim(kv_cache_tokens=4096, max_model_len=1024, block_size=32))
    assert big[("vllm:cache_config_info",
                'block_size="32",engine="0",num_gpu_blocks="128"')] == 1


# -- vLLM's limits and errors -----------------------------------------------------------

def test_over_long_prompt_gets_vllms_400(sim):
    srv = sim(kv_cache_tokens=1024, max_model_len=256)
    prompt = "word " * 400
    tokens = estimate_tokens(prompt)
    assert tokens >= 256
    status, data = post(srv, "/v1/completions", {"prompt": prompt})
    assert status == 400
    assert data == {"error": {
        "message": (f"This model's maximum context length is 256 tokens. However, your "
                    f"request has {tokens} input tokens. Please reduce the length of the "
                    f"input messages."),
        "type": "BadRequestError", "param": "input_tokens", "code": 400}}
    # One over-long prompt in a list rejects the request.
    status, data = post(srv, "/v1/completions", {"prompt": ["short", prompt]})
    assert status == 400 and data["error"]["param"] == "input_tokens"
    # Prompt fits but prompt + max_tokens does not.
    short = "hello there"
    n = estimate_tokens(short)
    status, data = post(srv, "/v1/completions", {"prompt": short, "max_tokens": 256})
    assert status == 400
    assert data["error"] == {
        "message": (f"'max_tokens' or 'max_completion_tokens' is too large: 256. This "
                    f"model's maximum context length is 256 tokens and your request has "
                    f"{n} input tokens (256 > 256 - {n})."),
        "type": "BadRequestError", "param": "max_tokens", "code": 400}
    # Chat counts its messages the same way.
    status, data = post(srv, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": prompt}]})
    assert status == 400 and "maximum context length is 256" in data["error"]["message"]
    _, values = metrics(srv)
    assert metric(values, "vllm:prompt_tokens_total") == 0  # nothing reached the engine


def test_metrics_names_labels_and_values(sim):
    srv = sim(model="m1")
    text, values = metrics(srv)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert f"# TYPE {name} " in text
        assert metric(values, name, "m1") == 0
    prompt_sum = completion_sum = 0
    for p in ["one", "two two", sentiment_prompt(["좋아요"])]:
        status, data = post(srv, "/v1/completions", {"prompt": p, "max_tokens": 40})
        assert status == 200
        prompt_sum += data["usage"]["prompt_tokens"]
        completion_sum += data["usage"]["completion_tokens"]
    _, values = metrics(srv)
    assert metric(values, "vllm:prompt_tokens_total", "m1") == prompt_sum
    assert metric(values, "vllm:generation_tokens_total", "m1") == completion_sum
    assert metric(values, "vllm:num_requests_running", "m1") == 0
    assert metric(values, "vllm:kv_cache_usage_perc", "m1") == 0
    assert values[("vllm:request_success_total",
                   'model_name="m1",engine="0",finished_reason="stop"')] == 3
    assert 0 < metric(values, "batchgate_sim:peak_kv_cache_usage_perc", "m1") <= 1




def test_running_waiting_and_kv_while_busy(sim):
    srv = sim(step_base_s=0.02, max_num_seqs=4)
    bodies = [{"prompt": f"request number {i} " * 20, "max_tokens": 30} for i in range(10)]
    seen = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            _, values = metrics(srv)
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                         "vllm:kv_cache_usage_perc"):
                seen[name] = max(seen.get(name, 0), metric(values, name))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = concurrent_posts(srv, bodies)
    finally:
        done.set()
        watcher.join()
    assert all(status == 200 for status, _ in results)
    assert seen["vllm:num_requests_running"] == 4  # max_num_seqs caps the batch
    assert seen["vllm:num_requests_waiting"] >= 1
    assert 0 < seen["vllm:kv_cache_usage_perc"] < 1
    stats = srv.stats()
    assert stats["peak_running"] == 4 and stats["num_requests_running"] == 0


def test_step_time_model(sim):
    srv = sim(step_base_s=0.01)
    t0 = time.monotonic()
    status, data = post(srv, "/v1/completions", {"prompt": "x " * 30, "max_tokens": 20})
    elapsed = time.monotonic() - t0
    assert status == 200 and data["usage"]["completion_tokens"] == 20
    # One step per generated token, each at least step_base_s.
    assert elapsed >= 20 * 0.01 * 0.9
    assert srv.stats()["steps"] >= 20


def _memory_heavy_bodies(count):
    # ~100-token prompts that each generate ~40 tokens: 8 of them need more than
    # a 512-token cache holds.
    return [{"prompt": f"{i} " + "review text " * 45, "max_tokens": 200} for i in range(count)]


def test_preemption_when_kv_cache_is_full(sim):
    bodies = _memory_heavy_bodies(8)
    srv = sim(kv_cache_tokens=512, max_model_len=512, step_base_s=0.002)
    results = concurrent_posts(srv, bodies)
    assert all(status == 200 for status, _ in results), results
    _, values = metrics(srv)
    preemptions = metric(values, "vllm:num_preemptions_total")
    assert preemptions > 0
    assert metric(values, "batchgate_sim:recomputed_tokens_total") > 0
    assert metric(values, "batchgate_sim:oom_errors_total") == 0
    assert metric(values, "vllm:kv_cache_usage_perc") == 0  # all blocks came back
    assert srv.stats()["peak_kv_cache_usage"] == 1.0
    tl = srv.timeline()
    assert tl["preemptions"] == sorted(tl["preemptions"])  # cumulative
    assert tl["preemptions"][-1] == preemptions
    # Preemption costs time, never answers: same texts as a roomy server.
    roomy = sim()
    for body, (_, data) in zip(bodies, results):
        assert data["choices"] == post(roomy, "/v1/completions", body)[1]["choices"]
    assert roomy.stats()["num_preemptions"] == 0


def test_naive_mode_fails_with_out_of_memory(sim):
    srv = sim(kv_cache_tokens=512, max_model_len=512, step_base_s=0.002, mode="naive")
    results = concurrent_posts(srv, _memory_heavy_bodies(8))
    failed = [data for status, data in results if status == 500]
    assert failed, "a full cache must fail some requests in naive mode"
    for data in failed:
        assert data["error"]["type"] == "InternalServerError"
        assert data["error"]["code"] == 500
        assert "out of memory" in data["error"]["message"]
    assert any(status == 200 for status, _ in results)
    _, values = metrics(srv)
    assert metric(values, "batchgate_sim:oom_errors_total") == len(failed)
    assert metric(values, "vllm:num_preemptions_total") == 0
    assert metric(values, "vllm:kv_cache_usage_perc") == 0
    assert srv.timeline()["oom_errors"][-1] == len(failed)
    # The server is fine afterwards.
    status, _ = post(srv, "/v1/completions", _memory_heavy_bodies(1)[0])
    assert status == 200


@pytest.mark.parametrize("how", ["close", "half-close"])
def test_client_disconnect_aborts_and_frees_kv_blocks(sim, how):
    srv = sim(step_base_s=0.05)
    body = json.dumps({"prompt": "abandoned " * 50, "max_tokens": 200}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 5
        while srv.stats()["num_requests_running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if how == "half-close":
            # vLLM (uvicorn) treats EOF as a disconnect: no answer, request aborted.
            s.shutdown(socket.SHUT_WR)
            assert s.recv(65536) == b""
    deadline = time.monotonic() + 5
    while srv.stats()["num_requests_running"] or srv.stats()["kv_cache_usage_perc"]:
        assert time.monotonic() < deadline, srv.stats()
        time.sleep(0.01)
    assert srv.stats()["generation_tokens"] < 200  # it did not run to the end


# -- the timeline -------------------------------------------------------------------

def test_timeline_endpoint_and_api(sim):
    srv = sim(step_base_s=0.002, timeline_interval_s=0.0)
    concurrent_posts(srv, [{"prompt": f"p{i} " * 30, "max_tokens": 20} for i in range(6)])
    status, _, tl = request(srv, "GET", "/debug/timeline")
    assert status == 200
    n = len(tl["t"])
    assert n > 10
    for series in ("kv_cache_usage", "running", "waiting", "preemptions", "oom_errors"):
        assert len(tl[series]) == n, series
    assert tl["t"] == sorted(tl["t"])
    assert all(0 <= kv <= 1 for kv in tl["kv_cache_usage"])
    assert max(tl["kv_cache_usage"]) > 0 and max(tl["running"]) > 0
    assert tl["running"][-1] == 0 and tl["kv_cache_usage"][-1] == 0  # idle at the end
    mid = tl["t"][n // 2]
    _, _, later = request(srv, "GET", f"/debug/timeline?since={mid}")
    assert later["t"] == [t for t in tl["t"] if t > mid]
    assert srv.timeline()["t"] == tl["t"]
    assert request(srv, "GET", "/debug/timeline?since=abc")[0] == 400
    # reset clears samples and counters, between demo scenarios.
    assert request(srv, "POST", "/debug/reset", b"")[0] == 200
    stats = srv.stats()
    assert stats["generation_tokens"] == 0 and stats["peak_kv_cache_usage"] == 0
    assert len(srv.timeline()["t"]) <= 1


def test_timeline_stays_bounded():
    from batchgate.simserver import Timeline
    tl = Timeline(interval_s=0.0, max_samples=100)
    for i in range(1000):
        tl.record(tl.t0 + i * 0.001, 0.5, 1, 0)
    assert 50 <= len(tl.t) <= 100
    assert tl.t == sorted(tl.t)
