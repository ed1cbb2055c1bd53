"""Faults on real Ray and the local S3 server: a worker SIGKILLed mid-shard, the driver killed
mid-run then resumed, 503 SlowDown from a fault-injecting proxy, permanent storage errors, and
secrets that must never reach the run folder, logs or errors."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from ray_jobs import cli
from ray_jobs.driver import run
from scoring.config import make_config
from scoring.retry import is_transient
from scoring.storage import Store
from tests.helpers import clustered, write_dataset
from tests.s3proxy import FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 600
SECRET = "pp-SECRET-7f3a9c"
ENV_SECRET = "pp-ENVSECRET-51be02"


@pytest.fixture(scope="module")
def fault_env():
    # Each ShardWorker.score sleeps this long first: a window to kill a worker mid-shard.
    os.environ["PROTOPRUNE_FAULT_SHARD_DELAY_S"] = "1.0"
    yield
    os.environ.pop("PROTOPRUNE_FAULT_SHARD_DELAY_S", None)


@pytest.fixture(scope="module")
def env(fault_env, s3_server, ray_local):
    bucket = s3_server.new_bucket()
    write_dataset(
        Store(f"s3://{bucket}/in"), clustered(N, 8, 4), list(range(N)), files=2, row_group_rows=100
    )
    ref = run(cfg(bucket, "ref"), quiet=True)
    return s3_server, bucket, ref


def cfg(bucket, run_id, **kw):
    s = dict(
        input=f"s3://{bucket}/in",
        output=f"s3://{bucket}/out",
        run_id=run_id,
        k=4,
        shard_rows=100,
        strategy="balanced",
        keep_fraction=0.4,
        quiet=True,
        workers=2,
    )
    s.update(kw)
    return make_config(s)


def keep_ids(bucket, run_id, opts=None) -> list:
    st = Store(f"s3://{bucket}/out/{run_id}", opts)
    doc = json.loads(st.get_bytes("_MANIFEST.json"))
    return sorted(i for f in doc["files"] for i in st.read_parquet(f["path"])["id"].to_pylist())


def scored_shards(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"shard (\d+) scored", text)]


def test_worker_sigkilled_mid_shard(env, caplog):
    import ray

    _, bucket, ref = env
    caplog.set_level(logging.INFO, logger="protoprune")
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(doc=run(cfg(bucket, "kill"), quiet=True)))
    t.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        mine = sorted(n for n in names if n.startswith("protoprune-score-kill-"))
        if mine:
            victim = ray.get_actor(mine[0], namespace=_namespace(mine[0]))
        else:
            time.sleep(0.05)
    assert victim is not None
    pid = ray.get(victim.pid.remote())  # queued behind its current shards, then more follow
    os.kill(pid, signal.SIGKILL)
    t.join(300)
    assert "doc" in box
    lost = re.findall(r"shard (\d+): worker lost", caplog.text)
    assert lost, "no shard was in flight on the killed worker"
    done = scored_shards(caplog.text)
    assert sorted(done) == list(range(len(done))) and len(done) == N // 100  # each once
    assert keep_ids(bucket, "kill") == keep_ids(bucket, "ref")
    assert box["doc"]["rows_kept"] == ref["rows_kept"]
    print(f"worker kill: {len(set(lost))} shard(s) redone of {len(done)}")


def _namespace(name: str) -> str | None:
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"] == name:
            return a["namespace"]
    return None


def test_driver_killed_then_resumed(env, caplog):
    import ray

    server, bucket, _ = env
    store = Store(f"s3://{bucket}/out/drv")
    penv = dict(os.environ, PYTHONPATH=ROOT, AWS_SECRET_ACCESS_KEY=ENV_SECRET)
    args = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "run",
        "--input",
        f"s3://{bucket}/in",
        "--output",
        f"s3://{bucket}/out",
        "--run-id",
        "drv",
        "--k",
        "4",
        "--shard-rows",
        "100",
        "--strategy",
        "balanced",
        "--keep-fraction",
        "0.4",
        "--workers",
        "2",
        "--quiet",
        "--address",
        ray.get_runtime_context().gcs_address,
    ]
    proc = subprocess.Popen(args, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if len(store.list("_commits/scores/")) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert ENV_SECRET not in err.decode()
    assert not store.exists("_MANIFEST.json")
    s3 = server.client()
    committed = {
        k: s3.head_object(Bucket=bucket, Key=f"out/drv/scores/{k[-17:-5]}.parquet")["LastModified"]
        for k in store.list("_commits/scores/")
    }
    assert 2 <= len(committed) < N // 100
    caplog.set_level(logging.INFO, logger="protoprune")
    run(cfg(bucket, "drv"), quiet=True)
    for k, lm in committed.items():  # committed shards were not recomputed
        key = f"out/drv/scores/{k[-17:-5]}.parquet"
        assert s3.head_object(Bucket=bucket, Key=key)["LastModified"] == lm
    redone = scored_shards(caplog.text)
    assert len(redone) == N // 100 - len(committed)
    assert keep_ids(bucket, "drv") == keep_ids(bucket, "ref")
    for key in Store(f"s3://{bucket}/out/drv").list():
        assert ENV_SECRET.encode() not in Store(f"s3://{bucket}/out/drv").get_bytes(key)
    print(f"driver kill: {len(committed)} shards committed before the kill, {len(redone)} redone")


def test_slowdown_503_through_proxy(env, caplog):
    server, bucket, _ = env
    proxy = FaultProxy(server.endpoint, share=0.25, max_faults=300, seed=3, lifetime=240)
    try:
        opts = {"endpoint_url": proxy.endpoint, "key": "testing", "secret": SECRET}
        caplog.set_level(logging.INFO)
        doc = run(cfg(bucket, "slow", storage_options=opts), quiet=True)
        assert proxy.faults > 10
        assert keep_ids(bucket, "slow") == keep_ids(bucket, "ref")
        assert doc["rows_kept"] == int(0.4 * N)
    finally:
        proxy.stop()
    st = Store(f"s3://{bucket}/out/slow")
    for key in st.list():  # run.json, markers, manifest, parquet: no secret anywhere
        assert SECRET.encode() not in st.get_bytes(key), key
    assert json.loads(st.get_bytes("run.json"))["config"]["storage_options"]["secret"] == "***"
    assert SECRET not in caplog.text


def test_store_retries_transient_errors_itself(env):
    """s3fs (S3FS_TRIES) and botocore (2 tries with max_attempts 1) try a PUT 4 times here;
    then the fault reaches our retry_io, which sees the real s3fs exception, classifies it
    transient and retries."""
    from scoring.filesystems import S3FS_TRIES

    tries = S3FS_TRIES * 2
    server, bucket, _ = env
    proxy = FaultProxy(server.endpoint, share=1.0, max_faults=tries, lifetime=60)
    try:
        opts = {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
        st = Store(f"s3://{bucket}/direct", opts)
        with pytest.raises(OSError) as e:  # what s3fs makes of 503 SlowDown
            st.fs.pipe_file(f"{bucket}/direct/probe", b"x")
        print("503 SlowDown arrives as", type(e.value).__name__, e.value.errno, e.value)
        assert is_transient(e.value) and proxy.faults == tries
        proxy.max_faults = 2 * tries  # as many more: s3fs gives up once more, retry_io does not
        st.put_bytes("a", b"payload")
        assert proxy.faults == 2 * tries and st.get_bytes("a") == b"payload"
    finally:
        proxy.stop()


def test_permanent_errors_fail_fast(env, tmp_path, capsys):
    server, bucket, _ = env
    denied = server.new_bucket()
    proxy = FaultProxy(server.endpoint, deny_buckets=(denied,), lifetime=60)
    try:
        yaml = tmp_path / "c.yaml"
        yaml.write_text(
            f"storage_options:\n  endpoint_url: {proxy.endpoint}\n  key: testing\n"
            f"  secret: {SECRET}\n"
        )
        base = ["run", "--config", str(yaml), "--run-id", "x", "--k", "4", "--quiet"]
        t0 = time.perf_counter()
        rc = cli.main(base + ["--input", f"s3://{bucket}/in", "--output", f"s3://{denied}/o"])
        err = capsys.readouterr().err
        assert rc == 2 and f"s3://{denied}/o" in err and "access denied" in err
        assert proxy.denied <= 3  # not retried
        rc = cli.main(base + ["--input", "s3://pp-no-such-bucket/in", "--output", "s3://x/o"])
        err2 = capsys.readouterr().err
        assert rc == 2 and "s3://pp-no-such-bucket/in" in err2
        assert time.perf_counter() - t0 < 60
        assert SECRET not in err + err2
    finally:
        proxy.stop()
