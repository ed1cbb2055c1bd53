"""One test per bad input: exit status, one line naming the culprit, no traceback, nothing
committed (no _MANIFEST.json, no commit markers)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs import cli
from scoring.config import make_config
from scoring.storage import Store
from tests.helpers import clustered, emb_array, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray_mod(s3_server, ray_local):
    return ray_local


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    return rc, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("protoprune: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def nothing_committed(out: str, run_id: str = "r") -> None:
    run = os.path.join(out, run_id)
    assert not os.path.exists(os.path.join(run, "_MANIFEST.json"))
    commits = os.path.join(run, "_commits")
    assert not os.path.exists(commits) or not any(f for _, _, fs in os.walk(commits) for f in fs), (
        "commit markers were written"
    )


def good(tmp_path, n=300, d=8, files=2, seed=0, ids=None):
    store = Store(str(tmp_path / "in"))
    x = clustered(n, d, 4, seed)
    write_dataset(store, x, ids if ids is not None else list(range(n)), files=files)
    return store, x


def write_table(store: Store, key: str, table: pa.Table, rg: int = 50) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rg)
    store.put_bytes(key, buf.getvalue())


def base(tmp_path, *extra: str) -> list[str]:
    return [
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "r",
        "--k",
        "4",
        "--shard-rows",
        "100",
        "--quiet",
        *extra,
    ]


# -- before any work: plan and config ---------------------------------------------------------
def test_input_missing_subprocess(tmp_path):
    """A real process: exit 2, one line, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", *base(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    line = error_line(p.stderr)
    assert str(tmp_path / "in") in line and "no .parquet files" in line
    assert not (tmp_path / "out").exists()


def test_input_without_parquet(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hello")
    rc, err = run_cli(capsys, *base(tmp_path))
    assert rc == 2 and "no .parquet files" in error_line(err)
    nothing_committed(str(tmp_path / "out"))


def test_not_parquet(tmp_path, capsys):
    good(tmp_path)
    (tmp_path / "in" / "data" / "part-009.parquet").write_bytes(b"this is not parquet" * 10)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 2 and "part-009.parquet" in line and "not a valid Parquet file" in line
    nothing_committed(str(tmp_path / "out"))


@pytest.mark.parametrize("flag,col", [("--id-column", "uid"), ("--embedding-column", "vec")])
def test_missing_column(tmp_path, capsys, flag, col):
    good(tmp_path)
    rc, err = run_cli(capsys, *base(tmp_path, flag, col))
    line = error_line(err)
    assert rc == 2 and f"column '{col}' not found" in line and "part-000.parquet" in line
    nothing_committed(str(tmp_path / "out"))


@pytest.mark.parametrize("kind", ["strings", "scalar"])
def test_embedding_not_numeric_lists(tmp_path, capsys, kind):
    store = Store(str(tmp_path / "in"))
    emb = (
        pa.array([["a", "b"]] * 120, pa.list_(pa.string()))
        if kind == "strings"
        else pa.array(np.arange(120, dtype=np.float32))
    )
    write_table(store, "bad.parquet", pa.table({"id": list(range(120)), "embedding": emb}))
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 2 and "bad.parquet" in line and "column 'embedding'" in line
    assert "list of numbers" in line
    nothing_committed(str(tmp_path / "out"))


def test_mixed_fixed_widths(tmp_path, capsys):
    store = Store(str(tmp_path / "in"))
    for i, d in enumerate((8, 16)):
        x = clustered(120, d, 4, i)
        t = pa.table({"id": list(range(i * 120, (i + 1) * 120)), "embedding": emb_array(x)})
        write_table(store, f"f{i}.parquet", t)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 2 and "mixed embedding widths" in line
    assert "f0.parquet" in line and "f1.parquet" in line and "8" in line and "16" in line
    nothing_committed(str(tmp_path / "out"))


def test_zero_rows(tmp_path, capsys):
    store = Store(str(tmp_path / "in"))
    t = pa.table({"id": pa.array([], pa.int64()), "embedding": emb_array(np.zeros((0, 8)))})
    write_table(store, "empty.parquet", t)
    rc, err = run_cli(capsys, *base(tmp_path))
    assert rc == 2 and "zero rows" in error_line(err)
    nothing_committed(str(tmp_path / "out"))


def test_k_larger_than_rows(tmp_path, capsys):
    good(tmp_path, n=30, files=1)
    rc, err = run_cli(capsys, *base(tmp_path)[:-5], "--k", "31", "--quiet")
    line = error_line(err)
    assert rc == 2 and "k = 31" in line and "30" in line
    nothing_committed(str(tmp_path / "out"))


@pytest.mark.parametrize("frac", ["0", "1.5", "-0.1"])
def test_keep_fraction_out_of_range(tmp_path, capsys, frac):
    good(tmp_path)
    rc, err = run_cli(capsys, *base(tmp_path, "--keep-fraction", frac))
    line = error_line(err)
    assert rc == 2 and "keep_fraction" in line and frac in line
    assert not (tmp_path / "out").exists()


def test_output_not_writable(tmp_path, capsys):
    good(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    args = base(tmp_path)
    args[args.index("--output") + 1] = str(tmp_path / "blocker" / "out")
    rc, err = run_cli(capsys, *args)
    line = error_line(err)
    assert rc == 2 and str(tmp_path / "blocker") in line


def test_output_bucket_missing(tmp_path, capsys, s3_server):
    good(tmp_path)
    args = base(tmp_path)
    args[args.index("--output") + 1] = "s3://no-such-bucket-pp-test/runs"
    rc, err = run_cli(capsys, *args)
    line = error_line(err)
    assert rc == 2 and "s3://no-such-bucket-pp-test/runs" in line and "does not exist" in line


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        ("k: 4\nkeep_fractoin: 0.3\n", "keep_fractoin"),
        ("k: four\n", "'k'"),
        ("k: 4\nstrategy: hardest\n", "'strategy'"),
        ("k: [4\n", "not valid YAML"),
    ],
)
def test_bad_yaml(tmp_path, capsys, yaml_text, needle):
    good(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    args = [a for a in base(tmp_path) if a not in ("--k", "4")]
    rc, err = run_cli(capsys, *args, "--config", str(cfg))
    line = error_line(err)
    assert rc == 2 and needle in line and "c.yaml" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "x..y", "/abs", ""])
def test_run_id_validation(tmp_path, bad):
    if bad == "":
        # empty = a fresh UTC timestamp id, never a path component of its own
        assert make_config({"input": "i", "output": "o", "run_id": ""}).run_id.startswith("run-")
        return
    with pytest.raises(ValueError, match="run_id"):
        make_config({"input": "i", "output": "o", "run_id": bad})


def test_run_id_rejected_by_cli(tmp_path, capsys):
    good(tmp_path)
    args = base(tmp_path)
    args[args.index("--run-id") + 1] = "../../etc"
    rc, err = run_cli(capsys, *args)
    assert rc == 2 and "run_id" in error_line(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "etc").exists()


# -- found while reading the data (real Ray): exit 1, the failed shards and files named ------
def test_nan_in_embeddings(tmp_path, capsys, ray_mod):
    store, x = good(tmp_path, files=2)
    x = x.copy()
    x[250, 3] = np.nan  # row 250 lives in data/part-001.parquet
    write_dataset(store, x, list(range(300)), files=2)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 1 and "part-001.parquet" in line and "id 250" in line and "NaN or inf" in line
    nothing_committed(str(tmp_path / "out"))


def test_inf_in_embeddings(tmp_path, capsys, ray_mod):
    store, x = good(tmp_path, files=2)
    x = x.copy()
    x[17, 0] = np.inf
    write_dataset(store, x, list(range(300)), files=2)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 1 and "part-000.parquet" in line and "id 17" in line
    nothing_committed(str(tmp_path / "out"))


def test_null_ids(tmp_path, capsys, ray_mod):
    ids = list(range(300))
    ids[200] = None
    good(tmp_path, ids=ids)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 1 and "part-001.parquet" in line and "null id" in line and "'id'" in line
    nothing_committed(str(tmp_path / "out"))


def test_duplicate_ids(tmp_path, capsys, ray_mod):
    ids = list(range(300))
    ids[260] = 42  # 42 in part-000 row 42, and in part-001 row 110
    good(tmp_path, ids=ids)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 1 and "duplicate id" in line and "id 42 " in line
    assert "part-000.parquet row 42" in line and "part-001.parquet row 110" in line
    assert not (tmp_path / "out" / "r" / "_MANIFEST.json").exists()
    assert not list((tmp_path / "out" / "r").glob("keep/*"))


def test_duplicate_string_ids_within_one_shard(tmp_path, capsys, ray_mod):
    ids = [f"doc-{i}" for i in range(300)]
    ids[3] = "doc-7"
    good(tmp_path, ids=ids)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 1 and "'doc-7'" in line and "row 3 " in line and "row 7 " in line
    assert not (tmp_path / "out" / "r" / "_MANIFEST.json").exists()


def test_mixed_variable_widths(tmp_path, capsys, ray_mod):
    store = Store(str(tmp_path / "in"))
    for i, d in enumerate((8, 12)):
        x = clustered(150, d, 4, i)
        t = pa.table({"id": list(range(i * 150, (i + 1) * 150)), "embedding": emb_array(x, "list")})
        write_table(store, f"v{i}.parquet", t)
    rc, err = run_cli(capsys, *base(tmp_path))
    line = error_line(err)
    assert rc == 1 and "mixed embedding widths" in line
    assert "v0.parquet" in line and "v1.parquet" in line
    nothing_committed(str(tmp_path / "out"))


@pytest.mark.parametrize("kind", ["int", "str"])
def test_duplicate_check_by_hash_range_is_exact(tmp_path, kind):
    """No Ray: ids split over shards, checked range by range (many ranges, uint64 hashes above
    2**63 included): exactly the planted duplicates are found, each with all its places."""
    from scoring.stages.score import write_id_hashes
    from scoring.stages.stats import DuplicateIdsTask, duplicate_ids, hash_ranges

    store = Store(str(tmp_path))
    rng = np.random.default_rng(0)
    ids = rng.permutation(3000)[:900].tolist()
    planted = {ids[5]: [[0, 5], [2, 10]], ids[400]: [[1, 100], [1, 250], [2, 20]]}
    shards = [ids[0:300], ids[300:600], ids[600:900]]
    shards[2][10] = ids[5]
    shards[1][250] = ids[400]
    shards[2][20] = ids[400]
    conv = str if kind == "str" else int
    for i, s in enumerate(shards):
        write_id_hashes(store, i, pa.array([conv(v) for v in s]))
    ranges = hash_ranges(900, 70)
    assert len(ranges) == 13 and ranges[-1][1] == 2**64
    found = {}
    for lo, hi in ranges:
        got = duplicate_ids(DuplicateIdsTask(store, [0, 1, 2], lo, hi))
        assert got.count == len(got.examples)
        found.update({d["id"]: d["where"] for d in got.examples})
    assert found == {conv(k): v for k, v in planted.items()}
