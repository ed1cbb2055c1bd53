"""The committed distance is one definition (kernels.canonical): the exact value of the stored
float32 numbers, correctly rounded to float32; the cluster is its argmin, ties to the lower
index. Checked against an independent 200-bit reference (mpmath), across backends (faiss,
torch bf16/fp16), across splits and positions of the same rows, and on real shards through
the CLI with either backend and with or without --save-embeddings (the same bytes)."""

from __future__ import annotations

import os
import subprocess
import sys

import mpmath
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoring.kernels.assign import NearestPrototype
from scoring.kernels.canonical import Canonical, _exact
from scoring.kernels.devices import normalize
from tests.helpers import clustered, emb_array

mpmath.mp.prec = 200


def exact(x, c, metric):
    """D(x, c) as a 200-bit number from the float32 values."""
    xs = [mpmath.mpf(float(v)) for v in x]
    cs = [mpmath.mpf(float(v)) for v in c]
    if metric == "l2":
        return mpmath.sqrt(mpmath.fsum((a - b) ** 2 for a, b in zip(xs, cs)))
    xx = mpmath.fsum(a * a for a in xs)
    cc = mpmath.fsum(b * b for b in cs)
    if xx == 0 or cc == 0:
        return mpmath.mpf(1)
    return 1 - mpmath.fsum(a * b for a, b in zip(xs, cs)) / mpmath.sqrt(xx * cc)


def is_nearest_f32(value, r: np.float32) -> bool:
    """r is a float32 nearest to the real `value` (no neighbour is strictly nearer)."""
    err = abs(value - mpmath.mpf(float(r)))
    for nb in (np.nextafter(r, np.float32(-np.inf)), np.nextafter(r, np.float32(np.inf))):
        if abs(value - mpmath.mpf(float(nb))) < err:
            return False
    return True


def nearest_f32(value) -> np.float32:
    """The float32 nearest to `value` (a tie cannot occur for these irrational values)."""
    r = np.float32(float(value))
    for nb in (np.nextafter(r, np.float32(-np.inf)), np.nextafter(r, np.float32(np.inf))):
        if abs(value - mpmath.mpf(float(nb))) < abs(value - mpmath.mpf(float(r))):
            r = nb
    return r


def awkward_rows(rng, c: np.ndarray) -> np.ndarray:
    """Rows of many norms, plus rows on or parallel to a prototype (the slow paths)."""
    n, d = 120, c.shape[1]
    x = rng.normal(size=(n, d)).astype(np.float32) * rng.choice([1e-3, 1, 40], (n, 1))
    x = x.astype(np.float32)
    x[:10] = c[:10] * 2  # exactly parallel: cosine distance exactly 0
    x[10:20] = c[10:20]  # on the prototype: l2 distance exactly 0
    x[20:30] = c[20:30] + np.float32(1e-6) * rng.normal(size=(10, d)).astype(np.float32)
    x[30] = 0.0  # a zero row
    return x


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_distance_is_the_correctly_rounded_exact_value(metric):
    rng = np.random.default_rng(11)
    c = rng.normal(size=(40, 24)).astype(np.float32)
    if metric == "cosine":
        c = normalize(c)
    x = awkward_rows(rng, c)
    can = Canonical(c, metric)
    js = np.arange(len(x)) % len(c)
    got = can.distances(x, np.arange(len(x)), js)
    assert got.dtype == np.float32
    for i in range(len(x)):
        assert is_nearest_f32(exact(x[i], c[js[i]], metric), got[i]), (metric, i)
    assert (got[:10] == 0).all() if metric == "cosine" else (got[10:20] == 0).all()
    if metric == "cosine":  # the rows on their prototype went the slower, exact ways
        assert can.stats["exact"] > 0 and can.stats["second_formula"] > 0
    # the exact path on its own, for every row
    for i in range(0, len(x), 7):
        assert _exact(x[i], c[js[i]], metric) == nearest_f32(exact(x[i], c[js[i]], metric))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_cluster_is_the_exact_argmin_with_ties_to_the_lower_index(metric):
    """Near-ties (gaps 1e-7..1e-4), exact ties (a duplicated prototype) and plain rows: the
    cluster and both distances equal the 200-bit reference's, for every backend, byte for
    byte."""
    rng = np.random.default_rng(12)
    d, k = 16, 30
    c = normalize(rng.normal(size=(k, d)).astype(np.float32))
    c[9] = c[4]  # an exact tie between prototypes 4 and 9
    rows = [c[4] * 3, c[9] + 0.01]
    for _ in range(60):
        js = rng.choice(k, size=3, replace=False)
        target = 1 + rng.choice([1e-7, 1e-5, 1e-4]) * rng.normal(size=3)
        cs = c[js].astype(np.float64)
        rows.append(cs.T @ np.linalg.lstsq(cs @ cs.T, target, rcond=None)[0])
    x = np.concatenate([np.asarray(rows, np.float32), rng.normal(size=(40, d)).astype(np.float32)])
    ref = []
    for row in x:
        dd = [nearest_f32(exact(row, cj, metric)) for cj in c]
        order = sorted(range(k), key=lambda j: (dd[j], j))
        ref.append((order[0], dd[order[0]], dd[order[1]]))
    want = [
        np.array([r[t] for r in ref], dt) for t, dt in enumerate((np.int32, np.float32, np.float32))
    ]
    assert want[0][0] == 4 and want[0][1] == 4  # the tie goes to the lower index
    backends = [("faiss", "auto"), ("torch", "bf16"), ("torch", "fp32")] + (
        [("torch", "fp16")] if metric == "cosine" else []
    )
    for backend, precision in backends:
        got = NearestPrototype(c, metric, backend=backend, precision=precision).search(x)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.view(np.int32), w.view(np.int32), err_msg=backend)
    # the canonical step alone, at each level of a backend's certainty: "closed" (the true
    # two somewhere among shuffled candidates: here all k), and the float64 full search in
    # numpy and as torch's GEMM (the path a CUDA search takes, here on the CPU)
    cand = np.array([rng.permutation(k) for _ in x], np.int32)
    for label, can, level in [
        ("closed", Canonical(c, metric), np.ones(len(x), np.int8)),
        ("full numpy", Canonical(c, metric), np.zeros(len(x), bool)),
        ("full torch", Canonical(c, metric, device="cpu"), np.zeros(len(x), np.int8)),
    ]:
        got = can.nearest(x, cand, level)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.view(np.int32), w.view(np.int32), err_msg=label)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_identical_rows_get_identical_bytes_wherever_they_sit(metric):
    """Copies of rows at other positions, in other splits (shards) and other chunk sizes get
    bit-identical clusters and distances."""
    rng = np.random.default_rng(13)
    x = clustered(3000, 32, 20, seed=13) * np.float32(3)
    c = x[rng.choice(len(x), 50, replace=False)].copy()
    if metric == "cosine":
        c = normalize(c)
    src = rng.integers(0, len(x), 300)
    x[rng.choice(len(x), 300, replace=False)] = x[src]  # copies anywhere
    whole = NearestPrototype(c, metric, backend="faiss").search(x)
    for backend, chunk, split in [("torch", 777, 7), ("faiss", None, 3), ("torch", 4096, 1)]:
        s = NearestPrototype(c, metric, backend=backend, chunk_rows=chunk)
        parts = [s.search(p) for p in np.array_split(x, split)]
        got = [np.concatenate([p[t] for p in parts]) for t in range(3)]
        for g, w in zip(got, whole):
            np.testing.assert_array_equal(g.view(np.int32), w.view(np.int32))
    # rows equal as bytes have equal results
    _, first = np.unique(x, axis=0, return_inverse=True)
    for t in range(3):
        col = whole[t].view(np.int32)
        for g in np.unique(first):
            assert len(set(col[first == g].tolist())) == 1


def cli_run(tmp, out: str, backend: str, *extra: str) -> pa.Table:
    env = dict(os.environ, PROTOPRUNE_SEARCH_BACKEND=backend, RAY_AUTH_MODE="disabled")
    args = ["run", "--input", str(tmp / "in"), "--output", str(tmp / out), "--run-id", "r"]
    args += ["--k", "12", "--shard-rows", "400", "--strategy", "hard", "--quiet", *extra]
    r = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    scores = pq.read_table(tmp / out / "r" / "scores").sort_by("id")
    return scores.select(["id", "cluster", "distance", "margin"])


def test_real_shards_same_bytes_for_every_backend_and_with_saved_embeddings(tmp_path):
    """Two backends, and --save-embeddings (which normalises a copy of the rows for cosine),
    write byte-identical score columns on the same shards."""
    x = clustered(3000, 24, 12, seed=14) * np.float32(5)
    ids = np.arange(3000) * 7
    (tmp_path / "in").mkdir()
    for f, part in enumerate(np.array_split(np.arange(3000), 3)):
        t = pa.table({"id": pa.array(ids[part]), "embedding": emb_array(x[part])})
        pq.write_table(t, tmp_path / "in" / f"p{f}.parquet", row_group_size=200)
    a = cli_run(tmp_path, "faiss", "faiss")
    b = cli_run(tmp_path, "torch", "torch", "--save-embeddings")
    assert a.num_rows == 3000
    assert a.equals(b)
