"""End to end: raw text and images embedded on Ray actors in the scoring pass (real Ray, real
S3 API on loopback, the real all-MiniLM-L6-v2, a tiny CNN through module:factory)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch

from scoring.config import make_config
from scoring.embed import autocast_dtype
from scoring.kernels.sampling import sample_plan
from scoring.storage import Store
from tests import tiny_cnn
from tests.helpers import read_all
from tests.test_embed import images, minilm_path, texts, write

# Workers inherit the environment at ray.init: preprocess logs every image it embeds here.
CNN_LOG = os.path.join(tempfile.mkdtemp(prefix="pp-cnn-"), "embedded.log")
os.environ["PP_TINY_CNN_LOG"] = CNN_LOG


def run_cfg(**kw):
    from ray_jobs.driver import run

    cfg = make_config(dict(quiet=True, **kw))
    return cfg, run(cfg, quiet=True)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check_scores(run_store: Store, ids: list, ref: np.ndarray) -> None:
    """Every row's cluster equals the nearest committed prototype of the reference embedding,
    and its distance is within 2e-3 of 1 - cos."""
    c = np.load(io.BytesIO(run_store.get_bytes("prototypes/centroids.npy")))
    d_ref = 1.0 - unit(ref) @ unit(c).T
    scores = read_all(run_store, "scores")
    got = dict(
        zip(
            scores["id"].to_pylist(),
            zip(scores["cluster"].to_pylist(), scores["distance"].to_pylist()),
        )
    )
    assert sorted(got) == sorted(ids)  # every id once
    for i, row in zip(ids, d_ref):
        cl, dist = got[i]
        assert cl == int(row.argmin()), (i, cl, int(row.argmin()), row)
        assert abs(dist - row.min()) <= 2e-3, (i, dist, row.min())


def shard_groups(run_store: Store) -> list[tuple[str, list[int]]]:
    """(file, row_groups) of each shard, from run.json."""
    doc = json.loads(run_store.get_bytes("run.json"))
    return [(s["file"], list(range(*s["row_groups"]))) for s in doc["shards"]]


def test_text_run_scores_equal_encode(s3_server, ray_local):
    from sentence_transformers import SentenceTransformer

    bucket = s3_server.new_bucket()
    inp = Store(f"s3://{bucket}/text")
    t = texts(240)
    ids = list(range(1000, 1240))
    for f in range(2):
        sl = slice(120 * f, 120 * (f + 1))
        write(inp, f"part-{f}.parquet", pa.table({"id": ids[sl], "body": t[sl]}), rg=30)
    model = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    dtype = autocast_dtype("cpu")
    # the reference: bare encode of each shard's texts, at the run's precision
    by_file = {f"part-{f}.parquet": t[120 * f : 120 * (f + 1)] for f in range(2)}
    for run_id, sample_size in (("whole-sample", None), ("part-sample", 40)):
        cfg, doc = run_cfg(
            input=inp.url,
            output=f"s3://{bucket}/runs",
            run_id=run_id,
            text_column="body",
            model=minilm_path(),
            workers=1,  # one MiniLM per test run: the machine has 2 cores
            k=4,
            sample_size=sample_size,
            shard_rows=60,
            strategy="hard",
            keep_fraction=0.25,
        )
        assert doc["rows_in"] == 240 and doc["rows_kept"] == 60
        run_store = Store(f"s3://{bucket}/runs/{run_id}")
        ref_parts = []
        for file, groups in shard_groups(run_store):
            rows = [t for g in groups for t in by_file[file][30 * g : 30 * (g + 1)]]
            with torch.inference_mode(), torch.autocast("cpu", dtype, enabled=dtype is not None):
                ref_parts.append(model.encode(rows, batch_size=128, convert_to_numpy=True))
        check_scores(run_store, ids, np.concatenate(ref_parts))


def test_image_runs_bytes_and_paths(s3_server, ray_local, tmp_path):
    from PIL import Image

    n = 90
    blobs = images(n, "PNG")[:45] + images(n, "JPEG", seed=1)[45:]
    ids = [f"img-{i:03d}" for i in range(n)]
    model, pre = tiny_cnn.factory()
    dtype = autocast_dtype("cpu")
    with torch.inference_mode(), torch.autocast("cpu", dtype, enabled=dtype is not None):
        ref = model(torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]))
    ref = ref.float().numpy()

    # bytes in a local Parquet folder; the sample covers every row
    local = Store(str(tmp_path / "in"))
    write(local, "a.parquet", pa.table({"id": ids[:50], "img": blobs[:50]}), rg=25)
    write(local, "b.parquet", pa.table({"id": ids[50:], "img": blobs[50:]}), rg=25)
    open(CNN_LOG, "w").close()
    _, doc = run_cfg(
        input=local.url,
        output=str(tmp_path / "runs"),
        run_id="bytes",
        image_column="img",
        model="tests.tiny_cnn:factory",
        k=3,
        shard_rows=25,
        strategy="balanced",
        keep_fraction=0.5,
        embed_batch_size=8,
    )
    assert doc["rows_in"] == n and doc["rows_kept"] == n // 2
    check_scores(Store(str(tmp_path / "runs" / "bytes")), ids, ref)
    with open(CNN_LOG) as f:
        assert len(f.readlines()) == n  # embedded once: the score stage reused the sample's

    # paths (relative keys and full s3:// URLs) to image files inside an S3 input
    bucket = s3_server.new_bucket()
    inp = Store(f"s3://{bucket}/imgs")
    paths = []
    for i, b in enumerate(blobs):
        key = f"files/{ids[i]}.bin"
        inp.put_bytes(key, b)
        paths.append(inp.uri(key) if i % 3 == 0 else key)
    write(inp, "index.parquet", pa.table({"id": ids, "path": paths}), rg=30)
    open(CNN_LOG, "w").close()
    _, doc = run_cfg(
        input=inp.url,
        output=f"s3://{bucket}/runs",
        run_id="paths",
        image_column="path",
        model="tests.tiny_cnn:factory",
        k=3,
        sample_size=12,
        shard_rows=30,
        strategy="hard",
        keep_count=10,
    )
    assert doc["rows_in"] == n and doc["rows_kept"] == 10
    check_scores(Store(f"s3://{bucket}/runs/paths"), ids, ref)
    partial = [c for c in sample_plan([30, 30, 30], 12, seed=0) if 0 < c < 30]  # 1 group a shard
    with open(CNN_LOG) as f:
        assert len(f.readlines()) == n + sum(partial)  # sample rows, then every row once


def test_undecodable_image_fails_the_run_naming_file_and_id(ray_local, tmp_path):
    blobs = images(20, "PNG")
    blobs[13] = b"GIF89a but not really"
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": list(range(20)), "img": blobs}), rg=10)
    from ray_jobs.driver import RunFailed
    from scoring import commit, layout

    with pytest.raises(
        RunFailed,
        match=r"1 shard\(s\) failed in prototypes.*a.parquet \(shard 1\): column 'img' id 13: "
        r"cannot decode image",
    ):
        run_cfg(
            input=store.url,
            output=str(tmp_path / "runs"),
            run_id="bad",
            image_column="img",
            model="tests.tiny_cnn:factory",
            k=2,
            shard_rows=10,
        )
    runs = Store(str(tmp_path / "runs" / "bad"))
    assert not runs.exists("_MANIFEST.json")
    # recorded like a bad shard of precomputed embeddings, for `protoprune status`
    assert list(commit.failures(runs, "prototypes")) == [layout.shard_name(1)]


def test_worker_resources(ray_local, tmp_path):
    from ray_jobs.scheduler import worker_resources

    base = dict(input=str(tmp_path), output=str(tmp_path / "o"), run_id="r")
    cfg = make_config(base)
    assert worker_resources(cfg, 10) == (2, {"num_gpus": 0.0, "num_cpus": 1.0}, False)
    cfg = make_config(dict(base, cpus_per_worker=2))
    assert worker_resources(cfg, 10) == (1, {"num_gpus": 0.0, "num_cpus": 2}, False)
    assert worker_resources(make_config(dict(base, workers=5)), 3)[0] == 2  # capped: 2 CPUs
    assert worker_resources(make_config(dict(base, workers=2)), 1)[0] == 1  # one shard
    # fewer shards than CPUs: a worker takes the spare CPUs (precomputed embeddings only)
    assert worker_resources(make_config(base), 1) == (
        1,
        {"num_gpus": 0.0, "num_cpus": 2.0},
        False,
    )
    model = dict(base, image_column="img", model="tests.tiny_cnn:factory")
    assert worker_resources(make_config(model), 1) == (1, {"num_gpus": 0.0, "num_cpus": 1.0}, False)
    with pytest.raises(ValueError, match="gpus_per_worker = 0.5 but the Ray cluster has no GPU"):
        worker_resources(make_config(dict(base, gpus_per_worker=0.5)), 10)


def test_widest():
    from ray_jobs.placement import Node, widest

    nodes = [Node(8, 0), Node(4, 0)]
    assert [widest(nodes, n) for n in (1, 2, 3, 4, 6, 12, 20)] == [8, 4, 4, 2, 2, 1, 1]


def cli_run(store: Store, tmp_path, *args: str, timeout: int = 120):
    """`python -m ray_jobs.cli run` on `store` into tmp_path/runs, in a subprocess."""
    env = dict(
        os.environ,
        PYTHONPATH=os.path.dirname(os.path.dirname(__file__)),
        RAY_AUTH_MODE="disabled",
    )
    cmd = [sys.executable, "-m", "ray_jobs.cli", "run", "--input", store.url, "--output",
           str(tmp_path / "runs"), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_missing_text_column(tmp_path):
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]}))
    r = cli_run(store, tmp_path, "--text-column", "body", "--model", minilm_path(), "--k", "2")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert (
        err[-1].startswith("protoprune: error: ")
        and "a.parquet: column 'body' not found" in err[-1]
    )
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("_MANIFEST.json"))


def test_cli_unknown_model_fails_before_any_actor(tmp_path):
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]}))
    for model, msg in (
        ("no-such-model-xyz", "model 'no-such-model-xyz': not a local folder nor a model"),
        ("tests.tiny_cnn:missing", "model 'tests.tiny_cnn:missing': module 'tests.tiny_cnn' has"),
    ):
        r = cli_run(store, tmp_path, "--text-column", "text", "--model", model, "--k", "2")
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("protoprune: error: ") and msg in last, last
        assert "Traceback" not in r.stderr


def test_cli_model_failing_on_the_workers_is_one_line(tmp_path):
    """The spec passes the driver's checks but the factory raises inside every actor: one
    line naming the model and the cause, exit 2, no traceback, nothing committed."""
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": list(range(40)), "text": ["t"] * 40}))
    r = cli_run(store, tmp_path, "--run-id", "r", "--text-column", "text", "--model",
                "tests.tiny_cnn:broken_factory", "--k", "2", "--quiet", timeout=180)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "protoprune: error: model 'tests.tiny_cnn:broken_factory' failed to load on a worker "
        "(ValueError: weights file tiny.bin is truncated)"
    ], r.stderr
    run = tmp_path / "runs" / "r"
    assert not (run / "_MANIFEST.json").exists() and not list(run.rglob("_commits/**/*.json"))
