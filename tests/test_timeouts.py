"""Stalled requests: a loopback proxy that reads requests and never answers. Every Store
request is bounded (per-read timeout, and a deadline sized to the bytes), retried like a
transient error, and finally fails with one line naming the key; a run whose server stalls for
a while recovers with the same keep list, one whose server stops answering for good fails with
one line. PROTOPRUNE_REQUEST_TIMEOUT_S is set low for the module (Ray workers inherit it)."""

from __future__ import annotations

import json
import threading

import pytest

from ray_jobs import cli
from ray_jobs.driver import run
from scoring.config import make_config
from scoring.errors import StoreError
from scoring.storage import Store
from scoring.store_rules import TIMEOUT_ENV
from tests.helpers import clustered, write_dataset
from tests.s3proxy import FaultProxy

N = 400
BOUND_S = 600  # a run that has not ended by then is hung (the test fails instead of hanging)


@pytest.fixture(scope="module")
def env(s3_server):
    import os

    old = os.environ.get(TIMEOUT_ENV)
    os.environ[TIMEOUT_ENV] = "2"
    yield s3_server
    if old is None:
        os.environ.pop(TIMEOUT_ENV, None)
    else:
        os.environ[TIMEOUT_ENV] = old


@pytest.fixture(scope="module")
def data(env, ray_local):
    bucket = env.new_bucket()
    write_dataset(
        Store(f"s3://{bucket}/in"), clustered(N, 8, 4), list(range(N)), files=2, row_group_rows=50
    )
    ref = run(cfg(bucket, env.endpoint, "ref"), quiet=True)
    return env, bucket, ref


def cfg(bucket, endpoint, run_id):
    return make_config(
        dict(
            input=f"s3://{bucket}/in", output=f"s3://{bucket}/out", run_id=run_id, k=4,
            shard_rows=100, strategy="balanced", keep_fraction=0.4, quiet=True, workers=2,
            storage_options={"endpoint_url": endpoint},
        )
    )  # fmt: skip


def keep_ids(bucket, run_id) -> list:
    st = Store(f"s3://{bucket}/out/{run_id}")
    doc = json.loads(st.get_bytes("_MANIFEST.json"))
    return sorted(i for f in doc["files"] for i in st.read_parquet(f["path"])["id"].to_pylist())


@pytest.mark.parametrize(
    "call", ["get_range", "get_ranges", "get_bytes", "info", "exists", "list", "put", "marker"]
)
def test_a_stalled_request_fails_with_one_line_naming_the_key(env, call):
    bucket = env.new_bucket()
    Store(f"s3://{bucket}").put_bytes("p/shard-000007.parquet", b"0123456789")
    proxy = FaultProxy(env.endpoint, stall_after=0, lifetime=300)
    try:
        st = Store(f"s3://{bucket}/p", {"endpoint_url": proxy.endpoint})
        calls = {
            "get_range": lambda: st.get_range("shard-000007.parquet", 2, 5),
            "get_ranges": lambda: st.get_ranges("shard-000007.parquet", [(0, 2), (4, 8)]),
            "get_bytes": lambda: st.get_bytes("shard-000007.parquet"),
            "info": lambda: st.info("shard-000007.parquet"),
            "list": lambda: st.list("shard-000007.parquet"),
            "exists": lambda: st.exists("shard-000007.parquet"),
            "put": lambda: st.put_bytes("shard-000007.parquet", b"new"),
            "marker": lambda: st.put_if_absent("shard-000007.parquet", b"new"),
        }
        with pytest.raises(StoreError) as info:
            calls[call]()
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(st.uri("shard-000007.parquet"))
        assert "failed 6 times" in msg
        assert proxy.stalled > 1  # retried like a transient error
    finally:
        proxy.stop()
    assert Store(f"s3://{bucket}").get_bytes("p/shard-000007.parquet") == b"0123456789"


@pytest.mark.parametrize("call", ["get_range", "info", "put", "marker"])
def test_a_stalled_gcs_request_fails_with_one_line_naming_the_key(
    env, gcs_server, monkeypatch, call
):
    bucket = gcs_server.new_bucket()
    Store(f"gs://{bucket}").put_bytes("p/shard-000007.parquet", b"0123456789")
    proxy = FaultProxy(gcs_server.endpoint, stall_after=0, lifetime=300)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)  # a new gcsfs client
        st = Store(f"gs://{bucket}/p")
        calls = {
            "get_range": lambda: st.get_range("shard-000007.parquet", 2, 5),
            "get_bytes": lambda: st.get_bytes("shard-000007.parquet"),
            "info": lambda: st.info("shard-000007.parquet"),
            "list": lambda: st.list("shard-000007.parquet"),
            "put": lambda: st.put_bytes("shard-000007.parquet", b"new"),
            "marker": lambda: st.put_if_absent("shard-000008.parquet", b"new"),
        }
        with pytest.raises(StoreError) as info:
            calls[call]()
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"gs://{bucket}/p/shard-00000")
        assert "failed 6 times" in msg and proxy.stalled > 1
    finally:
        proxy.stop()
    monkeypatch.undo()
    assert Store(f"gs://{bucket}").get_bytes("p/shard-000007.parquet") == b"0123456789"


def test_a_run_whose_server_stalls_for_a_while_recovers(data):
    server, bucket, ref = data
    proxy = FaultProxy(server.endpoint, stall_after=40, stall_count=8, lifetime=BOUND_S)
    box: dict = {}
    try:
        t = threading.Thread(
            target=lambda: box.update(doc=run(cfg(bucket, proxy.endpoint, "stall"), quiet=True)),
            daemon=True,
        )
        t.start()
        t.join(BOUND_S)
        assert not t.is_alive(), "the run hung"
    finally:
        proxy.stop()
    assert proxy.stalled == 8  # the stalls happened mid-run
    assert box["doc"]["rows_kept"] == ref["rows_kept"]
    assert keep_ids(bucket, "stall") == keep_ids(bucket, "ref")


def test_a_run_whose_server_stops_answering_fails_with_one_line(data, tmp_path, capsys):
    server, bucket, _ = data
    proxy = FaultProxy(server.endpoint, stall_after=40, lifetime=BOUND_S)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"storage_options:\n  endpoint_url: {proxy.endpoint}\n")
    args = [
        "run", "--config", str(yaml), "--input", f"s3://{bucket}/in", "--output",
        f"s3://{bucket}/out", "--run-id", "dead", "--k", "4", "--shard-rows", "100",
        "--workers", "2", "--quiet",
    ]  # fmt: skip
    box: dict = {}
    try:
        capsys.readouterr()
        t = threading.Thread(target=lambda: box.update(rc=cli.main(args)), daemon=True)
        t.start()
        t.join(BOUND_S)
        assert not t.is_alive(), "the run hung"
    finally:
        proxy.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert box["rc"] in (1, 2) and len(err) == 1, err
    assert err[0].startswith("protoprune: error: ")
    assert f"s3://{bucket}/" in err[0] and "failed 6 times" in err[0]
