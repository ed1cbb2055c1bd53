"""DBP: quotas are a closest integer vector (against enumeration of every feasible vector),
complexity matches loops, and end to end through Ray (with and without dedup, clusters split
across shards) the keep list equals a single-process reference."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from scoring.commit import load_committed
from scoring.config import make_config
from scoring.kernels.dbp import closest_quotas, dbp_quotas, inter_distance
from scoring.storage import Store
from tests.helpers import clustered, read_all, write_dataset
from tests.ref6 import all_scores, dbp_reference, dedup_survivors, per_cluster_pick


def enumerate_best(t, lo, hi, n):
    best = None
    for q in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
        if sum(q) != n:
            continue
        cost = sum((Fraction(qi) - ti) ** 2 for qi, ti in zip(q, t))
        if best is None or cost < best:
            best = cost
    return best


@pytest.mark.parametrize("seed", range(40))
def test_closest_quotas_is_optimal(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    hi = rng.integers(0, 7, size=k)
    lo = np.minimum(rng.integers(0, 3, size=k), hi)
    n = int(rng.integers(lo.sum(), hi.sum() + 1))
    p = rng.dirichlet(np.ones(k))
    t = [Fraction(float(v)) * n for v in p]
    q = closest_quotas(t, lo, hi, n)
    assert q.sum() == n and (q >= lo).all() and (q <= hi).all()
    cost = sum((Fraction(int(a)) - b) ** 2 for a, b in zip(q, t))
    assert cost == enumerate_best(t, lo.tolist(), hi.tolist(), n)


def test_closest_quotas_rejects_infeasible():
    with pytest.raises(ValueError, match="outside"):
        closest_quotas([1.0, 1.0], np.array([0, 0]), np.array([1, 1]), 3)


def test_inter_distance_matches_loops():
    rng = np.random.default_rng(0)
    for k in (1, 2, 5, 30):
        c = rng.normal(size=(k, 6))
        u = c / np.linalg.norm(c, axis=1, keepdims=True)
        want = []
        for j in range(k):
            sims = sorted((u[j] @ u[i] for i in range(k) if i != j), reverse=True)
            m = min(20, k - 1)
            want.append(np.mean([1 - s for s in sims[:m]]) if m else 1.0)
        np.testing.assert_allclose(inter_distance(c, block=7), want, rtol=1e-12)


def test_quotas_respect_floor_caps_and_sum():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(8, 4))
    counts = np.array([0, 5, 100, 3, 40, 1, 60, 9])
    dist = counts * rng.uniform(0.1, 0.5, 8)
    q, info = dbp_quotas(c, counts, dist, 100, 0.5)
    assert q.sum() == 100 and (q <= counts).all() and q[0] == 0
    assert (q >= np.minimum(100 // 16, counts)).all() and info["floor"] == 6
    q_all, _ = dbp_quotas(c, counts, dist, 10_000, 0.5)
    np.testing.assert_array_equal(q_all, counts)  # more than M rows asked: all rows
    assert list(q) == dbp_reference(c, counts, dist, 100, 0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dbp")
    rng = np.random.default_rng(5)
    x = clustered(2000, 12, 6, seed=9)
    dst = rng.choice(np.arange(1000, 2000), size=300, replace=False)
    x[dst] = x[rng.integers(0, 1000, size=300)] * 1.0001
    ids = list(range(2000))
    write_dataset(Store(str(tmp / "in")), x, ids, files=3, row_group_rows=80)
    return tmp, x, ids


@pytest.mark.parametrize("eps", [None, 0.001])
def test_end_to_end_dbp(ray_local, data, eps):
    from ray_jobs.driver import run

    tmp, x, ids = data
    rid = f"dbp-{eps}"
    cfg = make_config(
        dict(
            input=str(tmp / "in"),
            output=str(tmp / "out"),
            run_id=rid,
            k=8,
            strategy="dbp",
            keep_fraction=0.3,
            dbp_temperature=0.2,
            dedup_eps=eps,
            shard_rows=250,
            quiet=True,
        )
    )
    doc = run(cfg, quiet=True)
    runs = Store(str(tmp / "out" / rid))
    sc = all_scores(runs)
    sid, cl, dist = sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    allowed = set(sid)
    if eps is not None:
        allowed = dedup_survivors(sid, cl, dist, x[sid], eps)
        assert doc["dedup"]["removed"] == len(sid) - len(allowed) >= 250
    live = np.array([i in allowed for i in sid])
    counts = np.bincount(cl[live], minlength=8)
    dsum = np.bincount(cl[live], weights=dist[live].astype(np.float64), minlength=8)
    centroids = load_committed(runs)[0]
    q = dbp_reference(centroids, counts, dsum, doc["n_keep"], 0.2)
    want = per_cluster_pick(sid, cl, dist, q, allowed)
    keep = read_all(runs, "keep")
    assert keep.num_rows == len(set(keep["id"].to_pylist())) == doc["n_keep"] == 600
    assert set(keep["id"].to_pylist()) == want
    assert doc["clusters"]["kept"] == q
    assert doc["dbp"]["floor"] == 600 // 16
