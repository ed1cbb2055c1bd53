"""`protoprune status`: per stage done / pending / failed with errors, rows, manifest state;
works on committed, failed, and died (half-done) runs. Real Ray, local run folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_jobs import cli
from ray_jobs.driver import RunFailed, run
from scoring import commit, layout
from scoring.config import make_config
from scoring.status import run_status
from scoring.storage import Store
from tests.helpers import clustered, write_dataset

N = 500


def cfg(tmp, run_id="s", **kw):
    s = dict(
        input=str(tmp / "in"),
        output=str(tmp / "out"),
        run_id=run_id,
        k=4,
        shard_rows=100,
        keep_fraction=0.5,
        quiet=True,
        workers=2,
    )
    s.update(kw)
    return make_config(s)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("st")
    write_dataset(Store(str(tmp / "in")), clustered(N, 8, 4), list(range(N)), files=2)
    doc = run(cfg(tmp), quiet=True)
    return tmp, doc


def status_cli(capsys, *args):
    rc = cli.main(["status", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_status_of_a_committed_run(done_run, capsys):
    tmp, doc = done_run
    d = tmp / "out" / "s"
    st = run_status(Store(str(d)))
    n_shards = len(json.loads((d / "run.json").read_text())["shards"])
    assert st["state"] == "committed" and st["committed"] and st["rows"] == N
    assert st["rows_kept"] == doc["rows_kept"] == N // 2
    sc = st["stages"]["scores"]
    assert (sc["done"], sc["pending"], sc["failed"], sc["rows_done"]) == (n_shards, 0, 0, N)
    assert st["stages"]["prototypes"]["done"] == st["stages"]["reduce"]["done"] == 1
    rc, out, _ = status_cli(capsys, str(d))
    assert rc == 0
    assert "committed  (_MANIFEST.json committed)" in out
    assert f"scores          done {n_shards}/{n_shards}  pending 0  failed 0  rows {N}" in out
    rc, out, _ = status_cli(capsys, str(d), "--json")
    assert rc == 0 and json.loads(out) == json.loads(json.dumps(st))


def test_status_of_a_died_run_then_resumed(done_run, tmp_path, capsys):
    import shutil

    tmp, _ = done_run
    d = tmp / "out" / "died"
    shutil.copytree(tmp / "out" / "s", d)
    (d / "_MANIFEST.json").unlink()
    for i in (0, 3):
        (d / layout.marker_key("scores", i)).unlink()
    store = Store(str(d))
    commit.record_failure(
        store, "scores", "shard-000003", {"shard": 3, "error": "worker died 4 times"}
    )
    st = run_status(store)
    sc = st["stages"]["scores"]
    n = st["shards"]
    assert st["state"] == "failed" and not st["committed"]
    assert (sc["done"], sc["pending"], sc["failed"]) == (n - 2, 1, 1)
    assert sc["failures"][0]["shard"] == 3 and "worker died" in sc["failures"][0]["error"]
    assert sc["failures"][0]["file"].endswith(".parquet")
    assert st["stages"]["reduce"]["pending"] == 1
    rc, out, _ = status_cli(capsys, str(d))
    assert "FAILED shard 3 (data/part-00" in out and "worker died 4 times" in out
    assert "reduce/manifest done 0/1  pending 1  failed 0" in out
    run(cfg(tmp, "died"), quiet=True)  # the resume commits shard 3: its failure record goes
    st = run_status(store)
    assert st["state"] == "committed" and st["stages"]["scores"]["failures"] == []


def test_status_names_data_failures(tmp_path, capsys, ray_local):
    store = Store(str(tmp_path / "in"))
    x = clustered(N, 8, 4)
    x[420, 1] = np.nan
    write_dataset(store, x, list(range(N)), files=2)
    with pytest.raises(RunFailed, match="part-001.parquet"):
        run(cfg(tmp_path), quiet=True)
    st = run_status(Store(str(tmp_path / "out" / "s")))
    pr = st["stages"]["prototypes"]
    assert st["state"] == "failed" and pr["failed"] == 1 and pr["done"] == 0
    assert any("id 420" in f["error"] and "part-001" in f["file"] for f in pr["failures"])
    assert st["stages"]["scores"]["done"] == 0
    rc, out, _ = status_cli(capsys, str(tmp_path / "out" / "s"))
    assert rc == 0 and "FAILED shard" in out and "id 420" in out


def test_status_of_a_folder_that_is_no_run(tmp_path, capsys):
    rc, _, err = status_cli(capsys, str(tmp_path))
    assert rc == 2 and err.count("\n") == 1 and "no run.json" in err and str(tmp_path) in err
