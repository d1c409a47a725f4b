"""End-to-end tests of ``batchgate run`` and ``batchgate demo`` (real processes,
the embedded simulated vLLM server on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

import batchgate
from batchgate.corpus import write_corpus
from batchgate.run import (SENTIMENT_PROMPT, AnswerError, BatchLog, build_batches,
                              parse_answer, read_groups)
from batchgate.simserver import SimServerThread
from batchgate.simserver.answers import classify

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(batchgate.__file__)))


def bg(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchgate", *args], env=_env(),
                          capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PKG_PARENT, env.get("PYTHONPATH")]))
    for k in ("VLLM_BASE_URL", "VLLM_MODEL", "VLLM_API_KEY"):
        env.pop(k, None)
    return env


def expected_counts(path: str) -> dict:
    """What the simulated server's deterministic rules give per restaurant."""
    groups, _ = read_groups(path, "text", "restaurant_id")
    out = {}
    for rid, items in groups.items():
        pos = sum(classify(" ".join(t.split())) for t, _ in items)
        out[rid] = (pos, len(items) - pos)
    return out


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture()
def corpus(tmp_path):
    path = str(tmp_path / "reviews.jsonl")
    write_corpus(path, n_restaurants=6, reviews_per_restaurant=120, seed=7)
    return path


def check_results(out: str, path: str) -> None:
    results = {r["restaurant_id"]: r for r in read_jsonl(out)}
    exp = expected_counts(path)
    assert set(results) == set(exp)
    for rid, (pos, neg) in exp.items():
        r = results[rid]
        assert (r["positive_count"], r["negative_count"]) == (pos, neg), rid
        assert r["failed_batches"] == 0 and r["complete"] is True
        # The original's shape: int percent of total = positive + negative.
        assert r["total"] == pos + neg
        assert r["positive_ratio"] == round(100 * pos / (pos + neg))
        assert r["negative_ratio"] == round(100 * neg / (pos + neg))


# ---- answers ------------------------------------------------------------------------

@pytest.mark.parametrize("text,n,want", [
    ('{"positive_count": 3, "negative_count": 2}', 5, (3, 2)),
    ('```json\n{"positive_count": 0, "negative_count": 4}\n```', 4, (0, 4)),
    ('Answer: {"negative_count": 1, "positive_count": 1} done', 2, (1, 1)),
])
def test_parse_answer_accepts(text, n, want):
    assert parse_answer(text, n) == want


@pytest.mark.parametrize("text,n,why", [
    ('{"positive_count": 3, "negative_count": 3}', 5, "batch has 5"),
    ('{"positive_count": true, "negative_count": 4}', 5, "positive_count"),
    ('{"positive_count": 2.0, "negative_count": 3}', 5, "positive_count"),
    ('{"positive_count": -1, "negative_count": 6}', 5, "positive_count"),
    ('{"positive_count": 5}', 5, "negative_count"),
    ("positive 3, negative 2", 5, "no JSON"),
    ('{"positive_count": 3, ', 5, "not valid JSON"),
    ('[1, 2]', 3, "no JSON object"),
])
def test_parse_answer_rejects(text, n, why):
    with pytest.raises(AnswerError, match=why):
        parse_answer(text, n)


def test_prompt_reviews_are_what_the_server_counts(corpus):
    from batchgate.run import render_prompt
    from batchgate.simserver.answers import review_lines
    groups, _ = read_groups(corpus, "text", "restaurant_id")
    for b in build_batches(groups, SENTIMENT_PROMPT).batches:
        prompt = render_prompt(SENTIMENT_PROMPT, b.texts)
        assert review_lines(prompt) == [" ".join(t.split()) for t in b.texts]


# ---- run ------------------------------------------------------------------------------

def test_run_embedded_end_to_end(corpus, tmp_path):
    out = str(tmp_path / "results.jsonl")
    p = bg("run", corpus, "--out", out, "--max-tokens-per-batch", "1500")
    assert p.returncode == 0, p.stderr
    assert "started the embedded simulated vLLM server" in p.stderr
    assert "Traceback" not in p.stderr
    check_results(out, corpus)
    log = read_jsonl(out + ".batches.jsonl")
    groups, _ = read_groups(corpus, "text", "restaurant_id")
    plan = build_batches(groups, SENTIMENT_PROMPT, max_tokens_per_batch=1500)
    assert len(plan.batches) > len(groups)  # several batches per restaurant
    assert sorted(r["key"] for r in log) == sorted(b.key for b in plan.batches)
    assert all(r["status"] == "ok" for r in log)
    for word in ("batches:", "tokens:", "wall time:", "req/s", "peak"):
        assert word in p.stdout
    # A finished run resumed sends nothing; without --resume the log is protected.
    p2 = bg("run", corpus, "--out", out, "--max-tokens-per-batch", "1500", "--resume")
    assert p2.returncode == 0, p2.stderr
    assert "0 sent this run" in p2.stdout
    assert len(read_jsonl(out + ".batches.jsonl")) == len(log)
    p3 = bg("run", corpus, "--out", out)
    assert p3.returncode == 2 and "--resume" in p3.stderr


def test_run_token_cap_and_csv(tmp_path):
    rows = [("a", "맛있어요 최고"), ("a", "별로예요"), ("b", "친절하고 좋아요"), ("b", 'with "quotes", commas')]
    path = tmp_path / "reviews.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        import csv
        w = csv.writer(f)
        w.writerow(["shop", "body"])
        w.writerows(rows)
    out = str(tmp_path / "r.jsonl")
    p = bg("run", str(path), "--out", out, "--text-field", "body", "--group-field", "shop",
           "--max-inflight-tokens", "3000", "--max-concurrent", "1")
    assert p.returncode == 0, p.stderr
    res = {r["restaurant_id"]: r for r in read_jsonl(out)}
    assert res["a"]["positive_count"] + res["a"]["negative_count"] == 2
    assert res["b"]["positive_count"] + res["b"]["negative_count"] == 2
    assert "peak 1 requests" in p.stdout


def test_malformed_lines_reported_and_rest_processed(tmp_path):
    good = [{"restaurant_id": "r1", "text": "맛있어요"}, {"restaurant_id": "r1", "text": "별로"},
            {"restaurant_id": "r2", "text": "친절해요 good"}]
    lines = [json.dumps(good[0], ensure_ascii=False), "{not json",
             json.dumps(good[1], ensure_ascii=False), json.dumps({"restaurant_id": "r2"}),
             "", json.dumps(good[2], ensure_ascii=False)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = str(tmp_path / "r.jsonl")
    p = bg("run", str(path), "--out", out)
    assert p.returncode == 0, p.stderr
    assert f"{path}:2:" in p.stderr and "not valid JSON" in p.stderr
    assert f"{path}:4:" in p.stderr and "'text'" in p.stderr
    res = {r["restaurant_id"]: r for r in read_jsonl(out)}
    assert res["r1"]["reviews"] == 2 and res["r2"]["reviews"] == 1
    assert res["r1"]["positive_count"] + res["r1"]["negative_count"] == 2
    p2 = bg("run", str(path), "--out", out, "--overwrite", "--strict")
    assert p2.returncode == 1


def test_unusable_answers_are_failed_batches_not_zero(corpus, tmp_path):
    tpl = tmp_path / "prompt.txt"
    tpl.write_text("Summarise these reviews:\n{reviews}\n", encoding="utf-8")
    out = str(tmp_path / "r.jsonl")
    p = bg("run", corpus, "--out", out, "--prompt-template", str(tpl), "--max-retries", "2")
    assert p.returncode == 1
    assert "failed batch" in p.stderr and "unusable answer" in p.stderr
    for r in read_jsonl(out):
        assert r["failed_batches"] == r["batches"] > 0
        assert r["positive_ratio"] is None and r["complete"] is False
        assert r["unscored_reviews"] == r["reviews"]
    log = read_jsonl(out + ".batches.jsonl")
    assert all(rec["status"] == "failed" and rec["attempts"] == 3 for rec in log)


def test_custom_template_with_count_placeholder(corpus, tmp_path):
    tpl = tmp_path / "prompt.txt"
    tpl.write_text("Classify the {count} reviews below. Reply with JSON "
                   '{"positive_count": N, "negative_count": M}.\n{reviews}\n', encoding="utf-8")
    out = str(tmp_path / "r.jsonl")
    p = bg("run", corpus, "--out", out, "--prompt-template", str(tpl))
    assert p.returncode == 0, p.stderr
    check_results(out, corpus)
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder here", encoding="utf-8")
    p2 = bg("run", corpus, "--out", out, "--prompt-template", str(bad), "--overwrite")
    assert p2.returncode == 2 and "{reviews}" in p2.stderr and "Traceback" not in p2.stderr


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server_clear_error(corpus, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    p = bg("run", corpus, "--out", str(tmp_path / "r.jsonl"), "--base-url", url)
    assert p.returncode == 3
    assert "cannot reach the server" in p.stderr and url in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r.jsonl").exists()


# ---- interruption and resume ------------------------------------------------------------

@pytest.fixture()
def slow_server():
    # Slow steps and 2 requests at a time: the run takes a few seconds.
    with SimServerThread(step_base_s=0.02, step_per_token_s=2e-6) as srv:
        yield srv.base_url + "/v1"


def _wait_for_lines(path: str, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read().count(b"\n") >= n:
                    return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines")


def _start(corpus: str, out: str, url: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchgate", "run", corpus, "--out", out,
                             "--base-url", url, "--max-concurrent", "2",
                             "--max-tokens-per-batch", "1200"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _planned_keys(corpus: str) -> list:
    groups, _ = read_groups(corpus, "text", "restaurant_id")
    return sorted(b.key for b in build_batches(groups, SENTIMENT_PROMPT,
                                               max_tokens_per_batch=1200).batches)


def test_resume_after_sigkill(corpus, tmp_path, slow_server):
    out = str(tmp_path / "r.jsonl")
    log = out + ".batches.jsonl"
    proc = _start(corpus, out, slow_server)
    _wait_for_lines(log, 5, proc)
    proc.kill()
    proc.communicate(timeout=30)
    before = read_jsonl(log)
    planned = _planned_keys(corpus)
    assert 5 <= len(before) < len(planned)
    assert not os.path.exists(out)
    # Simulate a write torn by the kill: resume must drop it, not choke or count it.
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"key": "r001#99#torn", "status": "o')
    p = bg("run", corpus, "--out", out, "--base-url", slow_server, "--max-concurrent", "8",
           "--max-tokens-per-batch", "1200", "--resume")
    assert p.returncode == 0, p.stderr
    assert f"{len(before)} of {len(planned)} batches already done" in p.stderr
    after = read_jsonl(log)
    keys = Counter(r["key"] for r in after)
    assert sorted(keys) == planned and set(keys.values()) == {1}   # each batch exactly once
    assert after[:len(before)] == before                            # earlier records kept
    check_results(out, corpus)


def test_sigint_stops_cleanly_then_resume(corpus, tmp_path, slow_server):
    out = str(tmp_path / "r.jsonl")
    log = out + ".batches.jsonl"
    proc = _start(corpus, out, slow_server)
    _wait_for_lines(log, 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    done = read_jsonl(log)
    assert all(r["status"] == "ok" for r in done)
    assert not os.path.exists(out)
    p = bg("run", corpus, "--out", out, "--base-url", slow_server, "--max-concurrent", "8",
           "--max-tokens-per-batch", "1200", "--resume")
    assert p.returncode == 0, p.stderr
    keys = Counter(r["key"] for r in read_jsonl(log))
    assert sorted(keys) == _planned_keys(corpus) and set(keys.values()) == {1}
    check_results(out, corpus)


def test_batch_log_resume_drops_torn_tail(tmp_path):
    path = str(tmp_path / "log.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"key": "a", "status": "ok"}) + "\n")
        f.write(json.dumps({"key": "b", "status": "failed"}) + "\n")
        f.write('{"key": "c", "sta')
    log = BatchLog(path, resume=True)
    assert log.done("a") and not log.done("b") and not log.done("c")
    log.append({"key": "b", "status": "ok"})
    log.close()
    assert [r["key"] for r in read_jsonl(path)] == ["a", "b", "b"]
    again = BatchLog(path, resume=True)
    assert again.done("b")
    again.close()


# ---- demo -------------------------------------------------------------------------------

def test_demo_small_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    p = bg("demo", "--small", "--mode", "both", "--out-dir", str(tmp_path), timeout=240)
    assert p.returncode == 0, p.stderr
    for name in ("dynamic size, no cap", "semaphore 20, fixed 50",
                 "dynamic size + semaphore 20", "batchgate token cap"):
        assert p.stdout.count(name) == 2
    png = tmp_path / "batchgate_demo_kv.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = json.loads((tmp_path / "batchgate_demo.json").read_text(encoding="utf-8"))
    # Scenario 5 (max_inflight_tokens="auto") runs only where the build has it.
    if "auto: not available in this build" in p.stdout:
        assert "batchgate auto" not in p.stdout and len(rows) == 8
    else:
        assert p.stdout.count("batchgate auto") == 2 and len(rows) == 10
    assert {r["mode"] for r in rows} == {"preempt", "naive"}
    for r in rows:
        assert 0 < r["peak_kv_usage"] <= 1
        assert 0 <= r["failed_batches"] <= r["batches"]
        assert r["requests"] >= r["batches"] and r["wall_s"] > 0
        assert len(r["timeline"]["t"]) == len(r["timeline"]["kv"]) > 1
        if r["mode"] == "preempt":
            assert r["oom_errors"] == 0
        else:
            assert r["preemptions"] == 0
    capped = [r for r in rows if r["max_inflight_tokens"]]
    assert capped and all(r["peak_kv_usage"] < 1 and r["failed_batches"] == 0 for r in capped)
    assert all(r["peak_in_flight_tokens"] <= r["max_inflight_tokens"] for r in capped)


def test_prompt_over_max_model_len_is_a_reported_failure(tmp_path):
    long_review = "김치찌개가 진하고 칼칼해서 밥 한 공기 뚝딱했어요. " * 300
    recs = [{"restaurant_id": "r1", "text": "맛있어요 최고"},
            {"restaurant_id": "r1", "text": long_review},
            {"restaurant_id": "r1", "text": "별로예요"}]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                    encoding="utf-8")
    out = str(tmp_path / "r.jsonl")
    p = bg("run", str(path), "--out", out, "--max-tokens-per-batch", "1000",
           "--sim-max-model-len", "2048", "--sim-kv-cache-tokens", "8192")
    assert p.returncode == 1
    assert "line 2 (r1) alone exceeds the batch budget" in p.stderr
    assert "maximum context length is 2048 tokens" in p.stderr
    assert "exceeds the server's max_model_len (2048)" in p.stderr   # warned up front
    (r,) = read_jsonl(out)
    assert r["failed_batches"] == 1 and r["unscored_reviews"] == 1 and r["complete"] is False
    assert r["positive_count"] + r["negative_count"] == 2
    log = read_jsonl(out + ".batches.jsonl")
    failed = [x for x in log if x["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 1   # a 400 is not retried


def test_chat_endpoint(corpus, tmp_path):
    out = str(tmp_path / "r.jsonl")
    p = bg("run", corpus, "--out", out, "--chat")
    assert p.returncode == 0, p.stderr
    check_results(out, corpus)


def test_resume_with_another_plan_ignores_stale_records(corpus, tmp_path):
    out = str(tmp_path / "r.jsonl")
    assert bg("run", corpus, "--out", out, "--max-tokens-per-batch", "3000").returncode == 0
    n_before = len(read_jsonl(out + ".batches.jsonl"))
    p = bg("run", corpus, "--out", out, "--max-tokens-per-batch", "1200", "--resume")
    assert p.returncode == 0, p.stderr
    assert "match no batch of this input/plan (ignored)" in p.stderr
    log = read_jsonl(out + ".batches.jsonl")
    planned = _planned_keys(corpus)
    assert sorted(r["key"] for r in log[n_before:]) == planned
    check_results(out, corpus)


def test_config_from_environment(corpus, tmp_path):
    out = str(tmp_path / "r.jsonl")
    env = _env()
    env.update(VLLM_MAX_CONCURRENT_BATCHES="3", VLLM_MAX_TOKENS_PER_BATCH="1500")
    p = subprocess.run([sys.executable, "-m", "batchgate", "run", corpus, "--out", out],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "peak 3 requests" in p.stdout
    groups, _ = read_groups(corpus, "text", "restaurant_id")
    n = len(build_batches(groups, SENTIMENT_PROMPT, max_tokens_per_batch=1500).batches)
    assert f"batches:    {n} planned" in p.stdout
    env["VLLM_BASE_URL"] = f"http://127.0.0.1:{_closed_port()}/v1"
    p2 = subprocess.run([sys.executable, "-m", "batchgate", "run", corpus, "--out", out,
                         "--overwrite"], env=env, capture_output=True, text=True, timeout=60)
    assert p2.returncode == 3 and env["VLLM_BASE_URL"] in p2.stderr


def test_token_cap_auto_from_server_metrics(corpus, tmp_path):
    from batchgate.run import server_kv_tokens
    out = str(tmp_path / "r.jsonl")
    p = bg("run", corpus, "--out", out, "--max-inflight-tokens", "auto",
           "--sim-kv-cache-tokens", "40000", "--max-tokens-per-batch", "3000")
    assert p.returncode == 0, p.stderr
    assert "token cap: 38000 tokens in flight (95% of the server's KV cache of 40000" in p.stderr
    peak = int(p.stdout.split("; peak ")[1].split(" of 38000")[0])
    assert 0 < peak <= 38000
    check_results(out, corpus)
    assert server_kv_tokens(f"http://127.0.0.1:{_closed_port()}/v1", None, timeout=2) is None


def test_extra_body_reaches_the_server(corpus, tmp_path):
    out = str(tmp_path / "r.jsonl")
    # The simulated server checks "model" like vLLM: a wrong one is a 404 for every batch.
    p = bg("run", corpus, "--out", out, "--extra-body", '{"model": "no-such-model"}',
           "--max-retries", "0")
    assert p.returncode == 1
    assert "The model `no-such-model` does not exist" in p.stderr
    p2 = bg("run", corpus, "--out", out, "--extra-body", "[1]")
    assert p2.returncode == 2 and "must be a JSON object" in p2.stderr
