"""--label-column counts in the manifest and `protoprune evaluate` (CLI, real run, real probe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from scoring.config import make_config
from scoring.kernels.devices import normalize
from scoring.storage import Store
from tests.helpers import emb_array, read_all, ref_hash


def write_labelled(store: Store, x: np.ndarray, ids, labels, files: int = 2) -> None:
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        t = pa.table(
            {"id": pa.array(ids[a:b]), "embedding": emb_array(x[a:b]), "label": labels[a:b]}
        )
        store.write_parquet(f"part-{f}.parquet", t, row_group_size=100)


@pytest.fixture(scope="module")
def labelled_run(ray_local, tmp_path_factory):
    from ray_jobs.driver import run

    tmp = tmp_path_factory.mktemp("ev")
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(6, 10))
    lab = rng.integers(0, 6, size=1500)
    x = (centers[lab] + 0.8 * rng.normal(size=(1500, 10))).astype(np.float32)
    names = np.array(["cat", "dog", "eel", "fox", "gnu", "hen"])[lab]
    ids = list(range(1500))
    write_labelled(Store(str(tmp / "in")), x, ids, list(names))
    cfg = make_config(
        dict(
            input=str(tmp / "in"),
            output=str(tmp / "out"),
            run_id="ev",
            k=6,
            strategy="balanced",
            keep_fraction=0.4,
            label_column="label",
            shard_rows=300,
            quiet=True,
        )
    )
    doc = run(cfg, quiet=True)
    return tmp, x, ids, names, doc


def test_label_counts_before_and_after(labelled_run):
    tmp, _, _, names, doc = labelled_run
    runs = Store(str(tmp / "out" / "ev"))
    keep = read_all(runs, "keep")
    assert doc["labels"]["column"] == "label"
    assert doc["labels"]["before"] == dict(sorted(Counter(names.tolist()).items()))
    assert doc["labels"]["after"] == {
        k: v for k, v in sorted(Counter(keep["label"].to_pylist()).items())
    }
    assert sum(doc["labels"]["after"].values()) == doc["rows_kept"] == 600
    # labels flow into the scores, aligned with their ids
    sc = read_all(runs, "scores")
    assert all(names[i] == lab for i, lab in zip(sc["id"].to_pylist(), sc["label"].to_pylist()))


def _cli(*args: str):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_evaluate_cli_matches_an_independent_probe(labelled_run):
    from sklearn.linear_model import LogisticRegression

    tmp, x, ids, names, _ = labelled_run
    run_dir = str(tmp / "out" / "ev")
    p = _cli("evaluate", run_dir, "--label-column", "label")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["random_accuracy"]) == 3
    # recompute the keep list's accuracy independently: hash split, then a plain probe
    keep = set(read_all(Store(run_dir), "keep")["id"].to_pylist())
    test = np.array([ref_hash(i, 0x5EED) < int(0.2 * 2.0**64) for i in ids])
    tr = np.array([i in keep for i in ids]) & ~test
    xn = normalize(x)
    clf = LogisticRegression(max_iter=2000).fit(xn[tr], names[tr])
    acc = float((clf.predict(xn[test]) == names[test]).mean())
    assert out["train_rows"] == int(tr.sum()) and out["test_rows"] == int(test.sum())
    assert abs(out["keep_accuracy"] - acc) < 1e-6
    assert all(0.3 < a <= 1 for a in out["random_accuracy"])


def test_evaluate_seeds_from_the_cli(labelled_run):
    """--seeds N: N random subsets of the keep list's size, their mean and sample std (checked
    against independent probes on the same subsets); --seeds 0: the keep list alone."""
    from sklearn.linear_model import LogisticRegression

    tmp, x, ids, names, _ = labelled_run
    run_dir = str(tmp / "out" / "ev")
    p = _cli("evaluate", run_dir, "--label-column", "label", "--seeds", "2")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["random_accuracy"]) == 2 and out["random_size"] == out["train_rows"]
    test = np.array([ref_hash(i, 0x5EED) < int(0.2 * 2.0**64) for i in ids])
    pool = np.flatnonzero(~test)
    xn = normalize(x)
    accs = []
    for s in range(2):  # the documented subsets: numpy default_rng(s), without replacement
        pick = np.random.default_rng(s).choice(pool, size=out["train_rows"], replace=False)
        clf = LogisticRegression(max_iter=2000).fit(xn[pick], names[pick])
        accs.append(float((clf.predict(xn[test]) == names[test]).mean()))
    np.testing.assert_allclose(out["random_accuracy"], accs, atol=1e-6)
    assert abs(out["random_mean"] - np.mean(accs)) < 1e-6
    assert abs(out["random_std"] - np.std(accs, ddof=1)) < 1e-6
    assert f"2 subset(s) of {out['train_rows']} rows" in p.stderr
    p = _cli("evaluate", run_dir, "--label-column", "label", "--seeds", "0")
    assert p.returncode == 0, p.stderr
    out0 = json.loads(p.stdout.strip().splitlines()[-1])
    assert out0["random_accuracy"] == [] and out0["random_mean"] is None
    assert out0["keep_accuracy"] == out["keep_accuracy"]
    p = _cli("evaluate", run_dir, "--label-column", "label", "--seeds", "-1")
    assert p.returncode == 2 and "--seeds" in p.stderr and "Traceback" not in p.stderr


def test_evaluate_errors_are_one_line(labelled_run, tmp_path):
    tmp, *_ = labelled_run
    p = _cli("evaluate", str(tmp_path), "--label-column", "label")
    assert p.returncode == 2 and "_MANIFEST.json" in p.stderr and "Traceback" not in p.stderr
    p = _cli("evaluate", str(tmp / "out" / "ev"), "--label-column", "species")
    assert p.returncode == 2 and "'species'" in p.stderr and "Traceback" not in p.stderr


def test_run_with_a_missing_label_column_fails_naming_it(labelled_run, tmp_path):
    tmp, *_ = labelled_run
    p = _cli(
        "run", "--input", str(tmp / "in"), "--output", str(tmp_path), "--run-id", "bad",
        "--k", "3", "--label-column", "species", "--quiet",
    )  # fmt: skip
    assert p.returncode == 2 and "'species'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "bad" / "_MANIFEST.json").exists()
