"""Nearest prototype and distance against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.kernels.assign import NearestPrototype
from scoring.kernels.devices import normalize


def brute(x: np.ndarray, c: np.ndarray, metric: str):
    """All distances in float64, sorted per row: (nearest index, nearest, second nearest)."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    if metric == "cosine":
        d = 1.0 - np.einsum("nd,kd->nk", x64, c64)
    else:
        d = np.sqrt(((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    rows = np.arange(len(x))
    second = d[rows, order[:, 1]] if d.shape[1] > 1 else np.full(len(x), np.inf)
    return order[:, 0], d[rows, order[:, 0]], second, d


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("k", [1, 2, 8, 37])
def test_nearest_matches_brute_force(metric, k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(700, 16)).astype(np.float32) * 3
    c = rng.normal(size=(k, 16)).astype(np.float32)
    if metric == "cosine":
        x, c = normalize(x), normalize(c)
    cl, dist, second = NearestPrototype(c, metric).search(x)
    j, d, d2, full = brute(x, c, metric)
    assert cl.dtype == np.int32 and dist.dtype == np.float32 and second.dtype == np.float32
    # the reported cluster is a nearest one (up to float32 rounding), distances match
    np.testing.assert_allclose(full[np.arange(len(x)), cl], d, rtol=1e-5, atol=1e-5)
    assert (cl == j).mean() > 0.99
    np.testing.assert_allclose(dist, d, rtol=1e-5, atol=1e-5)
    if k > 1:
        np.testing.assert_allclose(second, d2, rtol=1e-5, atol=1e-5)
    else:
        assert np.isinf(second).all()


def test_exact_hits_have_zero_distance():
    c = normalize(np.eye(4, 8, dtype=np.float32) + 0.1)
    cl, dist, _ = NearestPrototype(c, "cosine").search(c)
    assert cl.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(dist, 0, atol=1e-6)
    cl, dist, _ = NearestPrototype(c, "l2").search(c[::-1].copy())
    assert cl.tolist() == [3, 2, 1, 0]
    np.testing.assert_allclose(dist, 0, atol=1e-3)


def test_width_mismatch_is_an_error():
    with pytest.raises(ValueError, match="width 3"):
        NearestPrototype(np.ones((2, 4), np.float32), "l2").search(np.ones((5, 3), np.float32))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_cosine_on_raw_rows_matches_normalised_search(backend):
    """Raw (unnormalised) rows give the cosine answer of the normalised rows."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(900, 24)).astype(np.float32) * rng.uniform(0.1, 50, size=(900, 1))
    x[7] = 0.0  # a zero row: cosine 0, distance 1
    c = normalize(rng.normal(size=(13, 24)).astype(np.float32))
    ref_j, ref_d, ref_2, _ = brute(normalize(x), c, "cosine")
    s = NearestPrototype(c, "cosine", backend=backend)
    j, d, second = s.search(x)
    # the zero row ties every centroid at distance 1: the lowest two indices
    mask = np.ones(len(x), bool)
    mask[7] = False
    assert (j[mask] == ref_j[mask]).all()
    assert j[7] == 0 and d[7] == 1.0 and second[7] == 1.0
    np.testing.assert_allclose(d, ref_d, atol=2e-6)
    np.testing.assert_allclose(second, ref_2, atol=2e-6)
