"""`protoprune apply`: the pruned dataset equals a pyarrow filter of the input by the keep
ids, row for row, every column and type unchanged (list, struct, string, binary, nullable);
`--columns` and `--with-scores`; a selection; a killed apply resumes without rewriting
committed parts; bad input gets one line. Local folders and a real S3 API (moto_server)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from scoring.commit import read_json
from scoring.config import make_config
from scoring.storage import Store
from tests.helpers import clustered, emb_array

N = 900


def rich_table(x: np.ndarray, ids: np.ndarray, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(ids)
    score = rng.normal(size=n)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "embedding": emb_array(x),
            "text": pa.array([f"row {i} " + "x" * int(i % 7) for i in ids]),
            "blob": pa.array([bytes([i % 256]) * int(i % 5) for i in ids], pa.binary()),
            "tags": pa.array([list(range(int(i % 4))) for i in ids], pa.list_(pa.int32())),
            "meta": pa.array(
                [{"a": int(i), "b": None if i % 3 else str(i)} for i in ids],
                pa.struct([("a", pa.int32()), ("b", pa.string())]),
            ),
            "maybe": pa.array(score, mask=rng.random(n) < 0.3),
        }
    )


def write_input(store: Store, seed: int = 0) -> pa.Table:
    x = clustered(N, 8, 4, seed=seed)
    ids = np.random.default_rng(seed).permutation(N * 2)[:N]
    parts = []
    for f, part in enumerate(np.array_split(np.arange(N), 3)):
        t = rich_table(x[part], ids[part], seed + f)
        store.write_parquet(f"f{f}.parquet", t, row_group_size=100)
        parts.append(t)
    return pa.concat_tables(parts)


def keep_ids(run: Store, doc) -> pa.Array:
    return pa.concat_arrays(
        [run.read_parquet(f["path"], ["id"])["id"].combine_chunks() for f in doc["files"]]
    )


def output_table(out: Store, doc) -> pa.Table:
    assert [f["shard"] for f in doc["files"]] == sorted(f["shard"] for f in doc["files"])
    return pa.concat_tables([out.read_parquet(f["path"]) for f in doc["files"]])


def run_once(inp: str, out: str, run_id: str, **kw):
    from ray_jobs.driver import run

    cfg = dict(input=inp, output=out, run_id=run_id, k=4, shard_rows=200, quiet=True)
    return run(make_config(dict(cfg, **kw)), quiet=True)


@pytest.fixture(scope="module")
def local(s3_server, ray_local, tmp_path_factory):  # S3 first: Ray workers inherit its env
    tmp = tmp_path_factory.mktemp("apply")
    table = write_input(Store(str(tmp / "in")))
    doc = run_once(str(tmp / "in"), str(tmp / "runs"), "r", strategy="hard", keep_fraction=0.4)
    return tmp, table, Store(str(tmp / "runs" / "r")), doc


def test_apply_equals_a_filter_of_the_input(local):
    from ray_jobs import prune

    tmp, table, run, doc = local
    got = prune.apply(run.uri(), str(tmp / "pruned"))
    out = Store(str(tmp / "pruned"))
    want = table.filter(pc.is_in(table["id"], value_set=keep_ids(run, doc)))
    res = output_table(out, got)
    assert res.schema.equals(table.schema) and res.equals(want)
    assert got["rows"] == doc["rows_kept"] == want.num_rows
    n_shards = len(read_json(run, "run.json")["shards"])
    assert n_shards == 6  # 3 files of 300 rows, shards of 200 (row groups of 100)
    assert [f["path"] for f in got["files"]] == [f"part-{i:06d}.parquet" for i in range(6)]
    for f in got["files"]:
        raw = open(os.path.join(out.root, f["path"]), "rb").read()
        assert hashlib.sha256(raw).hexdigest() == f["sha256"]
        assert pq.read_metadata(os.path.join(out.root, f["path"])).num_rows == f["rows"]
        assert pq.read_schema(os.path.join(out.root, f["path"])).equals(table.schema)
    assert got["run"] == run.uri() and got["selection"] is None
    assert not out.list("_index")  # the index goes once the manifest is committed


def test_columns_and_scores_and_a_selection(local):
    from ray_jobs import prune

    tmp, table, run, doc = local
    sel = prune.select(run.uri(), "easy", strategy="easy", keep_fraction=0.2)
    got = prune.apply(
        run.uri(), str(tmp / "sub"), selection="easy", columns=["meta", "text"], with_scores=True
    )
    res = output_table(Store(str(tmp / "sub")), got)
    kept = pa.concat_tables([run.read_parquet(f["path"]) for f in sel["files"]])
    want = table.filter(pc.is_in(table["id"], value_set=kept["id"]))
    assert res.select(["meta", "text"]).equals(want.select(["meta", "text"]))
    assert res.column_names == ["meta", "text", "cluster", "distance", "percentile"]
    # the scores of each row are the keep list's (joined by the row's id, written independently)
    by_id = {
        r["id"]: r for r in kept.select(["id", "cluster", "distance", "percentile"]).to_pylist()
    }
    for i, c, d, p in zip(want["id"].to_pylist(), res["cluster"].to_pylist(),
                          res["distance"].to_pylist(), res["percentile"].to_pylist()):  # fmt: skip
        assert (c, d, p) == (by_id[i]["cluster"], by_id[i]["distance"], by_id[i]["percentile"])
    assert res.schema.field("cluster").type == pa.int32() and got["selection"] == "easy"
    assert got["rows"] == sel["rows_kept"] == int(0.2 * N)


def test_killed_apply_resumes_without_rewriting(local):
    from ray_jobs import prune

    tmp, table, run, doc = local
    dest = str(tmp / "resume")
    first = prune.apply(run.uri(), dest)
    out = Store(dest)
    # the kill: no manifest, and shard 2's marker never written
    out.delete("_MANIFEST.json")
    out.delete("_commits/apply/shard-000002.json")
    paths = {f["shard"]: os.path.join(dest, f["path"]) for f in first["files"]}
    before = {s: os.stat(p).st_mtime_ns for s, p in paths.items()}
    # a committed part's bytes replaced: a rerun that rewrote it would restore them
    committed = pq.read_table(paths[4])
    pq.write_table(committed.slice(0, 1), paths[4])
    before[4] = os.stat(paths[4]).st_mtime_ns
    again = prune.apply(run.uri(), dest)
    after = {s: os.stat(p).st_mtime_ns for s, p in paths.items()}
    assert [s for s in paths if after[s] != before[s]] == [2]
    assert pq.read_table(paths[4]).num_rows == 1  # not rewritten
    # the redone part has the same bytes as the first time
    assert hashlib.sha256(open(paths[2], "rb").read()).hexdigest() == first["files"][2]["sha256"]
    assert again["files"] == first["files"]  # the markers' entries


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_bad_input_is_one_line(local, tmp_path):
    tmp, _, run, _ = local
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text('{"run_id": "half"}')
    cases = [
        ([str(tmp_path / "half"), "--output", str(tmp_path / "o1")], "is not committed"),
        ([run.uri(), "--output", str(tmp_path / "o2"), "--selection", "nope"], "no committed selection 'nope'"),
        ([run.uri(), "--output", run.uri() + "/pruned"], "inside the run folder"),
        ([run.uri(), "--output", str(tmp / "in")], "is the input"),
        ([run.uri(), "--output", str(tmp_path / "o3"), "--columns", "id,nope"], "column 'nope' not found"),
    ]  # fmt: skip
    for args, msg in cases:
        r = cli("apply", *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


def test_apply_on_s3(s3_server, ray_local):
    from ray_jobs import prune

    bucket = s3_server.new_bucket()
    inp = Store(f"s3://{bucket}/in")
    table = write_input(inp, seed=4)
    doc = run_once(inp.uri(), f"s3://{bucket}/runs", "r", strategy="balanced", keep_fraction=0.3)
    run = Store(f"s3://{bucket}/runs/r")
    dest = f"s3://{bucket}/pruned"
    got = prune.apply(run.uri(), dest, with_scores=True)
    out = Store(dest)
    res = output_table(out, got)
    want = table.filter(pc.is_in(table["id"], value_set=keep_ids(run, doc)))
    assert res.drop_columns(["cluster", "distance", "percentile"]).equals(want)
    assert got["rows"] == doc["rows_kept"] == int(0.3 * N)
    # resume on S3: a committed part replaced by other bytes stays as it is
    out.delete("_MANIFEST.json")
    out.delete("_commits/apply/shard-000001.json")
    out.put_bytes("part-000003.parquet", b"not rewritten")
    prune.apply(run.uri(), dest, with_scores=True)
    assert out.get_bytes("part-000003.parquet") == b"not rewritten"
    redone = hashlib.sha256(out.get_bytes("part-000001.parquet")).hexdigest()
    assert redone == got["files"][1]["sha256"]
    assert out.exists("_MANIFEST.json")
