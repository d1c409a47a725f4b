"""Start a real vLLM OpenAI-compatible server (CPU build) on 127.0.0.1 for the test tier.

Importable (``VllmServer``, used by the tier's conftest and the benchmark) and a CLI:

    python tests/vllm_tier/serve.py --model DIR [--port N] [--num-blocks 8]

prints ``BATCHGATE_VLLM_URL=http://127.0.0.1:PORT/v1`` once the server answers, then keeps
it running until SIGINT/SIGTERM. The server runs from the interpreter named by
``--python`` / ``$BATCHGATE_VLLM_PYTHON`` (default: the tier's venv /work/venvs/vllm, then
this interpreter), so the tests themselves can run on any Python that has batchgate.

Everything stays offline and local: hub access is switched off, usage stats are off, the
model is a directory on disk, and the server binds loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

DEFAULT_VENV_PYTHON = "/work/venvs/vllm/bin/python"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # Two shared cores: do not pin OpenMP threads to cores other work needs.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


def find_vllm_python(explicit: str | None = None) -> str | None:
    """An interpreter that can import vllm, or None."""
    candidates = [explicit, os.environ.get("BATCHGATE_VLLM_PYTHON"), DEFAULT_VENV_PYTHON,
                  sys.executable]
    for py in candidates:
        if not py or not os.path.exists(py):
            continue
        probe = subprocess.run(
            [py, "-c", "import importlib.util as u, sys; "
                       "sys.exit(0 if u.find_spec('vllm') else 1)"],
            capture_output=True, timeout=60)
        if probe.returncode == 0:
            return py
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; also sums each name over its labels
    under the bare name (so 'vllm:num_requests_running' works with or without labels)."""
    out: dict[str, float] = {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        sums[name] = sums.get(name, 0.0) + value
    out.update(sums)
    return out


class VllmServer:
    """One `vllm` API server process group; `start()` blocks until it serves our model."""

    def __init__(self, model_dir: str | os.PathLike, *, python: str | None = None,
                 port: int | None = None, max_model_len: int = 512, max_num_seqs: int = 8,
                 num_blocks: int | None = 8, block_size: int | None = 128,
                 kv_cache_bytes: int = 64 << 20, dtype: str = "float32",
                 log_path: str | os.PathLike | None = None, extra_args: list[str] | None = None):
        self.model_dir = str(model_dir)
        self.python = python
        self.port = port
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_cache_bytes = kv_cache_bytes
        self.dtype = dtype
        self.extra_args = list(extra_args or [])
        # A unique served name: a foreign server that grabbed the same port cannot pass
        # for ours (other helpers run fake OpenAI servers on loopback too).
        self.model_name = f"tiny-qwen2-{uuid.uuid4().hex[:8]}"
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def command(self) -> list[str]:
        cmd = [self.python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model_dir, "--served-model-name", self.model_name,
               "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
               "--max-num-seqs", str(self.max_num_seqs),
               # Eager + an explicit KV size: no torch.compile, no warm-up pass.
               "--enforce-eager", "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
               "--generation-config", "vllm", "--uvicorn-log-level", "warning"]
        if self.block_size:
            cmd += ["--block-size", str(self.block_size)]
        if self.num_blocks:
            # A tiny KV cache (num_blocks * block_size tokens) so preemptions can happen.
            cmd += ["--num-gpu-blocks-override", str(self.num_blocks)]
        return cmd + self.extra_args

    def start(self, timeout: float = 420.0) -> "VllmServer":
        if self.python is None:
            self.python = find_vllm_python()
            if self.python is None:
                raise RuntimeError("no interpreter with vllm found "
                                   "(set BATCHGATE_VLLM_PYTHON or run tests/vllm_tier/run.sh)")
        if self.port is None:
            self.port = free_port()
        env = dict(os.environ, **OFFLINE_ENV)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # Own session: stop() signals exactly this server's process group.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} during "
                                   f"start-up; last log lines:\n{self.log_tail()}")
            if self._serves_our_model():
                self.start_seconds = time.monotonic() - t0
                return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM server not ready after {timeout:.0f}s; last log lines:\n"
                           f"{self.log_tail()}")

    def _serves_our_model(self) -> bool:
        try:
            status, body = http_get(self.base_url + "/models", timeout=2.0)
        except OSError:
            return False
        if status != 200:
            return False
        try:
            ids = [m.get("id") for m in json.loads(body).get("data", [])]
        except ValueError:
            return False
        return self.model_name in ids

    def metrics(self) -> dict[str, float]:
        status, body = http_get(self.root_url + "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body.decode("utf-8", "replace"))

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ExternalServer:
    """A server started elsewhere (run.sh, or by hand): the interface tests and benchmark use."""

    def __init__(self, base_url: str, model_name: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        if not self.root_url.startswith(("http://127.", "http://localhost")):
            raise ValueError(f"only loopback servers are allowed, got {base_url!r}")
        if model_name is None:
            status, body = http_get(self.base_url + "/models")
            model_name = json.loads(body)["data"][0]["id"]
        self.model_name = model_name
        self.start_seconds = None

    def metrics(self) -> dict[str, float]:
        status, body = http_get(self.root_url + "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body.decode("utf-8", "replace"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a local CPU vLLM server for batchgate's tier.")
    ap.add_argument("--model", required=True, help="model directory (make_tiny_model.py)")
    ap.add_argument("--python", default=None, help="interpreter with vllm installed")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--num-blocks", type=int, default=8,
                    help="KV blocks (x --block-size tokens); 0 = size from --kv-cache-bytes")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--kv-cache-bytes", type=int, default=64 << 20)
    ap.add_argument("--log", default=None)
    ap.add_argument("--timeout", type=float, default=420.0)
    args = ap.parse_args(argv)

    server = VllmServer(args.model, python=args.python, port=args.port,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        num_blocks=args.num_blocks or None, block_size=args.block_size,
                        kv_cache_bytes=args.kv_cache_bytes, log_path=args.log)
    server.python = args.python or find_vllm_python()
    if server.python is None:
        print("no interpreter with vllm found (set --python or BATCHGATE_VLLM_PYTHON)",
              file=sys.stderr)
        return 2
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"starting: {' '.join(server.command()[:3])} ... log {server.log_path}",
          file=sys.stderr, flush=True)
    server.start(timeout=args.timeout)
    print(f"BATCHGATE_VLLM_URL={server.base_url}", flush=True)
    print(f"BATCHGATE_VLLM_MODEL={server.model_name}", flush=True)
    print(f"BATCHGATE_VLLM_START_SECONDS={server.start_seconds:.1f}", flush=True)
    try:
        while not stop["now"] and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
