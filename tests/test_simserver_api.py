"""The embedded vLLM look-alike over real HTTP on 127.0.0.1: its OpenAI-compatible routes
and answer lengths (ignore_eos, min_tokens, --output-len)."""
import json

import pytest

from batchgate import estimate_tokens
from batchgate.simserver import SimServer
from batchgate.simserver import answers
from simserver_client import (  # noqa: F401 (sim is a fixture)
    sim, request, post, metrics, sentiment_prompt)


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
