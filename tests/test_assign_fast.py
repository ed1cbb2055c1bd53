"""The torch low-precision search with fp32 re-check is exact: it agrees with a float64 brute
force on every row, including rows built to be near-ties far below the bf16 error."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.kernels.assign import NearestPrototype, brute_force_nearest, error_bound
from scoring.kernels.devices import normalize

TIE = 2e-6  # rows whose two best float64 distances are this close are true fp32 ties


def unit(rng, n, d):
    return normalize(rng.normal(size=(n, d)).astype(np.float32))


def dist64(x, c, metric):
    x = np.asarray(x, np.float64)
    c = np.asarray(c, np.float64)
    if metric == "cosine":
        return 1.0 - x @ c.T
    return np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None], 0))


def check_exact(x, c, metric, got, tol=2e-6):
    """Same cluster as float64 brute force except true ties; distances to float64 accuracy."""
    cl, d1, d2 = got
    D = dist64(x, c, metric)
    j, best = brute_force_nearest(x, c, metric)
    srt = np.sort(D, axis=1)
    clear = (srt[:, 1] - srt[:, 0]) > TIE * np.maximum(1, srt[:, 0])
    assert clear.sum() > 0
    np.testing.assert_array_equal(cl[clear], j[clear])
    # on ties, the chosen prototype is one of the tied ones
    chosen = D[np.arange(len(x)), cl]
    assert np.all(chosen - best <= TIE * np.maximum(1, best))
    scale = np.maximum(1.0, best)
    assert np.all(np.abs(d1 - best) <= tol * scale)
    assert np.all(d2 >= d1 - tol * scale)
    return D


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_torch_matches_brute_force(metric):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(300, 48)).astype(np.float32)
    lab = rng.integers(0, 300, 6000)
    x = centers[lab] + 0.8 * rng.normal(size=(6000, 48)).astype(np.float32)
    c = centers + 0.1 * rng.normal(size=centers.shape).astype(np.float32)
    if metric == "cosine":
        x, c = normalize(x), normalize(c)
    else:
        x, c = 3.0 * x, 3.0 * c  # norms ~ 20: the bound must scale with them
    s = NearestPrototype(c, metric, backend="torch", chunk_rows=1000)
    got = s.search(x)
    D = check_exact(x, c, metric, got, tol=2e-6 if metric == "cosine" else 1e-5)
    # every row carries the exact second-nearest distance (certified, or searched again)
    srt = np.sort(D, axis=1)
    np.testing.assert_allclose(got[2], srt[:, 1], rtol=1e-5, atol=1e-5)
    assert s.stats["rows"] == len(x)
    assert s.stats["canonical_rows"] == len(x)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_near_ties_below_bf16_error_are_resolved(metric, precision):
    """Rows almost equidistant from 2, 3, 4 or 12 prototypes (gaps 1e-5..1e-3, far below the
    bf16 error bound) get the float64 winner. bf16: ties inside the 8 candidates are ordered
    by the canonical distance of all 8 ("closed"), wider ones searched again in float64.
    fp32 (3 candidates): near-ties of the second and third are searched again in float64."""
    rng = np.random.default_rng(2)
    d, k = 64, 500
    c = unit(rng, k, d)
    rows = []
    for ways in (2, 3, 4, 12):
        for _ in range(400):
            js = rng.choice(k, size=ways, replace=False)
            target = 1 + rng.choice([1e-5, 1e-4, 1e-3]) * rng.normal(size=ways)
            cs = c[js].astype(np.float64)
            rows.append(cs.T @ np.linalg.solve(cs @ cs.T, target))  # x·c_j = target_j
    x = np.asarray(rows, np.float32)
    if metric == "cosine":
        x = normalize(x)
    s = NearestPrototype(c, metric, backend="torch", precision=precision, chunk_rows=512)
    assert s._torch.m == {"bf16": 8, "fp32": 3}[precision]
    got = s.search(x)
    check_exact(x, c, metric, got)
    D = dist64(x, c, metric)
    srt = np.sort(D, axis=1)
    gaps = srt[:, 1] - srt[:, 0]
    assert (gaps[:1200] < error_bound("bf16", d) / 10).mean() > 0.9  # really near-ties
    if precision == "bf16":
        assert s.stats["canonical_closed"] > 0  # some were settled among the candidates
    assert s.stats["canonical_full"] > 0  # and some needed the float64 search


def test_exact_ties_go_to_a_tied_prototype_and_duplicates_are_handled():
    rng = np.random.default_rng(3)
    c = unit(rng, 50, 16)
    c[7] = c[3]  # duplicated prototype: exact ties
    x = np.concatenate([c[[3, 3, 7]], unit(rng, 200, 16)])
    cl, d1, _ = NearestPrototype(c, "cosine", backend="torch").search(x)
    assert cl[0] in (3, 7) and cl[0] == cl[1] == cl[2]
    assert cl[0] == 3  # ties go to the lower index, as in a stable sort
    check_exact(x, c, "cosine", (cl, d1, _))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tiny_k(k):
    rng = np.random.default_rng(4)
    c = unit(rng, k, 8)
    x = unit(rng, 300, 8)
    cl, d1, d2 = NearestPrototype(c, "cosine", backend="torch").search(x)
    j, best = brute_force_nearest(x, c, "cosine")
    np.testing.assert_array_equal(cl, j)
    np.testing.assert_allclose(d1, best, atol=2e-6)
    if k == 1:
        assert np.isinf(d2).all()


def test_auto_backend_agrees_with_faiss_and_picks_one():
    rng = np.random.default_rng(5)
    c = unit(rng, 200, 32)
    x = unit(rng, 5000, 32)
    a = NearestPrototype(c, "cosine", backend="auto")
    got = a.search(x)
    assert a.backend in ("faiss", "torch")
    f = NearestPrototype(c, "cosine", backend="faiss").search(x)
    # the committed answer does not depend on the backend: the same bytes
    for a_col, f_col in zip(got, f):
        np.testing.assert_array_equal(a_col.view(np.int32), f_col.view(np.int32))
    # later batches use the chosen backend
    got2 = a.search(x[:100])
    np.testing.assert_array_equal(got2[0], got[0][:100])


def test_fp16_cosine_is_exact_and_bad_arguments_fail():
    rng = np.random.default_rng(6)
    c = unit(rng, 100, 24)
    x = unit(rng, 2000, 24)
    got = NearestPrototype(c, "cosine", backend="torch", precision="fp16").search(x)
    check_exact(x, c, "cosine", got)
    with pytest.raises(ValueError, match="fp16"):
        NearestPrototype(c, "l2", backend="torch", precision="fp16")
    with pytest.raises(ValueError, match="backend"):
        NearestPrototype(c, "cosine", backend="gpu-magic")
    with pytest.raises(ValueError, match="width 23"):
        NearestPrototype(c, "cosine", backend="torch").search(x[:, :23])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_top_m_and_row_argmax_on_the_cpu(dtype):
    """The numpy top-m and argmax (CPU) against a stable sort of the same scores: the m
    largest values in descending order, each tie to the lower index; argmax the first."""
    import torch

    from scoring.kernels.assign import row_argmax, top_m

    rng = np.random.default_rng(5)
    s = rng.integers(-20, 20, size=(300, 50)).astype(np.float32)  # many exact ties
    t = torch.from_numpy(s.copy()).to(getattr(torch, dtype))
    order = np.argsort(-s, axis=1, kind="stable")  # descending, ties to the lower index
    np.testing.assert_array_equal(row_argmax(torch, t.clone()).numpy(), order[:, 0])
    for m in (1, 3, 8):
        v, j = top_m(torch, t.clone(), m)
        np.testing.assert_array_equal(j.numpy(), order[:, :m])
        np.testing.assert_array_equal(v.numpy(), np.take_along_axis(s, order[:, :m], 1))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_row_ranges_on_threads_write_the_same_bytes(metric, monkeypatch):
    """With torch allowed 2 threads on the CPU, search cuts the rows into ranges searched on
    2 threads (one-thread products each): the same bytes as one thread, exact against float64,
    each row counted once; torch's thread count comes back."""
    import torch

    from scoring.kernels import assign

    rng = np.random.default_rng(4)
    centers = rng.normal(size=(200, 32)).astype(np.float32)
    x = centers[rng.integers(0, 200, 9000)] + 0.7 * rng.normal(size=(9000, 32)).astype(np.float32)
    c = centers + 0.1 * rng.normal(size=centers.shape).astype(np.float32)
    c = normalize(c) if metric == "cosine" else c  # prototypes are unit rows for cosine
    monkeypatch.setattr(assign, "ROW_RANGE_MIN", 1000)  # 9 ranges
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = NearestPrototype(c, metric, backend="torch", precision="fp32")
        assert one._row_threads(len(x)) == 1
        ref = one.search(x)
        torch.set_num_threads(2)
        two = NearestPrototype(c, metric, backend="torch", precision="fp32")
        assert two._row_threads(len(x)) == 2
        got = two.search(x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    check_exact(normalize(x) if metric == "cosine" else x, c, metric, got, tol=1e-5)
    assert two.stats["rows"] == two.stats["canonical_rows"] == len(x)
