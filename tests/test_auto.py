"""`auto`, the default rule: its keep list equals a brute-force single-process reference (with
its default dedup, with --dedup-eps, and with dedup off; ties included), it is the CLI's
default, and the manifest and the report explain the choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scoring.config import make_config
from scoring.storage import Store
from tests.helpers import clustered, read_all, reference_keep, write_dataset
from tests.ref6 import all_scores, dedup_survivors

N = 1500


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Clusters with planted near-duplicates (cosine >= 0.999) and exact copies: the copies
    tie in distance with their source, so ties are decided by id."""
    tmp = tmp_path_factory.mktemp("auto")
    rng = np.random.default_rng(11)
    x = clustered(N, 16, 5, seed=4)
    near = rng.choice(np.arange(N // 2, N), size=250, replace=False)
    x[near] = x[rng.integers(0, N // 2, 250)] * (1 + rng.normal(0, 1e-3, (250, 16)))
    exact = rng.choice(np.setdiff1d(np.arange(N // 2, N), near), size=100, replace=False)
    x[exact] = x[rng.integers(0, N // 2, 100)]
    ids = [int(i) for i in rng.permutation(10 * N)[:N]]  # ids unrelated to positions
    write_dataset(Store(str(tmp / "in")), x, ids, files=3, row_group_rows=90)
    return tmp, x, ids


def run_auto(tmp, run_id: str, **kw):
    from ray_jobs.driver import run

    cfg = make_config(
        dict(input=str(tmp / "in"), output=str(tmp / "out"), run_id=run_id, k=5,
             shard_rows=250, seed=3, quiet=True, **kw)
    )  # fmt: skip
    return cfg, run(cfg, quiet=True), Store(str(tmp / "out" / run_id))


def reference(runs: Store, x, ids, eps, n_keep: int, seed: int) -> tuple[set, int]:
    sc = all_scores(runs)
    sid, cl, dist = sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    pos = {v: i for i, v in enumerate(ids)}
    if eps is None:
        live = list(range(len(sid)))
    else:
        surv = dedup_survivors(sid, cl, dist, x[[pos[v] for v in sid]], eps)
        live = [i for i in range(len(sid)) if sid[i] in surv]
    m = min(n_keep, len(live))
    keep = reference_keep([sid[i] for i in live], cl[live], dist[live], "auto", m, seed)
    return keep, len(live)


@pytest.mark.parametrize("fraction", [0.2, 0.75])
def test_auto_with_its_default_dedup_equals_the_reference(ray_local, pool, fraction):
    tmp, x, ids = pool
    cfg, doc, runs = run_auto(tmp, f"auto-{fraction}", keep_fraction=fraction)
    assert cfg.strategy == "auto" and cfg.dedup_eps is None and cfg.effective_dedup_eps == 0.01
    want, live = reference(runs, x, ids, 0.01, doc["n_keep"], 3)
    got = read_all(runs, "keep")["id"].to_pylist()
    assert len(got) == len(set(got)) == len(want) == min(doc["n_keep"], live)
    assert set(got) == want
    assert 300 <= doc["dedup"]["removed"] == N - live  # the planted copies (and a few more)
    a = doc["auto"]
    assert a["within"] == "random" and a["kept_share"] == round(min(doc["n_keep"], live) / live, 6)
    assert a["dedup_eps"] == 0.01 and a["dedup_eps_source"] == "auto's default"
    assert a["quotas"] == "balanced" and str(live) in a["why"]
    # dedup needs the embeddings: auto saved them (one file per score shard) unasked
    assert runs.list("embeddings", suffix=".parquet") == [
        key.replace("scores/", "embeddings/") for key in runs.list("scores", suffix=".parquet")
    ]


def test_auto_with_a_given_eps_and_with_dedup_off(ray_local, pool):
    tmp, x, ids = pool
    _, doc, runs = run_auto(tmp, "auto-eps", keep_fraction=0.4, dedup_eps=0.0005)
    want, _ = reference(runs, x, ids, 0.0005, doc["n_keep"], 3)
    assert set(read_all(runs, "keep")["id"].to_pylist()) == want
    assert doc["auto"]["dedup_eps"] == 0.0005 and doc["auto"]["dedup_eps_source"] == "--dedup-eps"
    # off: no dedup at all, so no embeddings either; the copies' tied distances are kept or
    # dropped by their hash, ties by id
    _, doc, runs = run_auto(tmp, "auto-off", keep_fraction=0.7, dedup_eps="off")
    assert "dedup" not in doc and doc["auto"]["dedup_eps"] is None
    assert "off" in doc["auto"]["why"] and not runs.list("embeddings")
    want, _ = reference(runs, x, ids, None, doc["n_keep"], 3)
    assert set(read_all(runs, "keep")["id"].to_pylist()) == want


def test_the_cli_default_is_auto_and_explained(ray_local, pool):
    tmp, _, _ = pool
    env = dict(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "run", "--input", str(tmp / "in"),
         "--output", str(tmp / "out"), "--run-id", "cli-default", "--k", "5", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    runs = Store(str(tmp / "out" / "cli-default"))
    doc = json.loads(runs.get_bytes("_MANIFEST.json"))
    assert doc["strategy"] == "auto" and doc["n_keep"] == N // 2
    assert doc["auto"]["within"] == "random" and doc["dedup"]["eps"] == 0.01
    page = runs.get_bytes("report/index.html").decode()
    assert "why (auto)" in page and "stratified random sample" in page
    bad = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "run", "--input", str(tmp / "in"),
         "--output", str(tmp / "out"), "--dedup-eps", "sometimes"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--dedup-eps" in bad.stderr and "Traceback" not in bad.stderr
