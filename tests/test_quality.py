"""Quality on real data (scikit-learn's digits, shipped in the wheel): a pool with planted
near-duplicates. SemDeDup + balanced must beat random subsets of the same size on a held-out
set by a clear margin (linear probe via `evaluate`)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from scoring.config import make_config
from scoring.evaluate import evaluate_run
from scoring.storage import Store
from tests.helpers import emb_array

log = logging.getLogger(__name__)

MARGIN = 0.10  # measured: keep 0.94 vs random 0.70-0.75 (seeds 0-2)


def digits_pool(tmp):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    test, pool = perm[:500], perm[500:]
    # planted near-duplicates: 300 jittered copies of each of 20 pool images
    src = rng.choice(pool, size=20, replace=False)
    reps = np.repeat(src, 300)
    xd = x[reps] + rng.normal(0, 0.05, size=(len(reps), 64)).astype(np.float32)
    px = np.concatenate([x[pool], xd])
    py = np.concatenate([y[pool], y[reps]])
    order = rng.permutation(len(px))  # duplicates spread over every file and shard
    px, py = px[order], py[order]
    ids = np.arange(len(px), dtype=np.int64)
    inp = Store(str(tmp / "in"))
    for f, part in enumerate(np.array_split(np.arange(len(px)), 3)):
        t = pa.table({"id": ids[part], "embedding": emb_array(px[part]), "label": py[part]})
        inp.write_parquet(f"part-{f}.parquet", t, row_group_size=500)
    t = pa.table({"id": np.arange(len(test)), "embedding": emb_array(x[test]), "label": y[test]})
    Store(str(tmp / "test")).write_parquet("test.parquet", t)
    return len(px)


def test_dedup_balanced_beats_random_on_digits(ray_local, tmp_path):
    from ray_jobs.driver import run

    n = digits_pool(tmp_path)
    cfg = make_config(
        dict(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            run_id="q",
            k=20,
            strategy="balanced",
            keep_fraction=0.1,
            dedup_eps=0.001,
            label_column="label",
            shard_rows=1000,
            quiet=True,
        )
    )
    doc = run(cfg, quiet=True)
    assert doc["dedup"]["removed"] >= 0.95 * 20 * 299  # nearly every planted copy
    assert doc["rows_kept"] == int(0.1 * n)
    out = evaluate_run(str(tmp_path / "out" / "q"), "label", test_input=str(tmp_path / "test"))
    log.warning("digits quality: %s", out)
    print("digits quality:", out)
    assert out["keep_accuracy"] >= max(out["random_accuracy"]) + MARGIN


def clean_digits(tmp):
    """scikit-learn's digits as they are: 1,297 pool images in 3 files, 500 test images."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    test, pool = perm[:500], perm[500:]
    inp = Store(str(tmp / "in"))
    for f, part in enumerate(np.array_split(pool, 3)):
        t = pa.table({"id": part.astype(np.int64), "embedding": emb_array(x[part]),
                      "label": y[part]})  # fmt: skip
        inp.write_parquet(f"part-{f}.parquet", t, row_group_size=200)
    t = pa.table({"id": test.astype(np.int64), "embedding": emb_array(x[test]), "label": y[test]})
    Store(str(tmp / "test")).write_parquet("test.parquet", t)


def auto_against_random(tmp, run_id: str, fraction: float) -> dict:
    """The CLI default (`auto`, nothing else chosen) against 3 random subsets of its size."""
    from ray_jobs.driver import run

    cfg = make_config(
        dict(input=str(tmp / "in"), output=str(tmp / "out"), run_id=run_id, k=20,
             keep_fraction=fraction, label_column="label", shard_rows=1000, quiet=True)
    )  # fmt: skip
    assert cfg.strategy == "auto"
    run(cfg, quiet=True)
    out = evaluate_run(str(tmp / "out" / run_id), "label", test_input=str(tmp / "test"))
    print(run_id, out["summary"])
    return out


def test_auto_is_not_worse_than_random_on_clean_digits(ray_local, tmp_path):
    """The bar of docs/quality.md on a clean real pool: auto >= random - max(2 std, 0.3 points)
    at a small and a large keep fraction."""
    clean_digits(tmp_path)
    for fraction in (0.2, 0.7):
        out = auto_against_random(tmp_path, f"clean-{fraction}", fraction)
        tol = max(2 * out["random_std"], 0.003)
        assert out["keep_accuracy"] >= out["random_mean"] - tol, out["summary"]


def test_auto_beats_random_on_redundant_digits(ray_local, tmp_path):
    """On a redundant pool (jittered copies of 20 images), auto's default dedup pays: at 20%
    kept it beats random subsets of its size by more than a point."""
    digits_pool(tmp_path)
    out = auto_against_random(tmp_path, "redundant-0.2", 0.2)
    assert out["keep_accuracy"] >= out["random_mean"] + 0.01, out["summary"]
