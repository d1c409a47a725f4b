"""OpenAI batch files (``batchgate batch`` / ``run_batch_file``) against a loopback server."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import pytest

import batchgate
from batchgate.batchfile import BatchFileError
from fake_vllm import FakeVLLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ["model-a", "model-b", "model-c"]


def good_line(i: int, chat: bool, prompt: Optional[str] = None) -> Dict[str, Any]:
    text = prompt if prompt is not None else f"item {i}"
    body: Dict[str, Any] = {"model": MODELS[i % len(MODELS)], "max_tokens": 4 + i % 5}
    if chat:
        body["messages"] = [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return {"custom_id": f"req-{i}", "method": "POST",
            "url": "/v1/chat/completions" if chat else "/v1/completions", "body": body}


# (raw line, expected error code); custom_ids here never collide with req-N except
# the duplicate, which repeats req-3 on purpose.
BAD_LINES: List[Tuple[str, str]] = [
    (json.dumps({"custom_id": "req-3", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": "again"}}), "duplicate_custom_id"),
    (json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings",
                 "body": {"input": "x"}}), "invalid_url"),
    (json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"messages": "hello"}}), "invalid_body"),
    ('{"custom_id": "broken", "method": "POST", "url": ', "invalid_json"),
    (json.dumps({"custom_id": "bad-method", "method": "GET", "url": "/v1/completions",
                 "body": {"prompt": "x"}}), "invalid_method"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
     "invalid_custom_id"),
    (json.dumps({"custom_id": "bad-param", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": "x", "max_tokens": "many"}}), "invalid_body"),
]


def write_batch(path: str, n: int, bad_every: int = 0) -> Tuple[Dict[str, Dict[str, Any]],
                                                               Dict[int, str]]:
    """n good lines (alternating endpoints) with BAD_LINES spread among them.
    Returns (good requests by custom_id, expected error code by 1-based line)."""
    good: Dict[str, Dict[str, Any]] = {}
    bad: Dict[int, str] = {}
    lines: List[str] = []
    step = bad_every or max(1, n // (len(BAD_LINES) + 1))
    pending = list(BAD_LINES)
    for i in range(n):
        req = good_line(i, chat=i % 2 == 1)
        good[req["custom_id"]] = req
        lines.append(json.dumps(req, ensure_ascii=False))
        if pending and i % step == step - 1 and i > 3:
            raw, code = pending.pop(0)
            lines.append(raw)
            bad[len(lines)] = code
    for raw, code in pending:
        lines.append(raw)
        bad[len(lines)] = code
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n")  # a trailing blank line is ignored
    return good, bad


def read_output(path: str) -> List[Dict[str, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n"), "output must end with a whole line"
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def expected_body(req: Dict[str, Any]) -> Dict[str, Any]:
    body = req["body"]
    chat = req["url"].endswith("/chat/completions")
    prompts = [body["messages"][-1]["content"]] if chat else [body["prompt"]]
    return FakeVLLM._ok_body(chat, {"model": body["model"]}, prompts, 1)


def check_complete(out: List[Dict[str, Any]], good: Dict[str, Dict[str, Any]],
                   bad: Dict[int, str]) -> None:
    answered = Counter(r["custom_id"] for r in out if r["response"] is not None)
    errors = [r for r in out if r["response"] is None]
    assert set(answered) == set(good)
    assert max(answered.values()) == 1, [k for k, v in answered.items() if v > 1][:5]
    for r in out:
        assert r["id"].startswith("batch_req_")
        if r["response"] is None:
            continue
        resp = r["response"]
        assert resp["status_code"] == 200
        assert r["error"] is None
        # The server's own JSON, answered with the line's model.
        assert resp["body"] == expected_body(good[r["custom_id"]])
        assert resp["request_id"] == "cmpl-fake"
    by_line = {e["error"]["line"]: e for e in errors}
    assert len(by_line) == len(errors) == len(bad), (sorted(by_line), sorted(bad))
    for lineno, code in bad.items():
        e = by_line[lineno]
        assert e["error"]["code"] == code, e
        assert e["error"]["message"].startswith(f"line {lineno}: ")


@pytest.fixture
def server():
    with FakeVLLM(latency=0.01) as srv:
        yield srv


def cli(*args: str, **kw: Any) -> "subprocess.Popen[str]":
    env = dict(os.environ)
    for k in ("VLLM_BASE_URL", "OPENAI_BASE_URL", "VLLM_API_KEY", "OPENAI_API_KEY"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "batchgate", "batch", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **kw)


def slurp(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_1000_lines_killed_and_resumed(server, tmp_path):
    inp, outp = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    good, bad = write_batch(inp, 1000)
    assert len(good) == 1000 and len(bad) == len(BAD_LINES)

    p = cli(inp, "-o", outp, "--base-url", server.base_url, "--max-concurrent", "8")
    deadline = time.monotonic() + 60
    while count_lines(outp) < 300 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.kill()
    p.communicate()
    first = read_output(outp)
    assert 300 <= len(first) < 1000 + len(bad), "the kill must land mid-run"
    # A crash in the middle of a write: a partial last line.
    with open(outp, "ab") as f:
        f.write(b'{"id":"batch_req_x","custom_id":"req-999","response":{"status_co')
    missing = set(good) - {r["custom_id"] for r in first if r["response"] is not None}
    server.reset()

    p = cli(inp, "-o", outp, "--base-url", server.base_url, "--max-concurrent", "8")
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1, stderr  # 1: some lines have error lines
    assert "cut a partial last line" in stderr
    assert "lines done" in stderr  # progress
    out = read_output(outp)
    check_complete(out, good, bad)
    st = server.stats()
    assert st["requests"] == len(missing)  # only what the first run did not write
    assert st["max_in_flight"] <= 8
    assert out[:len(first)] == first  # appended, never rewritten

    # A third run has nothing left to do.
    server.reset()
    p = cli(inp, "-o", outp, "--base-url", server.base_url, "-q")
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1 and stderr == ""
    assert server.stats()["requests"] == 0
    assert read_output(outp) == out
    assert f"{1000 + len(bad)} already in" in stdout


def start_server_process(latency: float) -> Tuple["subprocess.Popen[str]", str]:
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_vllm.py"), "--port", "0",
                          "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("PORT "), line
    return p, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def test_server_dies_then_resume_elsewhere(tmp_path):
    inp, outp = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    good, bad = write_batch(inp, 400)
    srv, url = start_server_process(latency=0.02)
    try:
        p = cli(inp, "-o", outp, "--base-url", url, "--max-concurrent", "4",
                "--max-retries", "1")
        deadline = time.monotonic() + 60
        while count_lines(outp) < 80 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.send_signal(signal.SIGKILL)
        srv.wait()
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        assert srv.stdout is not None
        srv.stdout.close()
    assert p.returncode == 3, (stdout, stderr)
    assert "got no answer" in stderr and "run the same command again" in stderr
    partial = read_output(outp)
    assert len({r["custom_id"] for r in partial if r["response"]}) < len(good)
    with FakeVLLM() as other:
        p = cli(inp, "-o", outp, "--base-url", other.base_url, "-q")
        stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1, stderr
    check_complete(read_output(outp), good, bad)


def test_server_errors_become_response_lines(tmp_path):
    inp, outp = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    reqs = [
        good_line(0, False, "fine"),
        good_line(1, True, "too long [[status=400,msg=maximum context length exceeded]]"),
        good_line(2, False, "flaky [[status=503,times=1]]"),
        good_line(3, False, "broken [[status=500]]"),
        good_line(4, True, "garbled [[fault=nonjson]]"),
    ]
    with open(inp, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    with FakeVLLM() as srv:
        s = batchgate.run_batch_file_sync(inp, outp, base_url=srv.base_url, max_retries=2,
                                          max_concurrent=2)
        attempts = srv.stats()["counts"]
    assert (s.lines, s.succeeded, s.server_errors, s.invalid, s.no_answer) == (5, 2, 3, 0, 0)
    assert s.complete and s.status_counts == {200: 2, 400: 1, 500: 1}
    out = {r["custom_id"]: r for r in read_output(outp)}
    assert out["req-0"]["response"]["body"] == expected_body(reqs[0])
    assert out["req-2"]["response"]["body"] == expected_body(reqs[2])  # retried, then 200
    r1 = out["req-1"]["response"]
    assert r1["status_code"] == 400 and out["req-1"]["error"] is None
    assert r1["body"]["error"]["message"] == "maximum context length exceeded"
    r3 = out["req-3"]["response"]
    assert r3["status_code"] == 500 and "fake error 500" in r3["body"]["error"]["message"]
    assert max(attempts.values()) == 3  # the 500 was retried twice
    assert out["req-4"]["response"] is None
    assert out["req-4"]["error"]["code"] == "malformed_response"


def test_line_model_wins_over_default(tmp_path):
    inp, outp = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    with_model = good_line(0, False)
    without = good_line(1, True)
    del without["body"]["model"]
    with open(inp, "w") as f:
        f.write(json.dumps(with_model) + "\n" + json.dumps(without) + "\n")
    with FakeVLLM() as srv:
        s = batchgate.run_batch_file_sync(inp, outp, base_url=srv.base_url, model="default-m")
    assert s.succeeded == 2
    out = {r["custom_id"]: r["response"]["body"]["model"] for r in read_output(outp)}
    assert out == {"req-0": MODELS[0], "req-1": "default-m"}


def test_repair_and_refusals(server, tmp_path):
    inp, outp = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    good, bad = write_batch(inp, 20, bad_every=3)
    # A different batch's output: refused, and left alone.
    with open(outp, "w") as f:
        f.write(json.dumps({"id": "batch_req_1", "custom_id": "someone-else",
                            "response": {"status_code": 200, "request_id": "x", "body": {}},
                            "error": None}) + "\n")
    before = slurp(outp)
    with pytest.raises(BatchFileError, match="not requests in"):
        batchgate.run_batch_file_sync(inp, outp, base_url=server.base_url)
    assert slurp(outp) == before
    p = cli(inp, "-o", outp, "--base-url", server.base_url, "-q")
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2 and "--overwrite" in stderr
    # A corrupt line in the middle is not a crash artefact: refused.
    with open(outp, "wb") as f:
        f.write(b"garbage\n" + before)
    with pytest.raises(BatchFileError, match="line 1 is not a batch output line"):
        batchgate.run_batch_file_sync(inp, outp, base_url=server.base_url)
    # overwrite starts over.
    s = batchgate.run_batch_file_sync(inp, outp, base_url=server.base_url, overwrite=True)
    assert s.complete and s.already_done == 0
    check_complete(read_output(outp), good, bad)
    # Only a partial last line: cut, and its request sent again.
    data = slurp(outp).splitlines(keepends=True)
    last = json.loads(data[-1])
    with open(outp, "wb") as f:
        f.writelines(data[:-1])
        f.write(data[-1][:20])
    server.reset()
    s = batchgate.run_batch_file_sync(inp, outp, base_url=server.base_url)
    assert s.repaired_bytes == 20 and s.written == 1
    assert server.stats()["requests"] == (1 if last["response"] else 0)
    check_complete(read_output(outp), good, bad)
    with pytest.raises(BatchFileError, match="must not be the input"):
        batchgate.run_batch_file_sync(inp, inp, base_url=server.base_url)


def test_async_api_shared_dispatcher_progress_and_stop(server, tmp_path):
    inp, outp = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    good, bad = write_batch(inp, 200)
    seen: List[int] = []

    async def main() -> Tuple[batchgate.BatchSummary, batchgate.BatchSummary]:
        stop = asyncio.Event()

        def progress(s: batchgate.BatchSummary) -> None:
            seen.append(s.written)
            if s.succeeded >= 50:
                stop.set()

        async with batchgate.Dispatcher(server.base_url, max_concurrent=4) as d:
            first = await batchgate.run_batch_file(inp, outp, dispatcher=d, progress=progress,
                                                   stop=stop)
            assert not d._closed  # a dispatcher passed in stays open
            second = await batchgate.run_batch_file(inp, outp, dispatcher=d)
        return first, second

    first, second = asyncio.run(main())
    assert first.interrupted and not first.complete and first.not_sent > 0
    assert seen and seen == sorted(seen)
    assert second.complete and second.already_done == first.written
    check_complete(read_output(outp), good, bad)


def test_ctrl_c_stops_cleanly_then_resume(tmp_path):
    inp, outp = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    good, bad = write_batch(inp, 300)
    with FakeVLLM(latency=0.02) as srv:
        p = cli(inp, "-o", outp, "--base-url", srv.base_url, "--max-concurrent", "4")
        deadline = time.monotonic() + 60
        while count_lines(outp) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 130, stderr
        assert "run the same command to continue" in stderr
        first = read_output(outp)  # whole lines only: nothing was cut mid-write
        assert 40 <= len(first) < len(good) + len(bad)
        p = cli(inp, "-o", outp, "--base-url", srv.base_url, "-q")
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 1, stderr
    check_complete(read_output(outp), good, bad)
