"""batchgate.ray on a real local Ray (2 CPUs, no dashboard, loopback only) against
simulated vLLM servers on 127.0.0.1: a server killed mid-run, 429 with Retry-After,
chat rows, the cluster-wide cap split. Skipped when ray[data] is not installed."""
import asyncio
import os
import subprocess
import sys
import time
import warnings

import pytest

from fake_vllm import FakeVLLM

import batchgate.ray as bgr
from batchgate import Dispatcher
from batchgate.simserver import SimServerThread

# Ray on one machine, kept on loopback: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# (read when ray is imported) Ray binds the GCS to the host's first interface address
# (found with a UDP "connect" to 8.8.8.8), and its usage-stats module, loaded even with
# include_dashboard=False and usage stats off, probes cloud metadata (169.254.169.254,
# metadata.google.internal) unless ~/ray_bootstrap_config.yaml exists (see local_ray).
# strace -f -e connect then shows only 127.0.0.1.
RAY_LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
for _k, _v in RAY_LOCAL_ENV.items():
    os.environ.setdefault(_k, _v)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray[data] is not installed "
                               "(pip install 'batchgate[ray]')")
# A Ray job that hangs should cost CI minutes, not the 300 s default.
ray_timeout = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-home")
    (home / "ray_bootstrap_config.yaml").write_text("")
    saved = {k: os.environ.get(k) for k in (*RAY_LOCAL_ENV, "HOME", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(RAY_LOCAL_ENV, HOME=str(home))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
        ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _take_all(ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.take_all()


# ---- no Ray needed --------------------------------------------------------

def test_importing_batchgate_does_not_import_ray():
    code = ("import sys, batchgate, batchgate.ray; "
            "print(sorted(m for m in ('ray', 'numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_caps_are_split_over_the_pool():
    g = bgr.Generate("http://127.0.0.1:9/v1", concurrency=(1, 4), max_concurrent=10,
                     max_inflight_tokens=8000)
    try:
        assert (g.max_concurrent, g.max_inflight_tokens) == (2, 2000)
        assert all(e.dispatcher.max_concurrent == 2 for e in g.endpoints)
    finally:
        g.close()
    with pytest.raises(ValueError, match="concurrency="):
        bgr.Generate("http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="cannot be split over 8 actors"):
        bgr.Generate("http://127.0.0.1:9/v1", concurrency=8, max_concurrent=4)
    with pytest.raises(ValueError, match="same server twice"):
        bgr.Generate(["http://127.0.0.1:9/v1"] * 2, concurrency=1)
    g = bgr.Generate("http://user:s3cret@127.0.0.1:9/v1", concurrency=1)
    try:
        assert "s3cret" not in repr(g) and "s3cret" not in str(g.stats())
    finally:
        g.close()


def test_auto_token_cap_is_passed_through_or_refused_clearly():
    try:
        d = Dispatcher("http://127.0.0.1:9/v1", max_inflight_tokens="auto")
    except (TypeError, ValueError):
        with pytest.raises(ValueError, match="needs a batchgate whose Dispatcher supports"):
            bgr.Generate("http://127.0.0.1:9/v1", concurrency=2, max_inflight_tokens="auto")
        return
    d.close()
    # Each actor's Dispatcher runs the closed loop on the whole server (its KV cache
    # is not split over the actors) and gets no static token cap.
    with SimServerThread(kv_cache_tokens=8192, max_model_len=2048) as srv:
        g = bgr.Generate(srv.base_url + "/v1", concurrency=2, max_inflight_tokens="auto")
        try:
            assert g.max_inflight_tokens == "auto"
            disp = g.endpoints[0].dispatcher
            assert disp.admission is not None and disp.admission["kv_blocks"] == 512
            assert disp.max_inflight_tokens is None
        finally:
            g.close()


def test_bad_rows_fail_alone_without_ray():
    with FakeVLLM() as srv:
        g = bgr.Generate(srv.base_url, concurrency=1, max_tokens=4)
        try:
            out = asyncio.run(g.process({"prompt": ["a", None, 3, "b"]}))
        finally:
            g.close()
    assert list(out["status"]) == ["ok", "error", "error", "ok"]
    assert list(out["text"]) == ["echo:a", None, None, "echo:b"]
    assert "row 1" in out["error"][1] and "NoneType" in out["error"][1]


# ---- on a local Ray -----------------------------------------------------------

@needs_ray
@ray_timeout
def test_server_killed_mid_run_every_row_once(local_ray):
    servers = [SimServerThread(step_base_s=0.01, step_per_token_s=0.0) for _ in range(3)]
    for s in servers:
        s.start()
    victim = servers[1]
    n = 600
    try:
        ds = ray.data.range(n).map(lambda r: {"id": r["id"], "prompt": f"review {r['id']}"})
        out = ds.map_batches(
            bgr.Generate, concurrency=2, batch_size=40, num_cpus=0.25,
            fn_constructor_kwargs=dict(
                base_url=[s.base_url + "/v1" for s in servers], concurrency=2,
                max_concurrent=8, max_tokens=8, max_retries=1, backoff=0.05,
                usage_columns=True))
        rows = []
        killed_at = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for row in out.iter_rows():
                rows.append(row)
                if killed_at is None and len(rows) >= 80:
                    killed_at = len(rows)
                    victim.stop()
        served = victim.stats()
    finally:
        for s in servers:
            s.stop()
    ids = [r["id"] for r in rows]
    assert sorted(ids) == list(range(n)), "a row was lost or came back twice"
    bad = [r for r in rows if r["status"] != "ok"]
    # Failed rows moved to the two live servers: nothing ends as an error here.
    assert not bad, bad[:3]
    for r in rows:
        assert r["text"].startswith("Simulated reply") and r["error"] is None
        assert r["completion_tokens"] == 8 and r["latency_s"] > 0
    assert killed_at is not None and killed_at < n
    # The killed server did part of the work before it died (each answer is 8 tokens).
    assert 0 < served["generation_tokens"] < 8 * n


@needs_ray
@ray_timeout
def test_all_servers_down_rows_get_errors_not_a_failed_job(local_ray):
    dead = SimServerThread()
    dead.start()
    url = dead.base_url + "/v1"
    dead.stop()
    ds = ray.data.from_items([{"prompt": f"p{i}"} for i in range(30)])
    out = _take_all(ds.map_batches(
        bgr.Generate, concurrency=1, batch_size=10, num_cpus=0.25,
        fn_constructor_kwargs=dict(base_url=url, concurrency=1, max_retries=0)))
    assert len(out) == 30
    assert {r["status"] for r in out} == {"error"}
    assert all(r["error"].startswith("TransportError") and r["text"] is None for r in out)


@needs_ray
@ray_timeout
def test_429_retry_after_is_honoured_and_a_hopeless_row_fails_alone(local_ray):
    with FakeVLLM() as srv:
        items = ([{"k": i, "prompt": f"ok {i}"} for i in range(20)]
                 + [{"k": 100, "prompt": "slow [[status=429,times=1,retry_after=1]]"},
                    {"k": 101, "prompt": "never [[status=429,retry_after=0]]"}])
        ds = ray.data.from_items(items)
        t0 = time.monotonic()
        out = _take_all(ds.map_batches(
            bgr.Generate, concurrency=1, batch_size=32, num_cpus=0.25,
            fn_constructor_kwargs=dict(base_url=srv.base_url, concurrency=1, max_tokens=4,
                                       max_retries=2, backoff=0.01, usage_columns=True)))
        wall = time.monotonic() - t0
        counts = srv.stats()["counts"]
    by = {r["k"]: r for r in out}
    assert len(by) == 22
    assert all(by[i]["status"] == "ok" and by[i]["text"] == f"echo:ok {i}" for i in range(20))
    slow = by[100]
    assert slow["status"] == "ok" and slow["attempts"] == 2
    assert wall >= 1.0, "Retry-After: 1 was not waited for"
    never = by[101]
    assert never["status"] == "error" and "429" in never["error"]
    assert never["attempts"] == 3 and never["text"] is None
    assert max(counts.values()) == 3  # 1 + max_retries attempts, no more


@needs_ray
@ray_timeout
def test_chat_rows_and_pandas_batches(local_ray):
    with FakeVLLM() as srv:
        items = [{"messages": [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": f"q{i}"}]} for i in range(12)]
        ds = ray.data.from_items(items)
        out = _take_all(ds.map_batches(
            bgr.Generate, concurrency=1, batch_size=5, num_cpus=0.25, batch_format="pandas",
            fn_constructor_kwargs=dict(base_url=srv.base_url, concurrency=1,
                                       messages_column="messages", output_column="answer",
                                       max_tokens=4)))
        body = srv.stats()["last_body"]
    assert sorted(r["answer"] for r in out) == sorted(f"echo:q{i}" for i in range(12))
    assert {r["status"] for r in out} == {"ok"}
    assert body["messages"][0] == {"role": "system", "content": "be brief"}


@needs_ray
@ray_timeout
def test_cluster_wide_cap_holds_across_actors(local_ray):
    with FakeVLLM(latency=0.05) as srv:
        ds = ray.data.from_items([{"prompt": f"p{i}"} for i in range(160)])
        # generate() hands the same concurrency to the pool and to each actor.
        out = _take_all(bgr.generate(ds, base_url=srv.base_url, concurrency=2,
                                     batch_size=40, max_concurrent=4, max_tokens=4))
        seen = srv.stats()["max_in_flight"]
    assert len(out) == 160 and {r["status"] for r in out} == {"ok"}
    assert 2 <= seen <= 4, f"{seen} requests in flight against a cluster cap of 4"
