"""Helpers for the simserver tests: the `sim` fixture (a started SimServerThread,
stopped at teardown) and small HTTP clients over 127.0.0.1."""
import http.client
import json
import re
import socket
import threading

import pytest

from batchgate.simserver import SimServerThread

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
