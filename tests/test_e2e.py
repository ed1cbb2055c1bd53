"""End to end on a real local Ray and a real S3 API (moto_server): exact keep lists.

Every run is checked against single-process references: the scores against a brute-force
nearest-prototype search over all input rows with the committed centroids, the keep list
exactly against `reference_keep` over the written (id, cluster, distance) rows, and the
manifest against the files it names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pytest

from ray_jobs.driver import RunFailed, run
from scoring.config import RunConfig
from scoring.storage import Store
from tests.helpers import clustered, read_all, reference_keep, write_dataset

N, D, K = 3000, 16, 8


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_local):
    """moto first, so that the module's Ray workers inherit its endpoint and credentials."""
    return s3_server


def dataset(id_kind: str, seed: int = 0):
    """Clustered rows, a third of them exact copies of others (tied distances), shuffled ids."""
    rng = np.random.default_rng(seed)
    x = clustered(N, D, K, seed=seed)
    dup = rng.random(N) < 0.33
    x[dup] = x[rng.integers(0, N, size=int(dup.sum()))]
    perm = rng.permutation(N)
    if id_kind == "int":
        ids = (perm.astype(np.int64) - N // 2) * 1_000_003
    else:
        ids = np.array([f"row-{p:05d}-{'é' if p % 3 else 'z'}" for p in perm], dtype=object)
    return ids.tolist(), x


def brute_nearest(x: np.ndarray, c: np.ndarray, metric: str):
    x, c = x.astype(np.float64), c.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1.0 - x @ c.T
    else:
        d = np.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1))
    return d


def check_run(cfg: RunConfig, doc: dict, ids: list, x: np.ndarray, n_files: int) -> None:
    """Every output of a committed run against single-process references."""
    store = Store(cfg.output).child(cfg.run_id)
    n = len(ids)
    # manifest on disk == returned document
    on_disk = json.loads(store.get_bytes("_MANIFEST.json"))
    assert on_disk["rows_in"] == doc["rows_in"] == n
    n_keep = cfg.n_keep(n)
    assert on_disk["rows_kept"] == doc["rows_kept"] == n_keep
    assert on_disk["strategy"] == cfg.strategy and on_disk["k"] == cfg.k
    run_json = json.loads(store.get_bytes("run.json"))
    assert len({s["file"] for s in run_json["shards"]}) == n_files
    assert run_json["input"]["rows"] == n

    # scores: every input id exactly once
    scores = read_all(store, "scores/")
    sid = scores["id"].to_pylist()
    assert len(sid) == len(set(sid)) == n and set(sid) == set(ids)
    assert scores.schema.field("cluster").type == pa.int32()
    assert scores.schema.field("distance").type == pa.float32()
    markers = store.list("_commits/scores/")
    assert len(markers) == len(run_json["shards"]) == len(store.list("scores/"))

    # scores against a brute-force search with the committed centroids
    c = np.load(io.BytesIO(store.get_bytes("prototypes/centroids.npy")))
    assert c.shape == (cfg.k, D)
    if cfg.metric == "cosine":
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    pos = {v: i for i, v in enumerate(ids)}
    order = np.array([pos[v] for v in sid])
    full = brute_nearest(x[order], c, cfg.metric)
    cl = scores["cluster"].to_numpy()
    dist = scores["distance"].to_numpy()
    best = full.min(1)
    np.testing.assert_allclose(dist, best, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(full[np.arange(n), cl], best, atol=2e-5, rtol=1e-5)
    assert (cl == full.argmin(1)).mean() > 0.99

    # the keep list: exactly the single-process pick over the written scores
    keep_store = store.child("keep")
    if n_keep == 0:
        assert store.list("keep/") == [] and doc["files"] == []
        assert doc["clusters"]["kept"] == [0] * cfg.k
        return
    keep = read_all(store, "keep/")
    kid = keep["id"].to_pylist()
    assert len(kid) == len(set(kid)) == n_keep
    want = reference_keep(sid, cl, dist, cfg.strategy, n_keep, cfg.seed)
    assert set(kid) == want
    assert set(keep.column_names) >= {"id", "cluster", "distance"}

    # manifest: per-cluster counts and files with row counts and sha256 of their bytes
    assert doc["clusters"]["rows"] == np.bincount(cl, minlength=cfg.k).tolist()
    assert (
        doc["clusters"]["kept"] == np.bincount(keep["cluster"].to_numpy(), minlength=cfg.k).tolist()
    )
    assert sorted(f["path"] for f in doc["files"]) == store.list("keep/")
    assert [f["path"] for f in doc["files"]] == sorted(f["path"] for f in doc["files"])
    for f in doc["files"]:
        data = store.get_bytes(f["path"])
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        assert len(data) == f["bytes"]
        assert keep_store.read_parquet(f["path"].removeprefix("keep/")).num_rows == f["rows"]
    assert sum(f["rows"] for f in doc["files"]) == n_keep


CASES = [
    # where, id kind, embedding list kind, value type, metric, strategy
    ("s3", "int", "fixed", pa.float32(), "cosine", "hard"),
    ("s3", "str", "list", pa.float16(), "l2", "balanced"),
    ("local", "int", "large", pa.float64(), "cosine", "easy"),
    ("local", "str", "list", pa.float32(), "cosine", "random"),
    ("local", "int", "fixed", pa.float64(), "l2", "balanced"),
    ("s3", "str", "fixed", pa.float32(), "cosine", "auto"),  # dedup off: see test_auto.py
]


@pytest.mark.parametrize("where,id_kind,kind,dtype,metric,strategy", CASES)
def test_end_to_end_exact(ray_s3, tmp_path, where, id_kind, kind, dtype, metric, strategy):
    ids, x = dataset(id_kind, seed=len(strategy))
    x = x.astype(dtype.to_pandas_dtype()).astype(np.float32)  # what the files hold
    if where == "s3":
        bucket = ray_s3.new_bucket()
        inp, out = f"s3://{bucket}/dataset", f"s3://{bucket}/runs"
    else:
        inp, out = str(tmp_path / "dataset"), str(tmp_path / "runs")
    write_dataset(Store(inp), x, ids, files=3, kind=kind, dtype=dtype)
    cfg = RunConfig(
        input=inp,
        output=out,
        run_id=f"t-{strategy}",
        k=K,
        metric=metric,
        kmeans_iters=5,
        sample_size=1200,
        shard_rows=600,  # two shards per file
        strategy=strategy,
        keep_fraction=0.3,
        seed=3,
        quiet=True,
        dedup_eps="off" if strategy == "auto" else None,
    )
    doc = run(cfg, quiet=True)
    check_run(cfg, doc, ids, x, n_files=3)
    # a rerun of a committed run returns the same manifest without recomputing
    assert run(cfg, quiet=True)["files"] == doc["files"]


@pytest.mark.parametrize("strategy,id_kind", [("hard", "int"), ("easy", "str"), ("random", "str")])
def test_global_rule_with_many_select_passes(ray_local, tmp_path, monkeypatch, strategy, id_kind):
    """A 3-row gather cap forces the radix select through every digit: the first digit's
    histogram comes from the range pass (no read), the others from the annotated parts."""
    import functools

    import ray_jobs.reduce as reduce_mod

    monkeypatch.setattr(
        reduce_mod, "ThresholdSearch", functools.partial(reduce_mod.ThresholdSearch, gather_cap=3)
    )
    ids, x = dataset(id_kind, seed=11)
    inp = str(tmp_path / "dataset")
    write_dataset(Store(inp), x, ids, files=2)
    cfg = RunConfig(
        input=inp,
        output=str(tmp_path / "runs"),
        run_id="passes",
        k=K,
        kmeans_iters=3,
        sample_size=800,
        shard_rows=700,
        strategy=strategy,
        keep_fraction=0.37,
        quiet=True,
    )
    doc = run(cfg, quiet=True)
    check_run(cfg, doc, ids, x, n_files=2)
    assert doc["select_passes"] >= 2  # the seeded digit, then reads of the annotated parts


@pytest.mark.parametrize("keep_count,strategy", [(0, "balanced"), (N, "hard")])
def test_keep_count_edges(ray_s3, tmp_path, keep_count, strategy):
    ids, x = dataset("int", seed=9)
    inp = str(tmp_path / "dataset")
    write_dataset(Store(inp), x, ids, files=2)
    cfg = RunConfig(
        input=inp,
        output=str(tmp_path / "runs"),
        run_id="edge",
        k=K,
        kmeans_iters=3,
        sample_size=800,
        shard_rows=700,
        strategy=strategy,
        keep_count=keep_count,
        quiet=True,
    )
    doc = run(cfg, quiet=True)
    check_run(cfg, doc, ids, x, n_files=2)


def test_bad_embedding_names_file_and_id_and_commits_nothing(ray_s3, tmp_path):
    ids, x = dataset("int", seed=5)
    bad = ids[2500]  # a row of the last of three files
    x[2500, 3] = np.nan
    inp = str(tmp_path / "dataset")
    write_dataset(Store(inp), x, ids, files=3)
    cfg = RunConfig(
        input=inp, output=str(tmp_path / "runs"), run_id="bad", k=K, kmeans_iters=2,
        sample_size=900, shard_rows=600, quiet=True,
    )  # fmt: skip
    with pytest.raises((ValueError, RunFailed)) as e:
        run(cfg, quiet=True)
    msg = str(e.value)
    assert "part-002.parquet" in msg and "NaN" in msg and str(bad) in msg
    assert not Store(cfg.output).child("bad").exists("_MANIFEST.json")


def test_rerun_resumes_only_what_is_missing(ray_s3, tmp_path):
    ids, x = dataset("str", seed=4)
    inp = str(tmp_path / "dataset")
    write_dataset(Store(inp), x, ids, files=2)
    cfg = RunConfig(
        input=inp, output=str(tmp_path / "runs"), run_id="resume", k=K, kmeans_iters=3,
        sample_size=800, shard_rows=600, strategy="hard", keep_fraction=0.4, quiet=True,
    )  # fmt: skip
    first = run(cfg, quiet=True)
    store = Store(cfg.output).child("resume")
    keep1 = set(read_all(store, "keep/")["id"].to_pylist())
    # an interrupted run: no manifest, no keep list, one shard's score marker missing
    store.delete("_MANIFEST.json")
    store.delete("keep")
    store.delete("_commits/scores/shard-000001.json")
    kept_scores = {k: store.info(k)["mtime"] for k in store.list("scores/") if "000001" not in k}
    second = run(cfg, quiet=True)
    check_run(cfg, second, ids, x, n_files=2)
    assert set(read_all(store, "keep/")["id"].to_pylist()) == keep1
    assert second["prototypes_sha256"] == first["prototypes_sha256"]
    assert {k: store.info(k)["mtime"] for k in kept_scores} == kept_scores  # not rescored
    # the same run id with another config is refused, naming what changed
    with pytest.raises(ValueError, match="different config.*strategy"):
        run(dataclasses.replace(cfg, strategy="easy"), quiet=True)


def test_mixed_id_types_are_refused_at_plan_time(tmp_path):
    from ray_jobs.driver import Run

    x = clustered(40, D, 2)
    store = Store(str(tmp_path / "in"))
    write_dataset(store, x[:20], list(range(20)), files=1, prefix="a")
    write_dataset(store, x[20:], [f"s{i}" for i in range(20)], files=1, prefix="b")
    cfg = RunConfig(input=store.url, output=str(tmp_path / "out"), run_id="m", k=2)
    with pytest.raises(ValueError, match=r"b/part-000.parquet: column 'id' is string, but int64"):
        Run(cfg, quiet=True).plan()
    assert not os.path.exists(tmp_path / "out")


# -- the command line, in subprocesses --------------------------------------------------------
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # each command starts its own embedded Ray ...
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="pp-cli-", dir="/tmp")  # ... in a private dir
    return env


def cli(*args: str, module: str = "ray_jobs.cli", env=None) -> subprocess.CompletedProcess:
    own = env is None
    env = env or cli_env()
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        if own:
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def demo_dir():
    d = tempfile.mkdtemp(prefix="pp-demo-")
    p = cli("demo", os.path.join(d, "data"), "--rows", "3000", "--dim", "16", "--clusters", "8")
    assert p.returncode == 0, p.stderr
    assert "wrote 3000 rows in 4 files" in p.stdout
    yield os.path.join(d, "data")
    shutil.rmtree(d, ignore_errors=True)


def test_cli_run_with_yaml_and_overriding_flags(demo_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"input: {demo_dir}\nk: 4\nkmeans-iters: 3\nsample_size: 1000\nshard_rows: 500\n"
        "strategy: hard\nkeep_fraction: 0.5\n"
    )
    env = cli_env()
    out = str(tmp_path / "runs")
    p = cli(
        "run", "--config", str(cfg), "--output", out, "--run-id", "cli", "--k", "8",
        "--strategy", "balanced", "--keep-count", "700", "--quiet", env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line["rows_in"] == 3000 and line["rows_kept"] == 700
    assert line["strategy"] == "balanced" and line["run"].endswith("/cli")
    store = Store(out).child("cli")
    man = json.loads(store.get_bytes("_MANIFEST.json"))
    assert (man["k"], man["strategy"], man["rows_kept"]) == (8, "balanced", 700)
    conf = json.loads(store.get_bytes("run.json"))["config"]
    # YAML values where no flag was given; flags win; --keep-count replaces YAML's fraction
    assert (conf["kmeans_iters"], conf["sample_size"], conf["shard_rows"]) == (3, 1000, 500)
    assert (conf["keep_fraction"], conf["keep_count"]) == (None, 700)
    scores = read_all(store, "scores/")
    keep = read_all(store, "keep/")
    want = reference_keep(
        scores["id"].to_pylist(),
        scores["cluster"].to_numpy(),
        scores["distance"].to_numpy(),
        "balanced",
        700,
    )
    assert set(keep["id"].to_pylist()) == want
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_prune_module_entry_point(demo_dir, tmp_path):
    env = cli_env()
    out = str(tmp_path / "runs")
    p = cli(
        "--input", demo_dir, "--output", out, "--run-id", "job", "--k", "8",
        "--kmeans-iters", "3", "--strategy", "random", "--keep-fraction", "0.1", "--quiet",
        "--workers", "3",  # more than the 2 CPUs: must not wait for an actor that never starts
        module="ray_jobs.prune", env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    man = json.loads(Store(out).child("job").get_bytes("_MANIFEST.json"))
    assert (man["rows_in"], man["rows_kept"], man["strategy"]) == (3000, 300, "random")
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_cli_bad_column_is_one_line_error(demo_dir, tmp_path):
    out = str(tmp_path / "runs")
    p = cli("run", "--input", demo_dir, "--output", out, "--id-column", "nope", "--k", "8")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "column 'nope' not found" in p.stderr and "part-00000.parquet" in p.stderr
    assert not os.path.exists(out) or not any("_MANIFEST.json" in f for _, _, f in os.walk(out))


def test_cli_bad_keep_fraction_names_the_key(tmp_path):
    p = cli("run", "--input", "x", "--output", str(tmp_path), "--keep-fraction", "1.5")
    assert p.returncode == 2 and "keep_fraction" in p.stderr and "Traceback" not in p.stderr
