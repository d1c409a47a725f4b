"""Simulated vLLM servers for the benchmarks: one ``python -m batchgate.simserver``
process per replica on a free 127.0.0.1 port (shared by bench_ray.py and
bench_replicas.py)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

MODEL = "sim"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimServer:
    """A simserver process; ``url`` is its OpenAI base URL (``.../v1``)."""

    def __init__(self, step_base_s: float, model: str = MODEL) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchgate.simserver", "--host", "127.0.0.1",
             "--port", str(self.port), "--model", model, "--step-base-s", str(step_base_s),
             "--step-per-token-s", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.root + "/health", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"simserver on {self.port} did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone in 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL now (a replica dying mid-run)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
