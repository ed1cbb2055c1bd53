"""gs:// for real: a fake-gcs-server subprocess on loopback (tests/gcsserver.py), reached by
gcsfs through STORAGE_EMULATOR_HOST from the driver and the Ray workers. The end-to-end
exactness check and the resume check of tests/test_e2e.py, and create-only markers (a
generation precondition: a second writer gets "exists")."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from ray_jobs.driver import run
from scoring import layout
from scoring.config import RunConfig
from scoring.storage import Store
from tests.helpers import read_all, write_dataset
from tests.test_e2e import K, check_run, dataset


@pytest.fixture(scope="module")
def ray_gcs(gcs_server, ray_local):
    """The emulator first, so that the module's Ray workers inherit STORAGE_EMULATOR_HOST."""
    return gcs_server


def test_the_emulator_honours_the_generation_precondition(gcs_server):
    """The server itself, without gcsfs: ifGenerationMatch=0 creates once, then answers 412."""
    bucket = gcs_server.new_bucket()
    assert gcs_server.upload(bucket, "m.json", b"first", if_generation_match=0) == 200
    assert gcs_server.upload(bucket, "m.json", b"second", if_generation_match=0) == 412
    assert gcs_server.download(bucket, "m.json") == b"first"


def test_create_only_marker_has_one_winner(gcs_server):
    """Eight writers race for one marker: exactly one creates it, the others get "exists" and
    the object holds the winner's bytes (exists-then-put would let several 'create' it)."""
    bucket = gcs_server.new_bucket()
    store = Store(f"gs://{bucket}/run")
    wins: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        s = Store(store.url)  # its own Store, as another worker would have
        barrier.wait()
        wins[i] = s.put_if_absent("_commits/scores/shard-000412.json", f"writer {i}".encode())

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, won in wins.items() if won]
    assert len(wins) == 8 and len(winners) == 1
    assert store.get_bytes("_commits/scores/shard-000412.json") == f"writer {winners[0]}".encode()
    assert store.put_if_absent("_commits/scores/shard-000412.json", b"late") is False


@pytest.mark.parametrize(
    "id_kind,kind,dtype,metric,strategy",
    [
        ("int", "fixed", pa.float32(), "cosine", "hard"),
        ("str", "list", pa.float16(), "l2", "balanced"),
    ],
)
def test_end_to_end_exact_on_gcs(ray_gcs, id_kind, kind, dtype, metric, strategy):
    ids, x = dataset(id_kind, seed=len(strategy))
    x = x.astype(dtype.to_pandas_dtype()).astype(np.float32)  # what the files hold
    bucket = ray_gcs.new_bucket()
    inp, out = f"gs://{bucket}/dataset", f"gs://{bucket}/runs"
    write_dataset(Store(inp), x, ids, files=3, kind=kind, dtype=dtype)
    cfg = RunConfig(
        input=inp, output=out, run_id=f"g-{strategy}", k=K, metric=metric, kmeans_iters=5,
        sample_size=1200, shard_rows=600, strategy=strategy, keep_fraction=0.3, seed=3,
        quiet=True,
    )  # fmt: skip
    doc = run(cfg, quiet=True)
    check_run(cfg, doc, ids, x, n_files=3)
    assert run(cfg, quiet=True)["files"] == doc["files"]  # a committed rerun recomputes nothing


def test_rerun_on_gcs_resumes_only_what_is_missing(ray_gcs):
    ids, x = dataset("str", seed=4)
    bucket = ray_gcs.new_bucket()
    inp = f"gs://{bucket}/dataset"
    write_dataset(Store(inp), x, ids, files=2)
    cfg = RunConfig(
        input=inp, output=f"gs://{bucket}/runs", run_id="resume", k=K, kmeans_iters=3,
        sample_size=800, shard_rows=600, strategy="hard", keep_fraction=0.4, quiet=True,
    )  # fmt: skip
    first = run(cfg, quiet=True)
    store = Store(cfg.output).child("resume")
    keep1 = set(read_all(store, "keep/")["id"].to_pylist())
    # an interrupted run: no manifest, no keep list, one shard's score marker missing
    store.delete(layout.MANIFEST)
    store.delete(layout.KEEP)
    store.delete(layout.marker_key(layout.SCORES, 1))
    gen = {k: store.info(k)["generation"] for k in store.list(f"{layout.SCORES}/")}
    second = run(cfg, quiet=True)
    check_run(cfg, second, ids, x, n_files=2)
    assert set(read_all(store, "keep/")["id"].to_pylist()) == keep1
    assert second["prototypes_sha256"] == first["prototypes_sha256"]
    after = {k: store.info(k)["generation"] for k in gen}
    redone = sorted(k for k in gen if after[k] != gen[k])
    assert redone == [layout.score_key(1)]  # only the shard without a marker was rewritten
