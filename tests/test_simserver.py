"""The embedded vLLM look-alike, over real HTTP on 127.0.0.1."""
import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from batchgate import estimate_tokens
from batchgate.simserver import SimServer, SimServerThread
from batchgate.simserver import answers

SENTIMENT_HEAD = ('Count the positive and negative reviews below. Answer only JSON '
                  '{"positive_count": <int>, "negative_count": <int>}.\nReviews:\n')


def sentiment_prompt(reviews):
    return SENTIMENT_HEAD + "\n".join(f"{i + 1}. {r}" for i, r in enumerate(reviews))


@pytest.fixture
def sim():
    """Factory: sim(**kwargs) -> a started SimServerThread, stopped at teardown."""
    started = []

    def make(**kwargs):
        kwargs.setdefault("step_base_s", 0.0)
        kwargs.setdefault("step_per_token_s", 0.0)
        srv = SimServerThread(**kwargs)
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def request(srv, method, path, body=None, headers=None, timeout=30):
    """(status, headers, parsed JSON or text) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        conn.request(method, path, body=body,
                     headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("content-type", "")
        data = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


def post(srv, path, obj):
    status, _, data = request(srv, "POST", path, obj)
    return status, data


def metrics(srv):
    status, _, text = request(srv, "GET", "/metrics")
    assert status == 200
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (\S+)', line)
        assert m, f"not a Prometheus sample line: {line!r}"
        values[(m.group(1), m.group(2))] = float(m.group(3))
    return text, values


def metric(values, name, model="sim-qwen2.5-7b"):
    return values[(name, f'model_name="{model}",engine="0"')]


# -- the OpenAI-compatible routes -------------------------------------------------------

def test_completion_single_prompt(sim):
    srv = sim()
    status, data = post(srv, "/v1/completions",
                        {"model": "sim-qwen2.5-7b", "prompt": "Say hello", "max_tokens": 64})
    assert status == 200
    assert data["object"] == "text_completion"
    assert data["model"] == "sim-qwen2.5-7b"
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert "Say hello" in choice["text"]
    usage = data["usage"]
    assert usage["prompt_tokens"] == estimate_tokens("Say hello")
    assert usage["completion_tokens"] == estimate_tokens(choice["text"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_list_of_prompts_maps_indices(sim):
    srv = sim()
    prompts = [sentiment_prompt(["맛있어요 최고", "별로예요"]),
               "plain text prompt",
               sentiment_prompt(["good", "great", "nice", "awful"])]
    status, data = post(srv, "/v1/completions", {"prompt": prompts, "max_tokens": 100})
    assert status == 200
    singles = [post(srv, "/v1/completions", {"prompt": p, "max_tokens": 100})[1]
               for p in prompts]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    for choice, single in zip(data["choices"], singles):
        assert choice["text"] == single["choices"][0]["text"]
    assert json.loads(data["choices"][0]["text"]) == {"positive_count": 1, "negative_count": 1}
    assert json.loads(data["choices"][2]["text"]) == {"positive_count": 3, "negative_count": 1}
    assert data["usage"]["prompt_tokens"] == sum(estimate_tokens(p) for p in prompts)
    # n choices per prompt: index = prompt_index * n + j, as in vLLM.
    status, data = post(srv, "/v1/completions", {"prompt": prompts[:2], "n": 2, "max_tokens": 100})
    assert status == 200
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in data["choices"]]
    assert texts[0] == texts[1] == singles[0]["choices"][0]["text"]
    assert texts[2] == texts[3] == singles[1]["choices"][0]["text"]


def test_completion_token_id_prompts(sim):
    srv = sim()
    status, data = post(srv, "/v1/completions", {"prompt": [11, 22, 33], "max_tokens": 50})
    assert status == 200 and data["usage"]["prompt_tokens"] == 3
    status, data = post(srv, "/v1/completions", {"prompt": [[1, 2], [3]], "max_tokens": 50})
    assert status == 200 and data["usage"]["prompt_tokens"] == 3
    assert [c["index"] for c in data["choices"]] == [0, 1]


def test_sentiment_answer_is_json_with_counts_from_the_reviews(sim):
    from batchgate.reviews import SAMPLE_REVIEWS
    with open(SAMPLE_REVIEWS, encoding="utf-8") as f:
        reviews = [json.loads(line)["text"] for line in f][:40]
    srv = sim()
    status, data = post(srv, "/v1/completions",
                        {"prompt": sentiment_prompt(reviews), "max_tokens": 200})
    assert status == 200
    answer = json.loads(data["choices"][0]["text"])
    assert set(answer) == {"positive_count", "negative_count"}
    assert answer["positive_count"] + answer["negative_count"] == len(reviews)
    assert answer["positive_count"] == sum(answers.classify(r) for r in reviews)
    assert 0 < answer["positive_count"] < len(reviews)  # the rules see both kinds
    # Keyword rules: longest match wins, so a negative compound is not read as positive.
    assert answers.classify("직원이 불친절했어요") is False
    assert answers.classify("국물이 정말 맛있어요 👍") is True
    assert answers.classify("음식이 식었고 별로였어요") is False


def test_fault_markers_for_client_tests(sim):
    srv = sim()
    garbage = sentiment_prompt(["좋아요", "별로 [[sim:garbage]]"])
    for _ in range(2):
        status, data = post(srv, "/v1/completions", {"prompt": garbage, "max_tokens": 50})
        assert status == 200
        with pytest.raises(ValueError):
            json.loads(data["choices"][0]["text"])
    once = sentiment_prompt(["좋아요", "별로 [[sim:garbage-once]]"])
    first = post(srv, "/v1/completions", {"prompt": once, "max_tokens": 50})[1]
    again = post(srv, "/v1/completions", {"prompt": once, "max_tokens": 50})[1]
    with pytest.raises(ValueError):
        json.loads(first["choices"][0]["text"])
    assert json.loads(again["choices"][0]["text"]) == {"positive_count": 1, "negative_count": 1}
    status, data = post(srv, "/v1/completions", {"prompt": "x [[sim:error]]"})
    assert status == 500 and data["error"]["type"] == "InternalServerError"
    assert data["error"]["code"] == 500
    assert post(srv, "/v1/completions", {"prompt": "x [[sim:error]]"})[0] == 500
    assert post(srv, "/v1/completions", {"prompt": "y [[sim:error-once]]"})[0] == 500
    assert post(srv, "/v1/completions", {"prompt": "y [[sim:error-once]]"})[0] == 200
    assert srv.stats()["num_bad_requests"] == 0


def test_chat_completion(sim):
    srv = sim()
    messages = [{"role": "system", "content": "You count reviews."},
                {"role": "user", "content": sentiment_prompt(["좋아요", "최악", "추천해요"])}]
    status, data = post(srv, "/v1/chat/completions",
                        {"model": "sim-qwen2.5-7b", "messages": messages, "max_tokens": 50})
    assert status == 200
    assert data["object"] == "chat.completion"
    [choice] = data["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert json.loads(choice["message"]["content"]) == {"positive_count": 2, "negative_count": 1}
    expected_prompt = (answers.CHAT_REPLY_TOKENS + sum(
        answers.CHAT_TOKENS_PER_MESSAGE + estimate_tokens(m["content"]) for m in messages))
    assert data["usage"]["prompt_tokens"] == expected_prompt
    # Content given as parts is read too.
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    status, data = post(srv, "/v1/chat/completions", {"messages": parts})
    assert status == 200 and "hello" in data["choices"][0]["message"]["content"]


def test_models_health_version(sim):
    srv = sim(model="my-model", max_model_len=4096)
    status, _, data = request(srv, "GET", "/v1/models")
    assert status == 200
    assert data["object"] == "list"
    [model] = data["data"]
    assert model["id"] == "my-model" and model["object"] == "model"
    assert model["owned_by"] == "vllm" and model["max_model_len"] == 4096
    status, _, body = request(srv, "GET", "/health")
    assert status == 200 and body == ""
    assert request(srv, "GET", "/version")[0] == 200
    # Another model name is vLLM's 404.
    status, data = post(srv, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert status == 404
    assert data == {"error": {"message": "The model `gpt-4` does not exist.",
                              "type": "NotFoundError", "param": "model", "code": 404}}


def test_max_tokens_truncates_with_finish_reason_length(sim):
    srv = sim()
    status, data = post(srv, "/v1/completions", {"prompt": "a long enough prompt to echo",
                                                 "max_tokens": 3})
    assert status == 200
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3
    assert post(srv, "/v1/completions", {"prompt": "a long enough prompt to echo",
                                         "max_tokens": 3.0})[1]["choices"] == data["choices"]
    _, full = post(srv, "/v1/completions", {"prompt": "a long enough prompt to echo",
                                            "max_tokens": 500})
    assert full["choices"][0]["text"].startswith(data["choices"][0]["text"])
    assert len(data["choices"][0]["text"]) < len(full["choices"][0]["text"])


def test_same_input_same_output(sim):
    body = {"prompt": [sentiment_prompt(["좋아요", "그냥 그래요", "so so"]), "echo me"],
            "max_tokens": 100}
    a = post(sim(), "/v1/completions", body)[1]
    b = post(sim(), "/v1/completions", body)[1]
    c = post(sim(kv_cache_tokens=1024, max_model_len=1024, mode="naive"), "/v1/completions",
             body)[1]
    assert a["choices"] == b["choices"] == c["choices"]
    assert a["usage"] == b["usage"] == c["usage"]


# -- answer lengths: ignore_eos, min_tokens, --output-len ---------------------------------

def test_ignore_eos_generates_max_tokens(sim):
    srv = sim()
    body = {"prompt": "short answer please", "max_tokens": 300}
    _, natural = post(srv, "/v1/completions", body)
    assert natural["choices"][0]["finish_reason"] == "stop"
    assert natural["usage"]["completion_tokens"] < 100
    status, data = post(srv, "/v1/completions", dict(body, ignore_eos=True))
    assert status == 200
    assert data["usage"]["completion_tokens"] == 300
    assert data["choices"][0]["finish_reason"] == "length"
    # The text goes on past the natural answer, about as long as the count says.
    text = data["choices"][0]["text"]
    assert text.startswith(natural["choices"][0]["text"])
    assert 250 <= estimate_tokens(text) <= 300
    # Chat: no max_tokens means up to max_model_len, as in vLLM.
    srv2 = sim(max_model_len=512, kv_cache_tokens=1024)
    status, chat = post(srv2, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert status == 200
    assert chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"] == 512
    _, values = metrics(srv)
    assert values[("vllm:request_success_total",
                   'model_name="sim-qwen2.5-7b",engine="0",finished_reason="length"')] == 1


def test_min_tokens_delays_the_stop(sim):
    srv = sim()
    body = {"prompt": sentiment_prompt(["맛있어요", "별로"]), "max_tokens": 200}
    _, natural = post(srv, "/v1/completions", body)
    n0 = natural["usage"]["completion_tokens"]
    assert n0 < 40
    status, data = post(srv, "/v1/completions", dict(body, min_tokens=120))
    assert status == 200
    assert data["usage"]["completion_tokens"] == 120
    assert data["choices"][0]["finish_reason"] == "stop"  # EOS right after min_tokens
    # Below the natural length min_tokens changes nothing.
    assert post(srv, "/v1/completions", dict(body, min_tokens=2))[1]["choices"] == \
        natural["choices"]
    # vLLM's checks, with its 400 shape.
    status, err = post(srv, "/v1/completions", dict(body, min_tokens=201))
    assert status == 400 and err["error"]["type"] == "BadRequestError"
    assert err["error"]["message"] == ("min_tokens must be less than or equal to "
                                       "max_tokens=200, got 201.")
    status, err = post(srv, "/v1/completions", dict(body, min_tokens=-1))
    assert status == 400
    assert err["error"]["message"] == "min_tokens must be greater than or equal to 0, got -1."
    # Chat without max_tokens: checked against what is left of max_model_len.
    status, err = post(srv, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "min_tokens": 40000})
    assert status == 400 and "max_tokens=" in err["error"]["message"]
    # ignore_eos is a pydantic bool in vLLM: lax ("yes", 1) passes, anything else is a 400.
    status, data = post(srv, "/v1/completions", dict(body, ignore_eos="yes"))
    assert status == 200 and data["usage"]["completion_tokens"] == 200
    assert post(srv, "/v1/completions", dict(body, ignore_eos=0))[1]["choices"] == \
        natural["choices"]
    status, err = post(srv, "/v1/completions", dict(body, ignore_eos="maybe"))
    assert status == 400 and err["error"]["param"] == "ignore_eos"


def _lengths(srv, prompts, max_tokens=4000):
    status, data = post(srv, "/v1/completions", {"prompt": prompts, "max_tokens": max_tokens})
    assert status == 200, data
    return data


def test_output_len_distributions_are_seeded_and_per_prompt(sim):
    prompts = [f"summarise document {i}: " + "words " * (i % 7) for i in range(300)]
    fixed = _lengths(sim(output_len="fixed:37"), prompts[:5])
    assert fixed["usage"]["completion_tokens"] == 5 * 37
    assert all(c["finish_reason"] == "stop" for c in fixed["choices"])

    uni = sim(output_len="uniform:50:150", output_len_seed=1)
    data = _lengths(uni, prompts)
    per = [estimate_tokens(c["text"]) for c in data["choices"]]
    total = data["usage"]["completion_tokens"]
    assert 50 * 300 <= total <= 150 * 300
    assert max(per) - min(per) > 60  # spread, not one value
    # Same prompt, same seed: same length (a retry is not luckier); another seed differs.
    again = _lengths(sim(output_len="uniform:50:150", output_len_seed=1), prompts)
    assert again["usage"] == data["usage"]
    other = _lengths(sim(output_len="uniform:50:150", output_len_seed=2), prompts)
    assert other["usage"]["completion_tokens"] != total

    logn = sim(output_len="lognormal:200:0.8", max_model_len=8192, kv_cache_tokens=1 << 20)
    single = [_lengths(logn, [p])["usage"]["completion_tokens"] for p in prompts[:200]]
    mean = sum(single) / len(single)
    assert 160 <= mean <= 240, mean
    assert max(single) > 2.5 * sorted(single)[len(single) // 2]  # a long tail

    # max_tokens still cuts; JSON sentiment answers keep their own length.
    cut = _lengths(sim(output_len="fixed:500"), prompts[:1], max_tokens=20)
    assert cut["usage"]["completion_tokens"] == 20
    assert cut["choices"][0]["finish_reason"] == "length"
    js = _lengths(sim(output_len="fixed:500"), [sentiment_prompt(["좋아요"])])
    assert json.loads(js["choices"][0]["text"]) == {"positive_count": 1, "negative_count": 0}


@pytest.mark.parametrize("spec", ["fixed:0", "uniform:9:3", "lognormal:0:1", "lognormal:5",
                                  "gauss:1:2", "fixed:x", "lognormal:100:9"])
def test_output_len_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="output_len"):
        SimServer(output_len=spec)


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


def concurrent_posts(srv, bodies, path="/v1/completions"):
    """POST every body at once (one thread each); results in order."""
    results = [None] * len(bodies)

    def run(i):
        results[i] = post(srv, path, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


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


# -- HTTP robustness ----------------------------------------------------------------

def test_bad_requests_get_errors_and_the_server_survives(sim):
    srv = sim()
    cases = [
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", b"", 400),
        ("POST", "/v1/completions", b'{"prompt": 5}', 400),
        ("POST", "/v1/completions", b'{"prompt": []}', 400),
        ("POST", "/v1/completions", b'{"prompt": ""}', 400),
        ("POST", "/v1/completions", b'{"prompt": ["a", ""]}', 400),
        ("POST", "/v1/completions", b'{"prompt": [1, "a"]}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "n": 0}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "stream": true}', 400),
        ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400),
        ("POST", "/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', 400),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', 400),
        ("POST", "/v1/completions", "\ud800".encode("utf-8", "surrogatepass"), 400),
        ("GET", "/nope", None, 404),
        ("GET", "/v1/completions", None, 405),
    ]
    for method, path, body, expected in cases:
        status, headers, data = request(srv, method, path, body)
        assert status == expected, (path, body, status, data)
        if status == 400:
            assert set(data["error"]) == {"message", "type", "param", "code"}
            assert data["error"]["code"] == 400 and data["error"]["type"] == "BadRequestError"
        if status == 405:
            assert headers["allow"] == "POST"
    assert srv.stats()["num_bad_requests"] == 16
    assert request(srv, "GET", "/health")[0] == 200


def raw_exchange(port, payload, read_until_close=True, timeout=5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def test_malformed_http_is_answered_and_closed(sim):
    srv = sim()
    assert raw_exchange(srv.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_exchange(srv.port, b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert raw_exchange(srv.port, b"GET /health HTTP/1.1\r\nbad header\r\n\r\n") \
        .startswith(b"HTTP/1.1 400 ")
    assert raw_exchange(srv.port, b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n") \
        .startswith(b"HTTP/1.1 400 ")
    assert raw_exchange(srv.port, b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n") \
        .startswith(b"HTTP/1.1 431 ")
    assert raw_exchange(srv.port, b"POST /v1/completions HTTP/1.1\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n").startswith(b"HTTP/1.1 400 ")
    # A client that sends half a request and leaves does no harm.
    raw_exchange(srv.port, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
                 timeout=0.2)
    assert request(srv, "GET", "/health")[0] == 200


def test_keep_alive_pipelining_chunked_and_expect(sim):
    srv = sim()
    body = json.dumps({"prompt": "pipelined", "max_tokens": 50}).encode()
    one = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
    closing = one.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    out = raw_exchange(srv.port, one + one + closing)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.count(b"connection: close") == 1
    # Chunked body, as some clients send.
    chunked = (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                          for i in range(0, len(body), 7))
               + b"0\r\n\r\n")
    out = raw_exchange(srv.port, chunked)
    assert out.startswith(b"HTTP/1.1 200 OK") and b"pipelined" in out
    # Expect: 100-continue (libcurl sends it for large bodies) gets its interim answer.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
        assert rest.startswith(b"HTTP/1.1 200 OK")
    # HTTP/1.0 closes unless asked to keep alive.
    out = raw_exchange(srv.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in out


async def _client(port, bodies):
    """Send every body on one keep-alive connection; return the statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        for body in bodies:
            raw = json.dumps(body).encode()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head).group(1))
            data = json.loads(await reader.readexactly(length))
            statuses.append((int(head.split()[1]), data["choices"][0]["text"]))
    finally:
        writer.close()
        await writer.wait_closed()
    return statuses


def test_many_concurrent_keep_alive_connections(sim):
    srv = sim(step_base_s=0.001, max_num_seqs=64)
    conns, per_conn = 200, 5

    async def main():
        return await asyncio.gather(*[
            _client(srv.port, [{"prompt": f"conn {c} req {r}", "max_tokens": 30}
                               for r in range(per_conn)])
            for c in range(conns)])

    results = asyncio.run(main())
    assert len(results) == conns
    for c, statuses in enumerate(results):
        assert [s for s, _ in statuses] == [200] * per_conn
        for r, (_, text) in enumerate(statuses):
            assert f"conn {c} req {r}" in text  # each answer went to its own request
    stats = srv.stats()
    assert stats["peak_running"] == 64
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0


# -- API surface --------------------------------------------------------------------

def test_async_context_manager_and_stop_cancels_requests():
    async def main():
        async with SimServer(step_base_s=0.0, step_per_token_s=0.0) as srv:
            assert srv.base_url == f"http://127.0.0.1:{srv.port}"
            statuses = await _client(srv.port, [{"prompt": "hi"}])
            assert statuses[0][0] == 200
        # Stopped: the port no longer answers.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", srv.port)

        slow = SimServer(step_base_s=10.0)
        port = await slow.start()
        task = asyncio.ensure_future(_client(port, [{"prompt": "never finishes"}]))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(slow.stop(), 5)  # does not wait for the 10 s step
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_thread_runner_numbers_stay_readable_after_stop():
    with SimServerThread(step_base_s=0.0, step_per_token_s=0.0) as srv:
        assert request(srv, "POST", "/v1/completions", {"prompt": "hi"})[0] == 200
    assert srv.stats()["generation_tokens"] > 0
    assert len(srv.timeline()["t"]) > 0


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_model_len"):
        SimServer(kv_cache_tokens=1000, max_model_len=2048)
    with pytest.raises(ValueError, match="mode"):
        SimServer(mode="fast")
    with pytest.raises(TypeError, match="max_num_seqs"):
        SimServer(max_num_seqs=2.5)
    with pytest.raises(ValueError, match="step_base_s"):
        SimServer(step_base_s=-1)
    with pytest.raises(ValueError, match="block_size"):
        SimServer(block_size=0)


def test_thread_runner_reports_bind_errors(sim):
    srv = sim()
    with pytest.raises(OSError):
        SimServerThread(port=srv.port).start()


def test_command_line_server():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [os.path.dirname(os.path.dirname(os.path.abspath(
            __import__("batchgate").__file__))), env.get("PYTHONPATH")] if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchgate.simserver", "--port", "0", "--mode", "naive",
         "--kv-cache-tokens", "4096", "--max-model-len", "2048", "--step-base-s", "0",
         "--step-prefill-token-s", "0", "--step-decode-seq-s", "0", "--block-size", "32",
         "--output-len", "fixed:40"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=10)
        conn.request("GET", "/v1/models")
        data = json.loads(conn.getresponse().read())
        conn.close()
        assert data["data"][0]["max_model_len"] == 2048
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "tell me",
                                                                 "max_tokens": 100}))
        assert json.loads(conn.getresponse().read())["usage"]["completion_tokens"] == 40
        conn.request("GET", "/metrics")
        assert ('vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="128"}'
                in conn.getresponse().read().decode())
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    bad = subprocess.run([sys.executable, "-m", "batchgate.simserver", "--max-model-len",
                          "999999", "--port", "0"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert bad.returncode == 2 and "max_model_len" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "batchgate.simserver", "--output-len",
                          "lognormal:300", "--port", "0"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert bad.returncode == 2 and "lognormal takes 2 number(s)" in bad.stderr
