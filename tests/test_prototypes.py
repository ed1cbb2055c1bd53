"""Prototype sampling and k-means (faiss and torch backends): the sample plan, determinism,
exact iterations, no subsampling."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.commit import load_committed, save_centroids
from scoring.kernels.devices import normalize
from scoring.kernels.kmeans import fit_kmeans
from scoring.kernels.sampling import sample_plan
from scoring.storage import Store
from tests.helpers import clustered


@pytest.mark.parametrize(
    "rows,s",
    [
        ([10, 20, 30], 6),
        ([10, 20, 30], 1000),
        ([1, 1, 1], 2),
        ([0, 5, 0, 7], 5),
        ([7], 3),
        ([3, 3, 3, 3], 5),
        ([1_000_000, 999_999, 1], 256_000),
        ([0, 0], 4),
        ([100] * 500, 40),
    ],
)
def test_sample_plan_sums_and_reads_few_row_groups(rows, s):
    """`rows`: rows per row group (the plan's units). The plan draws min(S, N) rows, never more
    than a group holds, from picked groups holding at least min(N, 8 S) rows; the groups past
    the one that reached 8 S are not read."""
    c = sample_plan(rows, s, seed=5)
    r = np.array(rows)
    n = int(r.sum())
    assert int(c.sum()) == min(s, n)
    assert (c >= 0).all() and (c <= r).all()
    assert np.array_equal(c, sample_plan(rows, s, seed=5))
    if s >= n:
        assert np.array_equal(c, r)  # the sample is every row
        return
    picked = c > 0
    held = int(r[picked].sum())
    # picking stops at the group that reached 8 S: without the largest the picks hold less
    # (a group picked but given no row by the draw only makes `held` smaller)
    assert held - int(r[picked].max()) < min(n, 8 * s)
    if len(rows) == 500:  # 40 rows, 8 x 40 = 320 -> 4 groups of 100 hold them all
        assert picked.sum() <= 4 and held <= 400


BACKENDS = pytest.mark.parametrize("backend", ["faiss", "torch"])


@BACKENDS
@pytest.mark.parametrize("iters", [1, 3, 7])
def test_fit_kmeans_runs_exactly_the_given_iterations(iters, backend):
    x = clustered(2000, 8, 5, seed=1)
    c, _, stats = fit_kmeans(x, 5, iters, "l2", seed=0, backend=backend)
    assert stats["iterations"] == iters and stats["backend"] == backend
    assert c.shape == (5, 8) and c.dtype == np.float32


@BACKENDS
def test_fit_kmeans_does_not_subsample(backend):
    # 2000 rows for k = 2 is far above faiss's default 256 points per centroid. The inertia of
    # the last iteration covers the points it trained on; with every point it can only be at
    # least the inertia of all points w.r.t. the final (improved) centroids. A subsample of 512
    # rows would give about a quarter of it.
    x = clustered(2000, 6, 2, seed=2)
    c, inertia, stats = fit_kmeans(x, 2, 4, "l2", seed=0, backend=backend)
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    full = d2.min(1).sum()
    assert inertia >= full * (1 - 1e-4)
    assert stats["sample_rows"] == 2000


@BACKENDS
def test_fit_kmeans_cosine_gives_unit_centroids(backend):
    x = clustered(1500, 12, 6, seed=3) * 5
    c, _, stats = fit_kmeans(x, 6, 5, "cosine", seed=0, backend=backend)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    assert stats["iterations"] == 5
    c2, _, _ = fit_kmeans(x, 6, 5, "cosine", seed=0, backend=backend)
    np.testing.assert_array_equal(c, c2)  # seeded


@BACKENDS
def test_fit_kmeans_k_larger_than_sample(backend):
    with pytest.raises(ValueError, match="k = 10"):
        fit_kmeans(np.ones((5, 3), np.float32), 10, 2, "l2", 0, backend=backend)


def test_save_and_load_committed(tmp_path):
    store = Store(str(tmp_path))
    assert load_committed(store) is None
    c = normalize(clustered(4, 3, 2))
    sha = save_centroids(store, c, {"k": 4})
    got, sha2 = load_committed(store)
    assert sha2 == sha
    np.testing.assert_array_equal(got, c)
    store.put_bytes("prototypes/centroids.npy", b"torn")  # data no longer matches its marker
    assert load_committed(store) is None
