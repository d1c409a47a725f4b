"""The native engine's own API (issue 10): _native._Dispatcher takes keyword
arguments only, and every bad one is named in its error; a Dispatcher used in
a forked child fails clearly (the native fork generation, not os.getpid())."""
import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

import batchgate
from batchgate import _native

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "http://127.0.0.1:9/v1"  # never contacted: the engine connects lazily


def test_keywords_build_a_working_core():
    d = _native._Dispatcher(base_url=URL, max_concurrent=3, max_inflight_tokens=100,
                            timeout=1.5, verify=False, headers=["X-A: b"])
    try:
        s = d.stats()
        assert s["permits_free"] == 3 and s["tokens_free"] == 100
        assert not d.closed and not d.forked
    finally:
        d.close()


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError, match=r"keyword arguments only \(2 positional"):
        _native._Dispatcher(URL, "key")


def test_missing_base_url_is_named():
    with pytest.raises(TypeError, match="missing required keyword argument 'base_url'"):
        _native._Dispatcher(api_key="k")


def test_unknown_keyword_is_named():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_concurent'"):
        _native._Dispatcher(base_url=URL, max_concurent=3)


@pytest.mark.parametrize("name,value,want", [
    ("base_url", 8000, "str"),
    ("api_key", b"k", "str or None"),
    ("max_concurrent", "20", "int"),
    ("max_concurrent", 2.0, "int"),
    ("max_retries", True, "int"),       # a bool is not taken for an int
    ("timeout", "5", "a number"),
    ("connect_timeout", False, "a number"),
    ("verify", 1, "bool"),              # nor an int for a bool
    ("retry_timeouts", None, "bool"),
    ("default_max_tokens", 1.5, "int"),
])
def test_wrong_type_names_the_argument(name, value, want):
    kw = {"base_url": URL, name: value}
    with pytest.raises(TypeError) as ei:
        _native._Dispatcher(**kw)
    msg = str(ei.value)
    assert f"argument '{name}' must be {want}, not {type(value).__name__}" in msg, msg


@pytest.mark.parametrize("name,value,needle", [
    ("max_concurrent", 0, "'max_concurrent' must be >= 1, got 0"),
    ("max_retries", 1001, "'max_retries' must be in 0..1000, got 1001"),
    ("max_inflight_tokens", -5, "'max_inflight_tokens' must be >= 0"),
    ("max_response_bytes", -1, "'max_response_bytes' must be >= 0"),
    ("max_connections", -1, "'max_connections' must be >= 0"),
    ("timeout", -1.0, "'timeout' must be >= 0, got -1.0"),
    ("backoff", float("nan"), "'backoff' must be >= 0, got nan"),
    ("base_url", "http://h\0x/v1", "'base_url' must not contain NUL"),
    ("max_retries", 1 << 70, "'max_retries' is out of range"),
])
def test_bad_value_names_the_argument(name, value, needle):
    with pytest.raises(ValueError) as ei:
        _native._Dispatcher(**{"base_url": URL, name: value})
    assert needle in str(ei.value)


def test_bad_objects_name_the_argument():
    with pytest.raises(TypeError, match="'semaphore' must be a batchgate.Semaphore or None"):
        _native._Dispatcher(base_url=URL, semaphore=asyncio.Semaphore(2))
    with pytest.raises(TypeError, match="'headers': item 1 must be a str, not int"):
        _native._Dispatcher(base_url=URL, headers=["A: b", 3])
    with pytest.raises(TypeError, match="'headers' must be a sequence"):
        _native._Dispatcher(base_url=URL, headers="A: b")
    with pytest.raises(TypeError, match="'admission' must be a dict or None, not list"):
        _native._Dispatcher(base_url=URL, admission=[])
    with pytest.raises(ValueError, match="'admission' and 'max_inflight_tokens' exclude"):
        _native._Dispatcher(base_url=URL, admission={}, max_inflight_tokens=10)


def test_a_failed_init_leaves_a_core_that_refuses_use():
    d = _native._Dispatcher.__new__(_native._Dispatcher)
    with pytest.raises(TypeError):
        d.__init__(base_url=URL, max_concurrent="x")
    with pytest.raises(RuntimeError, match="__init__ was not called"):
        d.template(None, None)
    d.__init__(base_url=URL)  # a retried __init__ works and leaks nothing
    d.close()


# ---- fork ----------------------------------------------------------------

def _run_script(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + sys.path)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_gets_the_batchgate_error_from_the_native_check():
    # os.getpid is patched in the child so a pid comparison could not notice
    # the fork: only the native generation counter does.
    p = _run_script(f"""
        import asyncio, os, sys, warnings, batchgate
        warnings.simplefilter("ignore", DeprecationWarning)
        d = batchgate.Dispatcher({URL!r}, model="m")
        r = batchgate.Dispatcher([{URL!r}, "http://127.0.0.1:10/v1"], model="m")
        parent_pid = os.getpid()
        assert not d._core.forked
        pid = os.fork()
        if pid == 0:
            os.getpid = lambda: parent_pid
            if not d._core.forked:
                os._exit(5)
            msgs = []
            for call in (lambda: asyncio.run(d.generate("child")),
                         lambda: asyncio.run(d.__aenter__()),
                         lambda: asyncio.run(d.map(["a"])),
                         lambda: asyncio.run(r.__aenter__())):  # several replicas
                try:
                    call()
                except batchgate.BatchgateError as e:
                    msgs.append(str(e))
            want = ("this Dispatcher was created before fork(); create a new one in the "
                    "child process")
            d.close()  # closing in the child never touches the parent's engine
            r.close()
            os._exit(0 if msgs == [want] * 4 else 3)
        _, status = os.waitpid(pid, 0)
        assert not d._core.forked
        d.close()
        r.close()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    assert p.returncode == 0, (p.returncode, p.stderr)
