"""Issue 13: batchgate as a true drop-in for the original pipeline.

``original_pipeline.py`` is a copy of the original's shape; these tests run it
as is (asyncio.Semaphore + its own HTTP) and with only its imports changed to
batchgate, against a real loopback server, plus one test per item of the
issue."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

import batchgate
from batchgate.corpus import generate_corpus
from batchgate.simserver.answers import classify
from sentiment_server import SentimentServer

import original_backend


@pytest.fixture(scope="module")
def server():
    srv = SentimentServer().start_in_thread()
    yield srv
    srv.stop()


@pytest.fixture
def sent(server):
    server.reset()
    server.latency = 0.0
    with server._blk:
        server.bodies.clear()
    return server


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def restaurants(n=8, per=60, seed=3):
    """The original's data shape, ids as ints."""
    out = {}
    for rec in generate_corpus(n, per, seed=seed):
        out.setdefault(rec["restaurant_id"], []).append({"content": rec["text"]})
    return [{"restaurant_id": 100 + k, "reviews": v} for k, v in enumerate(out.values())]


def expected(data):
    res = {}
    for r in data:
        pos = sum(classify(" ".join(rv["content"].split())) for rv in r["reviews"])
        res[r["restaurant_id"]] = (pos, len(r["reviews"]) - pos)
    return res


@pytest.fixture
def pipelines(sent, monkeypatch):
    """(original module, batchgate-swapped module), both pointed at the server."""
    import original_pipeline
    url = sent.base_url
    monkeypatch.setattr(original_backend.Config, "VLLM_BASE_URL", url)
    monkeypatch.setenv("VLLM_BASE_URL", url)
    orig = original_pipeline.load(False, "original_pipeline_asyncio")
    swapped = original_pipeline.load(True, "original_pipeline_batchgate")
    assert swapped.Semaphore is batchgate.Semaphore and swapped.Config is batchgate.Config
    assert orig.Semaphore is asyncio.Semaphore
    from batchgate import dispatcher as bgd
    yield orig, swapped
    bgd._close_defaults()


# ---- the original pipeline, imports swapped -----------------------------------------

def test_original_pipeline_same_results_with_imports_swapped(pipelines, sent):
    orig, swapped = pipelines
    data = restaurants()
    a = run(orig.LLMUtils().analyze_multiple_restaurants_vllm(data))
    b = run(swapped.LLMUtils().analyze_multiple_restaurants_vllm(data))
    assert a == b
    exp = expected(data)
    for r in b:
        assert (r["positive_count"], r["negative_count"]) == exp[r["restaurant_id"]]
        assert isinstance(r["restaurant_id"], int)
    # and batchgate's own whole-job coroutine gives the same numbers
    c = run(batchgate.LLMUtils.analyze_multiple_restaurants_vllm(
        data, base_url=sent.base_url))
    keys = ("restaurant_id", "positive_count", "negative_count", "total", "positive_ratio",
            "negative_ratio")
    assert [{k: r[k] for k in keys} for r in c] == a
    assert all(r["complete"] and r["failed_batches"] == 0 for r in c)


# ---- item 1: no deadlock in `async with sem: await d.generate()` -----------------------

def test_item1_async_with_shared_semaphore_thousands_of_batches(sent):
    async def main():
        sem = batchgate.Semaphore(20)
        d = batchgate.Dispatcher(sent.base_url, semaphore=sem, backoff=0.01)

        async def batch(i):
            async with sem:  # the original's shape, the dispatcher's own semaphore
                # a few retry under the held permit (503 once): the permit is not
                # given back during the backoff, nor taken twice
                tail = " [[status=503,times=1]]" if i % 97 == 0 else ""
                return (await d.generate(f"b{i}{tail}", max_tokens=4)).text

        async def fan(i):
            async with sem:  # several requests under one permit: they take turns
                rs = await asyncio.gather(d.generate(f"g{i}a"), d.generate(f"g{i}b"),
                                          d.generate(f"g{i}c"))
                m = await d.map([f"m{i}a", f"m{i}b"])
                return [r.text for r in rs + m]

        try:
            out = await asyncio.wait_for(asyncio.gather(*(batch(i) for i in range(3000))), 60)
            assert out == [f"echo:b{i}" + (" [[status=503,times=1]]" if i % 97 == 0 else "")
                           for i in range(3000)]
            fans = await asyncio.wait_for(asyncio.gather(*(fan(i) for i in range(300))), 60)
            assert fans[7] == ["echo:g7a", "echo:g7b", "echo:g7c", "echo:m7a", "echo:m7b"]
            # Cancellation: tasks cancelled while riding give their permit back once.
            tasks = [asyncio.ensure_future(batch(10_000 + i)) for i in range(200)]
            await asyncio.sleep(0.01)
            for t in tasks[::2]:
                t.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            assert sem.value == 20 and not sem.locked()
            st = d.stats()
            assert st["live"] == 0 and st["permits_free"] == 20
        finally:
            await d.aclose()

    run(main())
    # In-flight never exceeded the semaphore, riders included.
    assert sent.stats()["max_in_flight"] <= 20


# ---- item 2: per-prompt vllm_generate and the _generate_with_vllm shape -----------------

def test_item2_vllm_generate_per_prompt_and_generate_with_vllm(sent):
    async def main():
        async with batchgate.Dispatcher(sent.base_url) as d:
            assert await batchgate.vllm_generate(["p1", "p2"], dispatcher=d) == ["echo:p1",
                                                                                 "echo:p2"]
            responses, metrics = await batchgate.generate_with_vllm(
                ["a b", "c"], temperature=0.1, max_tokens=100, dispatcher=d)
            assert responses == ["echo:a b", "echo:c"]
            assert set(metrics) >= {"latency", "prompt_tokens", "completion_tokens",
                                    "total_tokens", "tokens_per_second", "attempts"}
            assert metrics["latency"] > 0 and metrics["attempts"] == 1
            assert metrics["prompt_tokens"] == 3  # the fake counts words
            r2, _ = await batchgate.LLMUtils._generate_with_vllm(["x"], 0.1, 10, dispatcher=d)
            assert r2 == ["echo:x"]
        body = sent.stats()["last_body"]
        assert body["temperature"] == 0.1 and body["max_tokens"] == 10

    run(main())


# ---- item 3: LLM_MODEL and the priority queue -----------------------------------------

def test_item3_config_from_environment():
    env = dict(os.environ, LLM_MODEL="my-lora", VLLM_USE_PRIORITY_QUEUE="true",
               VLLM_PRIORITY_BY_PREFILL_COST="0")
    code = ("import batchgate as b; c=b.Config; "
            "print(c.LLM_MODEL, c.VLLM_USE_PRIORITY_QUEUE, c.VLLM_PRIORITY_BY_PREFILL_COST)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["my-lora", "True", "False"], out.stderr
    bad = subprocess.run([sys.executable, "-c", code],
                         env=dict(env, VLLM_USE_PRIORITY_QUEUE="maybe"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "VLLM_USE_PRIORITY_QUEUE" in bad.stderr


def test_item3_llm_model_reaches_the_request(sent, monkeypatch):
    monkeypatch.setattr(batchgate.Config, "LLM_MODEL", "my-lora")

    async def main():
        async with batchgate.Dispatcher(sent.base_url) as d:
            await d.generate("x")
        async with batchgate.Dispatcher(sent.base_url, model="explicit") as d:
            await d.generate("y")

    run(main())
    assert [b.get("model") for b in sent.bodies] == ["my-lora", "explicit"]


def _is_sorted(xs):
    return all(a <= b for a, b in zip(xs, xs[1:]))


def test_item3_priority_order_in_map_process_batches_and_analyze(sent, monkeypatch):
    monkeypatch.setattr(batchgate.Config, "VLLM_USE_PRIORITY_QUEUE", True)
    prompts = ["x" * n for n in (50, 5, 200, 1, 80, 20)]
    data = restaurants(4, 80)

    async def main():
        async with batchgate.Dispatcher(sent.base_url, max_concurrent=1) as d:
            res = await d.map(prompts)
            assert [r.text for r in res] == ["echo:" + p for p in prompts]  # input order
            arrived = [b["prompt"] for b in sent.bodies]
            assert arrived == sorted(prompts, key=len)
            sent.bodies.clear()
            out = await batchgate.process_batches(prompts, lambda p: p, dispatcher=d)
            assert list(out) == ["echo:" + p for p in prompts]
            assert [b["prompt"] for b in sent.bodies] == sorted(prompts, key=len)
            assert _is_sorted([b["priority"] for b in sent.bodies])
            sent.bodies.clear()
            results = await batchgate.analyze_restaurants(data, dispatcher=d)
            pr = [b["priority"] for b in sent.bodies]
            assert len(pr) > len(data) and _is_sorted(pr) and len(set(pr)) > 1
            # the priority is the batch's estimated prompt tokens, not its position
            est = batchgate.estimate_many([b["prompt"] for b in sent.bodies])
            assert all(abs(p - e) < 0.2 * e for p, e in zip(pr, est)), (pr[:5], est[:5])
            exp = expected(data)
            assert {r["restaurant_id"]: (r["positive_count"], r["negative_count"])
                    for r in results} == exp

    run(main())


def test_item3_original_pipeline_priority_order_honoured(pipelines, sent, monkeypatch):
    orig, swapped = pipelines
    data = restaurants(5, 90, seed=11)
    orders = []
    for cfg in (original_backend.Config, batchgate.Config):
        monkeypatch.setattr(cfg, "VLLM_USE_PRIORITY_QUEUE", True)
        monkeypatch.setattr(cfg, "VLLM_MAX_CONCURRENT_BATCHES", 1)
    for mod in (orig, swapped):
        sent.bodies.clear()
        run(mod.LLMUtils().analyze_multiple_restaurants_vllm(data))
        orders.append([(b["priority"], b["prompt"][0]) for b in sent.bodies])
    assert orders[0] == orders[1]
    assert _is_sorted([p for p, _ in orders[0]])


# ---- item 4: the whole job as a coroutine ----------------------------------------------

def test_item4_analyze_restaurants_shape_and_errors(sent):
    data = restaurants(3, 40)
    data[1]["restaurant_id"] = "r-str"
    data.append({"restaurant_id": 7, "reviews": []})

    async def main():
        async with batchgate.Dispatcher(sent.base_url) as d:
            res = await batchgate.analyze_restaurants(data, dispatcher=d)
            with pytest.raises(ValueError, match=r"restaurants_data\[0\]\['reviews'\]\[0\] has "
                               r"no review text field \(keys: \['stars'\]"):
                await batchgate.analyze_restaurants(
                    [{"restaurant_id": 1, "reviews": [{"stars": 5}]}], dispatcher=d)
            with pytest.raises(TypeError, match=r"restaurants_data\[0\] must be a dict"):
                await batchgate.analyze_restaurants(["x"], dispatcher=d)
            return res

    res = run(main())
    assert [r["restaurant_id"] for r in res] == [100, "r-str", 102, 7]
    exp = expected(data)
    for r in res[:3]:
        pos, neg = exp[r["restaurant_id"]]
        assert (r["positive_count"], r["negative_count"], r["total"]) == (pos, neg, pos + neg)
        assert r["positive_ratio"] == round(100 * pos / (pos + neg))
        assert isinstance(r["positive_ratio"], int) and r["complete"]
    assert res[3]["total"] == 0 and res[3]["positive_ratio"] is None and res[3]["batches"] == 0


# ---- items 5 and 6: one retry policy; failures marked, never silently lost --------------

def test_item5_retries_do_not_stack(sent):
    async def main():
        async with batchgate.Dispatcher(sent.base_url, backoff=0.01,
                                        max_retries=3) as d:
            t0 = time.monotonic()
            out = await batchgate.process_batches(
                ["always [[status=500]]"], lambda p: p, parse=json.loads, dispatcher=d,
                max_retries=3)
            return out, time.monotonic() - t0

    out, dt = run(main())
    assert out.failed == [0] and out[0].attempts == 4
    assert sent.stats()["requests"] == 4  # 1 + MAX_RETRIES, not (1 + 3) x (1 + 3)
    assert dt < 3


def test_item6_bad_answers_retried_then_marked_failed(sent):
    data = restaurants(3, 50, seed=5)
    flaky = data[0]["reviews"][3]
    flaky["content"] += " [[answer=garbage,times=1]]"  # unusable once: resent, then counted
    broken = data[1]["reviews"][5]
    broken["content"] += " [[answer=garbage]]"  # never a usable answer

    async def main():
        async with batchgate.Dispatcher(sent.base_url, backoff=0.01) as d:
            return await batchgate.analyze_restaurants(data, dispatcher=d,
                                                       max_tokens_per_batch=1000)

    res = {r["restaurant_id"]: r for r in run(main())}
    exp = expected(data)
    assert (res[100]["positive_count"], res[100]["negative_count"]) == exp[100]
    assert res[100]["complete"]
    assert sent.stats()["counts"] and max(sent.stats()["counts"].values()) == 4
    r = res[101]
    assert r["failed_batches"] == 1 and not r["complete"] and r["unscored_reviews"] > 0
    assert r["total"] + r["unscored_reviews"] == r["reviews"]

    # process_batches: a parse that keeps failing is retried, then marked failed.
    calls = []

    def parse(text):
        calls.append(text)
        if "BAD" in text:
            raise ValueError("unusable")
        return {"n": len(text)}

    async def pb():
        async with batchgate.Dispatcher(sent.base_url) as d:
            return await batchgate.process_batches(["ok1", "BAD", "ok2"], lambda p: p,
                                                   parse=parse, dispatcher=d, max_retries=2)

    out = run(pb())
    assert out.failed == [1] and isinstance(out[1], batchgate.BatchFailed)
    assert out[1].attempts == 3 and isinstance(out[1].cause, ValueError)
    assert out[0] == {"n": len("echo:ok1")} and out[2] == {"n": len("echo:ok2")}
    assert sum("BAD" in c for c in calls) == 3


# ---- item 7: `batchgate run` on users' files -------------------------------------------

from test_run import _env, bg, read_jsonl  # noqa: E402


def _reviews_of(seed=2, n=3, per=30):
    return restaurants(n, per, seed=seed)


def _check(out, data):
    res = {r["restaurant_id"]: r for r in read_jsonl(out)}
    exp = expected(data)
    assert set(res) == set(exp)
    for rid, (pos, neg) in exp.items():
        assert (res[rid]["positive_count"], res[rid]["negative_count"]) == (pos, neg)
    return res


def test_item7_original_shapes_detected_and_ids_kept(tmp_path):
    data = _reviews_of()
    data[0]["restaurant_id"] = 16
    data[1]["restaurant_id"] = "16"  # a different restaurant: types are kept apart
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps({"restaurant_id": r["restaurant_id"], **rv},
                                       ensure_ascii=False) + "\n"
                            for r in data for rv in r["reviews"]), encoding="utf-8")
    nested_array = tmp_path / "nested.json"
    nested_array.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    nested_lines = tmp_path / "nested.jsonl"
    nested_lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data),
                            encoding="utf-8")
    for path, fmt in ((flat, "jsonl"), (nested_array, "json array, nested reviews"),
                      (nested_lines, "jsonl, nested reviews")):
        out = str(tmp_path / f"{path.name}.out")
        p = bg("run", str(path), "--out", out)
        assert p.returncode == 0, p.stderr
        assert "review text from field 'content' (detected" in p.stderr, p.stderr
        assert f"({fmt})" in p.stderr
        res = _check(out, data)
        assert res[16]["restaurant_id"] == 16 and res["16"]["restaurant_id"] == "16"
        # simulated answers are marked as such, in the results and the summary
        assert all(r["simulated"] is True for r in res.values())
        assert "SIMULATED" in p.stdout
        # the token cap is on by default (the embedded server publishes its KV cache)
        assert "token cap:" in p.stderr and "estimated tokens reserved" in p.stdout


def test_item7_missing_field_says_what_was_found(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"restaurant_id": 1, "stars": 5, "note": "좋아요"}\n', encoding="utf-8")
    p = bg("run", str(path), "--out", str(tmp_path / "o.jsonl"))
    assert p.returncode == 2
    assert "no review text field found" in p.stderr and "'note', 'restaurant_id', 'stars'" \
        in p.stderr and "--text-field" in p.stderr
    assert p.stderr.count("\n") < 5  # one message, not one per line
    p = bg("run", str(path), "--out", str(tmp_path / "o.jsonl"), "--text-field", "body")
    assert p.returncode == 2
    assert "field 'body' is missing (fields: ['note', 'restaurant_id', 'stars']" in p.stderr
    p = bg("run", str(path), "--out", str(tmp_path / "o.jsonl"), "--text-field", "note")
    assert p.returncode == 0, p.stderr


def test_item7_bad_bytes_bom_csv_and_cp949(tmp_path):
    good = ['{"restaurant_id": "a", "content": "맛있어요 최고"}',
            '{"restaurant_id": "a", "content": "별로예요"}']
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good[0].encode() + b"\n" + b'{"restaurant_id": "a", "content": "\xff\xfe"}\n'
                     + good[1].encode() + b"\n")
    out = str(tmp_path / "o.jsonl")
    p = bg("run", str(path), "--out", out)
    assert p.returncode == 0, p.stderr
    assert "mixed.jsonl:2: not valid utf-8 (byte 0xff at column" in p.stderr
    assert "--encoding" in p.stderr
    assert read_jsonl(out)[0]["reviews"] == 2
    # a CSV saved by Excel with a UTF-8 BOM
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes("\ufeffrestaurant_id,content\n1,맛있어요\n1,별로예요\n".encode("utf-8"))
    p = bg("run", str(csv_path), "--out", out, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert "field 'content'" in p.stderr
    r = read_jsonl(out)[0]
    assert r["restaurant_id"] == "1" and r["reviews"] == 2 and r["total"] == 2
    # a cp949 export
    cp = tmp_path / "cp949.csv"
    cp.write_bytes("restaurant_id,review\nx,맛있어요 친절해요\nx,최악이에요\n".encode("cp949"))
    p = bg("run", str(cp), "--out", out, "--overwrite")
    assert p.returncode == 2 and "not valid utf-8" in p.stderr
    p = bg("run", str(cp), "--out", out, "--encoding", "cp949", "--overwrite")
    assert p.returncode == 0, p.stderr
    assert read_jsonl(out)[0]["positive_count"] == 1


def test_item7_help_shows_defaults():
    p = bg("run", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for want in ("(default: 4000, from VLLM_MAX_TOKENS_PER_BATCH)",
                 "(default: 20, from VLLM_MAX_CONCURRENT_BATCHES)",
                 "(default: 3, from MAX_RETRIES)", "(default: utf-8)", "(default: 64)",
                 "(default: 600.0)"):
        assert want in text, want


def test_item7_progress_lines_without_a_terminal(tmp_path):
    data = _reviews_of(n=4, per=60)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    env = dict(_env(), BATCHGATE_PROGRESS_INTERVAL="0.01")
    p = subprocess.run([sys.executable, "-m", "batchgate", "run", str(path), "--out",
                        str(tmp_path / "o.jsonl"), "--max-tokens-per-batch", "800",
                        "--max-concurrent", "2"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("batchgate: progress ")]
    assert lines and "batches" in lines[-1] and "\r" not in p.stderr


from test_run import _start, _wait_for_lines, corpus, slow_server  # noqa: E402,F401


def test_item7_after_ctrl_c_unsent_batches_are_not_sent_not_failed(corpus, tmp_path,  # noqa: F811
                                                                   slow_server):  # noqa: F811
    import signal
    out = str(tmp_path / "r.jsonl")
    proc = _start(corpus, out, slow_server)
    _wait_for_lines(out + ".batches.jsonl", 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "0 failed" in stderr and " not sent" in stderr
    line = next(ln for ln in stdout.splitlines() if ln.startswith("stopped:"))
    not_sent = int(line.split(" not sent")[0].rsplit(" ", 1)[1])
    assert not_sent > 0 and "neither counts as failed" in line
    assert " ok, 0 failed, " in stdout  # this run's batches: none failed


def test_item3_run_priority_queue(sent, tmp_path):
    data = _reviews_of(n=3, per=60)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    env = dict(_env(), VLLM_USE_PRIORITY_QUEUE="1")  # the env var sets --priority-queue
    out = str(tmp_path / "o.jsonl")
    p = subprocess.run([sys.executable, "-m", "batchgate", "run", str(path), "--out", out,
                        "--base-url", sent.base_url, "--max-concurrent", "1",
                        "--max-tokens-per-batch", "900"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "priority queue" in p.stdout
    pr = [b["priority"] for b in sent.bodies if "priority" in b]
    assert len(pr) > 3 and pr == sorted(pr) and len(set(pr)) > 1
    _check(out, data)
