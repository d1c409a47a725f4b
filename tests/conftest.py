import os
import sys
import time

# Tests run against the installed package; fall back to an in-place build.
try:
    import batchgate  # noqa: F401
except ImportError:  # pragma: no cover - only for `setup.py build_ext --inplace`
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fake_vllm_server():
    """One fake vLLM server (tests/fake_vllm.py) on 127.0.0.1 per test module."""
    from fake_vllm import FakeVLLM
    srv = FakeVLLM().start_in_thread()
    yield srv
    # Closed clients' connections end first: a handler left pending when the
    # server's loop stops is destroyed later, warning inside another test.
    deadline = time.monotonic() + 5
    while srv.stats()["open_connections"] and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.stop()


@pytest.fixture
def fake(fake_vllm_server):
    """The module's fake server, its recordings and faults reset for this test."""
    fake_vllm_server.reset()
    fake_vllm_server.latency = 0.0
    fake_vllm_server.hold = 0
    return fake_vllm_server
