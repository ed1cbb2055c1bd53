"""SemDeDup: blocked flags equal the brute-force similarity matrix; end to end through Ray the
duplicate column, the manifest counts and the keep lists of every rule equal a single-process
reference (clusters split across shards)."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.config import make_config
from scoring.kernels.dedup import duplicate_flags
from scoring.storage import Store
from tests.helpers import clustered, read_all, reference_keep, write_dataset
from tests.ref6 import all_scores, dedup_survivors


def planted(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    src = rng.integers(0, n // 2, size=n // 3)
    dst = rng.choice(np.arange(n // 2, n), size=n // 3, replace=False)
    x[dst] = x[src] + rng.normal(size=(len(dst), d)).astype(np.float32) * 0.02
    return x


def brute(x: np.ndarray, eps: float) -> np.ndarray:
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    s = u @ u.T
    return np.array([i > 0 and s[i, :i].max() >= 1 - eps for i in range(len(x))])


@pytest.mark.parametrize("block", [1, 3, 16, 64, 10_000])
@pytest.mark.parametrize("eps", [0.0005, 0.01, 0.3])
def test_blocked_flags_equal_brute_force(block, eps):
    x = planted(150, 12, seed=block)
    got = duplicate_flags(x, eps, block=block)
    want = brute(x, eps)
    assert want.sum() > 0 and (~want).sum() > 0
    np.testing.assert_array_equal(got, want)


def test_threshold_boundary_is_decided_in_float64():
    """Similarity within 1e-9 of 1 - eps: float32 products cannot tell, float64 can."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    s = u @ u.T
    j = 17
    target = float(s[j, :j].max())
    for delta, expect_dup in ((1e-9, True), (-1e-9, False)):
        eps = 1.0 - target + delta
        want = brute(x, eps)
        assert bool(want[j]) == expect_dup
        np.testing.assert_array_equal(duplicate_flags(x, eps, block=4), want)


def test_identical_rows_and_single_row():
    x = np.ones((5, 4), np.float32)
    np.testing.assert_array_equal(duplicate_flags(x, 0.0, block=2), [0, 1, 1, 1, 1])
    assert not duplicate_flags(x[:1], 0.1).any()
    with pytest.raises(ValueError, match="block"):
        duplicate_flags(x, 0.1, block=0)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dd")
    rng = np.random.default_rng(7)
    x = clustered(1800, 16, 4, seed=3)
    dst = rng.choice(np.arange(900, 1800), size=400, replace=False)
    src = rng.integers(0, 900, size=400)
    x[dst] = x[src] + rng.normal(size=(400, 16)).astype(np.float32) * 0.01
    ids = list(range(0, 3600, 2))
    write_dataset(Store(str(tmp / "in")), x, ids, files=3, row_group_rows=70)
    return tmp, x, ids


@pytest.mark.parametrize(
    "strategy,fraction", [("hard", 0.45), ("balanced", 0.45), ("random", 0.95)]
)
def test_end_to_end_dedup_then_rule(ray_local, pool, strategy, fraction, monkeypatch):
    from ray_jobs.driver import run
    from scoring.stages import annotate

    if strategy == "hard":  # every cluster "larger than memory": the streamed path
        monkeypatch.setattr(annotate, "DEDUP_MEMORY_FLOATS", 16 * 100)

    tmp, x, ids = pool
    eps = 0.002
    cfg = make_config(
        dict(
            input=str(tmp / "in"),
            output=str(tmp / "out"),
            run_id=f"dd-{strategy}",
            k=6,
            strategy=strategy,
            keep_fraction=fraction,
            dedup_eps=eps,
            shard_rows=200,
            seed=5,
            quiet=True,
        )
    )
    doc = run(cfg, quiet=True)
    runs = Store(str(tmp / "out" / f"dd-{strategy}"))
    sc = all_scores(runs)
    sid = sc["id"].to_pylist()
    cl = sc["cluster"].to_numpy()
    dist = sc["distance"].to_numpy()
    pos = {v: i for i, v in enumerate(ids)}
    xs = x[[pos[v] for v in sid]]
    surv = dedup_survivors(sid, cl, dist, xs, eps)
    n = len(ids)
    assert 300 < n - len(surv) < 500  # the planted near-duplicates
    # the duplicate column and the manifest counts
    ann = read_all(runs, "annotated")
    flagged = {i for i, d in zip(ann["id"].to_pylist(), ann["duplicate"].to_pylist()) if d}
    assert flagged == set(sid) - surv
    assert sorted(ann["id"].to_pylist()) == sorted(ids)
    assert doc["dedup"]["removed"] == n - len(surv) and doc["dedup"]["survivors"] == len(surv)
    assert doc["annotated"] == runs.list("annotated", suffix=".parquet")
    if strategy == "hard":
        assert doc["cluster_ranges"] == 6 and not runs.list("_tmp")
    assert runs.list("embeddings", suffix=".parquet") == [
        k.replace("scores/", "embeddings/") for k in runs.list("scores", suffix=".parquet")
    ]
    # n_keep stays floor(F x N) of the original N
    assert doc["n_keep"] == int(fraction * n)
    keep = read_all(runs, "keep")
    got = keep["id"].to_pylist()
    assert len(got) == len(set(got)) == min(doc["n_keep"], len(surv))
    assert not any(keep["duplicate"].to_pylist())
    m = [i for i in range(n) if sid[i] in surv]
    want = reference_keep(
        [sid[i] for i in m], cl[m], dist[m], strategy, min(doc["n_keep"], len(surv)), seed=5
    )
    assert set(got) == want
    if fraction > 0.9:  # fewer survivors than n_keep: all of them are kept
        assert doc["rows_kept"] == len(surv) < doc["n_keep"]


def test_range_pass_with_tiny_blocks(ray_local, pool):
    """The range pass itself (clusters gathered from every shard), with blocks of 7 rows so
    every cluster spans many blocks, against the brute-force reference."""
    from ray_jobs.driver import run
    from scoring.kernels.percentile import PercentileBins, level1_histogram
    from scoring.layout import annotated_key
    from scoring.stages.annotate import RangeTask, annotate_range

    tmp, x, ids = pool
    cfg = make_config(
        dict(
            input=str(tmp / "in"),
            output=str(tmp / "out"),
            run_id="dd-blocks",
            k=6,
            strategy="easy",
            keep_fraction=0.5,
            dedup_eps=0.002,
            shard_rows=200,
            quiet=True,
        )
    )
    doc = run(cfg, quiet=True)
    runs = Store(str(tmp / "out" / "dd-blocks"))
    shards = sorted(int(k[-14:-8]) for k in runs.list("scores", suffix=".parquet"))
    assert len(shards) >= 6
    sc = all_scores(runs)
    sid, cl, dist = sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    bins = PercentileBins(level1_histogram(dist))
    res = annotate_range(RangeTask(runs, shards, 99, 0, 6, 6, bins, 0.002, block=7))
    pos = {v: i for i, v in enumerate(ids)}
    surv = dedup_survivors(sid, cl, dist, x[[pos[v] for v in sid]], 0.002)
    t = runs.read_parquet(annotated_key(99))
    flagged = {i for i, d in zip(t["id"].to_pylist(), t["duplicate"].to_pylist()) if d}
    assert flagged == set(sid) - surv and t.num_rows == len(ids)
    assert int(res.removed.sum()) == doc["dedup"]["removed"] == len(ids) - len(surv)
    assert max(np.bincount(cl)) > 7 * 20  # clusters far larger than one block

    # a cluster "larger than memory": streamed through spilled chunks of 37 rows
    for j in range(6):
        res = annotate_range(
            RangeTask(
                runs,
                shards,
                200 + j,
                j,
                j + 1,
                6,
                bins,
                0.002,
                block=5,
                stream_dim=16,
                memory=2 * 16 * 37,
            )  # fmt: skip
        )
        t = runs.read_parquet(annotated_key(200 + j))
        assert t.num_rows == int((cl == j).sum()) > 2 * 37
        flagged = {i for i, d in zip(t["id"].to_pylist(), t["duplicate"].to_pylist()) if d}
        assert flagged == {i for i, c in zip(sid, cl) if c == j} - surv
        assert int(res.removed[j]) == len(flagged)
    assert not runs.list("_tmp")  # the spill is deleted
