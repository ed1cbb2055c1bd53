"""Difficulty percentiles: the histogram estimate is within 0.1% of the exact rank (ties by id)
against a full sort, with refinement levels exercised; end to end the column is in the
annotated scores and the keep list."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.config import make_config
from scoring.kernels.percentile import PercentileBins, level1_histogram, refine_histogram
from scoring.storage import Store
from tests.helpers import clustered, read_all, reference_keep, write_dataset
from tests.ref6 import all_scores, exact_ranks


def build(shards: list[np.ndarray]) -> PercentileBins:
    """The driver's protocol: level-1 histograms summed over shards, then refinements."""
    bins = PercentileBins(sum(level1_histogram(d) for d in shards))
    while (req := bins.refine_request()) is not None:
        prefixes, bits = req
        bins.apply_refinement(
            prefixes, bits, sum(refine_histogram(d, prefixes, bits) for d in shards)
        )
    return bins


def exact(dist: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.arange(len(dist)), dist.astype(np.float32)))
    r = np.empty(len(dist))
    r[order] = np.arange(len(dist))
    return r / (len(dist) - 1)


@pytest.mark.parametrize(
    "name",
    ["uniform", "narrow", "mixed"],
)
def test_estimate_within_tolerance(name):
    rng = np.random.default_rng(1)
    n = 60_000
    if name == "uniform":
        d = rng.uniform(0, 2, n)
    elif name == "narrow":  # most rows inside one level-1 bin: two refinements needed
        d = 0.5 + rng.uniform(0, 1e-3, n)
    else:
        d = np.concatenate([rng.exponential(0.2, n // 2), 0.3 + rng.normal(0, 1e-4, n // 2)])
    d = np.abs(d).astype(np.float32)
    shards = np.array_split(d, 7)
    bins = build(shards)
    got = np.concatenate([bins.percentile(s) for s in shards])
    err = np.abs(got - exact(d))
    assert err.max() <= 0.001, err.max()
    assert got.min() >= 0 and got.max() <= 1
    if name == "narrow":
        assert bins.levels == 3
    # a one-level histogram would not be enough here (the refinement matters)
    if name != "uniform":
        coarse = PercentileBins(level1_histogram(d))
        assert np.abs(coarse.percentile(d) - exact(d)).max() > 0.001


def test_exact_ties_get_their_mid_rank():
    d = np.array([0.1] * 10 + [0.2] * 5, np.float32)
    got = build([d[:7], d[7:]]).percentile(d)
    np.testing.assert_allclose(got[:10], 4.5 / 14, rtol=1e-6)
    np.testing.assert_allclose(got[10:], 12 / 14, rtol=1e-6)
    assert build([np.array([0.3], np.float32)]).percentile(np.array([0.3])).tolist() == [0.0]


def test_end_to_end_percentile_in_scores_and_keep(ray_local, tmp_path):
    from ray_jobs.driver import run

    x = clustered(2500, 8, 5, seed=11)
    ids = [f"row-{i:05d}" for i in range(2500)]  # string ids
    write_dataset(Store(str(tmp_path / "in")), x, ids, files=2, row_group_rows=90)
    cfg = make_config(
        dict(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            run_id="p",
            k=5,
            strategy="easy",
            keep_fraction=0.3,
            shard_rows=300,
            quiet=True,
        )
    )
    doc = run(cfg, quiet=True)
    runs = Store(str(tmp_path / "out" / "p"))
    sc = all_scores(runs)
    ref = exact_ranks(sc["id"].to_pylist(), sc["distance"].to_numpy())
    ann = read_all(runs, "annotated")
    assert ann.num_rows == len(ids) and "duplicate" not in ann.column_names
    for i, p in zip(ann["id"].to_pylist(), ann["percentile"].to_pylist()):
        assert abs(p - ref[i]) <= 0.001
    keep = read_all(runs, "keep")
    want = reference_keep(
        sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy(), "easy", 750
    )
    assert set(keep["id"].to_pylist()) == want and keep.num_rows == 750
    for i, p in zip(keep["id"].to_pylist(), keep["percentile"].to_pylist()):
        assert abs(p - ref[i]) <= 0.001
    assert doc["percentile"]["tolerance"] == 0.001
