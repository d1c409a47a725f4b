"""Exact prompt counts from the server's /tokenize (Dispatcher.count_tokens).

Against batchgate.simserver (vLLM's /tokenize shape, counted with the same
model that charges prompts in /v1/completions) and tests/fake_vllm.py (word
counts, fault directives, or no /tokenize at all).
"""
import asyncio

import pytest

from batchgate import Dispatcher, HTTPStatusError, plan_batches
from batchgate.simserver import SimServerThread
from batchgate.sync import SyncDispatcher
from fake_vllm import FakeVLLM

TEXTS = ["hello world", "안녕하세요, 음식이 정말 맛있어요!", "좋아요 👍👍", "",
         "A longer English review: the noodles were great but the wait was long.",
         "hello world"]


@pytest.fixture(scope="module")
def sim():
    srv = SimServerThread(step_base_s=0.0, step_per_token_s=0.0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(sim):
    sim.reset_stats()
    sim.server.tokenize_delay_s = 0.0
    return sim


def run(coro):
    return asyncio.run(coro)


def n_tokenize(srv):
    return srv.stats()["num_tokenize_requests"]


def test_counts_equal_the_servers_prompt_tokens(server):
    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            counts = await d.count_tokens(TEXTS)
            # What the server charges when it runs each prompt for real.
            charged = [(await d.generate(t, max_tokens=1)).usage["prompt_tokens"]
                       for t in TEXTS if t]
            return counts, charged

    counts, charged = run(main())
    assert counts[3] == 0
    assert [c for t, c in zip(TEXTS, counts) if t] == charged
    assert counts[0] == counts[5] and len(set(counts)) > 3


def test_cache_hits_send_no_request(server):
    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            first = await d.count_tokens(TEXTS)
            after_first = n_tokenize(server)
            again = await d.count_tokens(list(reversed(TEXTS)))
            after_again = n_tokenize(server)
            # with_options views share the root's cache.
            view = await d.with_options(timeout=5).count_tokens(TEXTS[:2])
            return first, after_first, again, after_again, view, n_tokenize(server)

    first, after_first, again, after_again, view, after_view = run(main())
    assert after_first == len(set(TEXTS))  # duplicates inside one call: one request
    assert again == list(reversed(first))
    assert after_again == after_first  # every text was cached
    assert view == first[:2] and after_view == after_first


def test_cache_is_bounded_lru(server):
    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            d.token_cache_size = 2
            await d.count_tokens(["a b", "c d", "e f"])  # "a b" falls out
            base = n_tokenize(server)
            await d.count_tokens(["e f", "c d"])
            hit = n_tokenize(server) - base
            await d.count_tokens(["a b"])
            return hit, n_tokenize(server) - base, len(d._token_cache)

    hit, miss, size = run(main())
    assert hit == 0
    assert miss == 1
    assert size == 2


def test_concurrency_bounded_by_count_cap_not_token_cap(server):
    server.server.tokenize_delay_s = 0.05
    texts = [f"review {i} was fine" for i in range(24)]

    async def main():
        # A token cap of 1 would serialize anything charged to it: counting
        # must ride on the count cap only.
        async with Dispatcher(server.base_url + "/v1", max_concurrent=3,
                              max_inflight_tokens=1) as d:
            counts = await d.count_tokens(texts)
            return counts, d.stats()

    counts, stats = run(main())
    peak = server.stats()["tokenize_peak"]
    assert len(counts) == 24 and all(c > 0 for c in counts)
    assert peak == 3, peak
    assert stats["max_in_flight"] <= 3
    assert stats["tokens_free"] == 1


def test_plan_batches_with_server_counts(server):
    texts = [f"리뷰 {i}: 맛있어요 " * (1 + i % 5) for i in range(40)]

    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            return await d.count_tokens(texts)

    counts = run(main())
    plan = plan_batches(texts, 60, counts=counts, oversize="alone")
    for b, idx in enumerate(plan.indices):
        assert plan.token_counts[b] == sum(counts[i] for i in idx)
    assert sum(len(b) for b in plan) == len(texts)


def test_sync_dispatcher_counts(server):
    with SyncDispatcher(server.base_url + "/v1") as sd:
        assert sd.count_tokens(["hello world", "hello world"]) == [3, 3]
        counter = sd.token_counter()
        plan = plan_batches(["hello world", "x"], 100, counter=counter)
    assert plan.token_counts[0] == 3 + 1
    assert n_tokenize(server) == 2


def test_server_without_tokenize_is_a_clear_error():
    srv = FakeVLLM(tokenize=False).start_in_thread()
    try:
        async def main():
            async with Dispatcher(srv.base_url, max_retries=0) as d:
                with pytest.raises(HTTPStatusError) as ei:
                    await d.count_tokens(["a", "b", "c"])
                return ei.value, d.tokenize_url

        err, url = run(main())
    finally:
        srv.stop()
    assert err.status == 404
    assert "no vLLM /tokenize endpoint" in str(err)
    assert url.endswith(f":{srv.port}/tokenize")  # the root, not /v1/tokenize
    assert "/v1/tokenize" not in str(err)


def test_errors_name_the_callers_index():
    srv = FakeVLLM().start_in_thread()
    try:
        async def main():
            async with Dispatcher(srv.base_url, max_retries=0) as d:
                ok = await d.count_tokens(["one two three", "four"])
                # Duplicates before the bad text: its index among distinct
                # texts (1) differs from the caller's (2).
                with pytest.raises(HTTPStatusError) as ei:
                    await d.count_tokens(["a b", "a b", "x [[status=400,msg=too-long]]"])
                return ok, ei.value

        ok, err = run(main())
    finally:
        srv.stop()
    assert ok == [3, 1]
    assert str(err).startswith("texts[2]: ") and "too-long" in str(err)
    assert err.index == 2 and err.status == 400


@pytest.mark.parametrize("bad, msg", [
    (["ok", "fine", 7], r"texts\[2\] must be str, not int"),
    (["ok", None], r"texts\[1\] must be str, not NoneType"),
    ("a single string", "not a single str"),
    (b"bytes", "not a single bytes"),
    (42, "iterable of str, not int"),
])
def test_bad_input_names_the_item(server, bad, msg):
    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            with pytest.raises(TypeError, match=msg):
                await d.count_tokens(bad)

    run(main())
    assert n_tokenize(server) == 0  # checked before anything is sent


def test_add_special_tokens_is_part_of_the_key(server):
    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            await d.count_tokens(["same"])
            await d.count_tokens(["same"], add_special_tokens=False)
            with pytest.raises(TypeError, match="add_special_tokens must be a bool"):
                await d.count_tokens(["same"], add_special_tokens=1)
            return n_tokenize(server)

    assert run(main()) == 2


@pytest.mark.parametrize("exact", [False, True])
def test_exact_prompt_tokens_charge_the_token_cap(exact):
    # One "word" to the fake's tokenizer, ~1,000 tokens to the estimator: with
    # a 1,200-token cap the estimate lets one request run at a time, the
    # server's count lets the count cap (6) govern.
    srv = FakeVLLM().start_in_thread()
    # Estimated: 0.1 s answers, so a second request let through would overlap.
    # Counted: the fake holds answers until 6 are in flight (exact, not timed).
    tail = "" if exact else " [[delay=0.1]]"
    prompts = [f"{i}" + "맛있어요" * 300 + tail for i in range(12)]
    try:
        async def main():
            async with Dispatcher(srv.base_url, max_concurrent=6, max_inflight_tokens=1200,
                                  exact_prompt_tokens=exact) as d:
                if exact:
                    # Counted (and cached) first, so the generation's
                    # concurrency below is measured alone.
                    await d.map(prompts[:1], max_tokens=10)
                    counted = srv.stats()["by_path"].get("/tokenize", 0)
                    await d.count_tokens(prompts)
                    counted = srv.stats()["by_path"].get("/tokenize", 0) - counted
                    srv.reset()
                    srv.hold = 6
                else:
                    counted = 0
                res = await d.map(prompts, max_tokens=10)
                one = await d.generate(prompts[0], max_tokens=10)
                return res, one, d.stats(), counted

        res, one, stats, counted = run(main())
        st = srv.stats()
    finally:
        srv.stop()
    assert [r.text for r in res] == ["echo:" + p for p in prompts]
    assert one.text == "echo:" + prompts[0]
    assert stats["tokens_free"] == 1200
    assert counted == (11 if exact else 0)  # the first prompt was counted by map() itself
    assert st["by_path"].get("/tokenize", 0) == 0  # cached
    assert st["hold_timeouts"] == 0
    # The count cap governs, not the estimate's 1.
    assert st["max_in_flight"] == (6 if exact else 1)


def test_exact_prompt_tokens_needs_a_token_cap(server):
    async def main():
        async with Dispatcher(server.base_url + "/v1", exact_prompt_tokens=True) as d:
            assert d.exact_prompt_tokens is False  # nothing to charge: no counting
            await d.map(["a", "b"], max_tokens=1)
        with pytest.raises(TypeError, match="exact_prompt_tokens must be a bool"):
            Dispatcher(server.base_url + "/v1", exact_prompt_tokens="yes")

    run(main())
    assert n_tokenize(server) == 0


CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "리뷰를 요약하세요."},
     {"role": "user", "content": "음식이 정말 맛있어요 👍"}],
    [{"role": "user", "content": "hello world"}],
]


def test_chat_counts_equal_the_servers_prompt_tokens(server):
    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            counts = await d.count_chat_tokens(CONVERSATIONS)
            requests = n_tokenize(server)
            no_gen = await d.count_chat_tokens(CONVERSATIONS[:1], add_generation_prompt=False)
            charged = [(await d.chat(m, max_tokens=1)).usage["prompt_tokens"]
                       for m in CONVERSATIONS]
            return counts, requests, no_gen, charged

    counts, requests, no_gen, charged = run(main())
    assert counts == charged
    assert requests == 2  # the repeated conversation is counted once
    assert no_gen[0] < counts[0]  # the generation prompt is part of the key and the count


@pytest.mark.parametrize("bad, msg", [
    ([[{"role": "user", "content": "x"}], "not a list"],
     r"conversations\[1\] must be a non-empty list"),
    ([[{"content": "no role"}]], r"conversations\[0\]\[0\] must be a dict with a str 'role'"),
    ("text", "iterable of message lists, not str"),
])
def test_chat_bad_input_names_the_item(server, bad, msg):
    async def main():
        async with Dispatcher(server.base_url + "/v1") as d:
            with pytest.raises(TypeError, match=msg):
                await d.count_chat_tokens(bad)

    run(main())
    assert n_tokenize(server) == 0


def test_exact_prompt_tokens_for_chat_map():
    # As for map(): ~1,000 estimated tokens, 1 counted by the fake's tokenizer.
    srv = FakeVLLM().start_in_thread()
    convs = [[{"role": "user", "content": f"{i}" + "맛있어요" * 300}] for i in range(12)]
    try:
        async def main():
            async with Dispatcher(srv.base_url, max_concurrent=6, max_inflight_tokens=1200,
                                  exact_prompt_tokens=True) as d:
                counts = await d.count_chat_tokens(convs)
                srv.reset()
                srv.hold = 6  # answers wait until 6 are in flight
                res = await d.chat_map(convs, max_tokens=10)
                return counts, res

        counts, res = run(main())
        st = srv.stats()
    finally:
        srv.stop()
    assert counts == [1] * 12
    assert [r.text for r in res] == ["echo:" + c[0]["content"] for c in convs]
    assert st["by_path"].get("/tokenize", 0) == 0  # counted once, before
    assert st["hold_timeouts"] == 0
    assert st["max_in_flight"] == 6  # the count cap governs (see above)
