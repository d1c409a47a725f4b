"""Fixtures for the real-vLLM tier: one CPU vLLM server per test session.

The tier runs only when asked for (`pytest -m vllm tests/vllm_tier`, or
BATCHGATE_VLLM_TIER=1); the ordinary test run skips it with that hint instead of spending
minutes starting a server. With BATCHGATE_VLLM_URL set (run.sh does this) the tests use that
already running server; otherwise they start one themselves from the interpreter that has
vllm (BATCHGATE_VLLM_PYTHON, default /work/venvs/vllm/bin/python).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve  # noqa: E402  (tests/vllm_tier/serve.py)

HOW_TO_RUN = ("real-vLLM tier runs only on request: `pytest -m vllm tests/vllm_tier` "
              "or `bash tests/vllm_tier/run.sh`")

# The server the tests expect (run.sh starts the same): KV cache of 8 blocks x 128 tokens,
# 7 of them usable (vLLM keeps a null block), so a little concurrency already preempts.
SERVER_SETTINGS = dict(max_model_len=512, max_num_seqs=8, num_blocks=8, block_size=128)


def _tier_requested(config) -> bool:
    if os.environ.get("BATCHGATE_VLLM_TIER") == "1" or os.environ.get("BATCHGATE_VLLM_URL"):
        return True
    return "vllm" in (config.getoption("markexpr", "") or "")


def pytest_collection_modifyitems(config, items):
    if _tier_requested(config):
        return
    skip = pytest.mark.skip(reason=HOW_TO_RUN)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    url = os.environ.get("BATCHGATE_VLLM_URL")
    if url:
        yield serve.ExternalServer(url, os.environ.get("BATCHGATE_VLLM_MODEL"))
        return
    python = serve.find_vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed (no interpreter can import vllm; set "
                    "BATCHGATE_VLLM_PYTHON or run tests/vllm_tier/run.sh to create the venv)")
    model_dir = os.environ.get("BATCHGATE_VLLM_MODEL_DIR")
    if not model_dir:
        model_dir = str(tmp_path_factory.mktemp("tiny-qwen2"))
        made = subprocess.run([python, str(HERE / "make_tiny_model.py"), model_dir],
                              capture_output=True, text=True, timeout=600)
        if made.returncode != 0:
            pytest.skip(f"could not make the tiny model with {python}:\n{made.stderr[-2000:]}")
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    server = serve.VllmServer(model_dir, python=python, log_path=log, **SERVER_SETTINGS)
    try:
        server.start()
    except RuntimeError as e:
        pytest.skip(f"vLLM server could not start: {e}")
    print(f"\nvLLM server up in {server.start_seconds:.1f}s at {server.base_url}",
          file=sys.stderr)
    try:
        yield server
    finally:
        server.stop()
