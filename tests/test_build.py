"""The build's own promises: a clear message when a C library is missing."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")),
                    reason="needs the source tree")
def test_missing_library_names_the_package_to_install(tmp_path):
    # A pkg-config that knows nothing and no curl-config on PATH: the build
    # must stop with install hints, not a compiler error wall.
    fake = tmp_path / "pkg-config"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, PKG_CONFIG=str(fake), PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "could not find libcurl" in proc.stderr
    assert "libcurl4-openssl-dev libcjson-dev" in proc.stderr
    assert "Traceback" not in proc.stderr
