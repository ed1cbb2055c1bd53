"""Dedup near the threshold is exact on the stored float32 values: bit-identical and parallel
copies have similarity 1 (eps 0 removes them all) and pairs exactly at 1 - eps are duplicates,
against a brute-force reference in exact rational arithmetic (fractions.Fraction)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from scoring.kernels.dedup import dedup_evidence, streamed_evidence


def exact_reference(x: np.ndarray, eps: float) -> np.ndarray:
    """Row i is a duplicate when cos(x_i, x_j) >= 1 - eps (the double) for some j < i, in
    rationals: dot >= 0 and dot^2 den^2 >= num^2 |x_i|^2 |x_j|^2 for 1 - eps = num/den, on
    the float32 values times 2^149 (integers: float32's smallest step is 2^-149)."""
    num, den = Fraction(1.0 - eps).as_integer_ratio()
    scale = Fraction(2) ** 149
    rows = [[int(Fraction(float(v)) * scale) for v in r] for r in np.asarray(x, np.float32)]
    norm2 = [sum(v * v for v in r) for r in rows]
    out = np.zeros(len(rows), bool)
    for i in range(1, len(rows)):
        for j in range(i):
            if norm2[i] == 0 or norm2[j] == 0:
                continue
            dot = sum(a * b for a, b in zip(rows[i], rows[j]))
            if dot >= 0 and dot * dot * den * den >= num * num * norm2[i] * norm2[j]:
                out[i] = True
                break
    return out


def four_squares(n: int) -> list[int]:
    """Four integers whose squares sum to n (Lagrange), by search."""
    for a in range(math.isqrt(n), -1, -1):
        for b in range(math.isqrt(n - a * a), -1, -1):
            for c in range(math.isqrt(n - a * a - b * b), -1, -1):
                r = n - a * a - b * b - c * c
                d = math.isqrt(r)
                if d * d == r:
                    return [a, b, c, d]
    raise AssertionError(n)


def pair_at(k: int, d: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 vectors whose cosine is exactly 1 - 2^-k: x = e_p * s, and y = (2^k - 1,
    four integers with squares summing to 2^(k+1) - 1), so |y| = 2^k; coordinates permuted,
    signs flipped and scaled by powers of two (all exact in float32)."""
    y5 = np.array([2**k - 1] + four_squares(2 ** (k + 1) - 1), np.float64)
    perm = rng.permutation(d)[:5]
    sign = rng.choice([-1.0, 1.0], size=5)
    x = np.zeros(d, np.float32)
    y = np.zeros(d, np.float32)
    x[perm[0]] = sign[0] * 2.0 ** int(rng.integers(-6, 6))
    y[perm] = (sign * y5 * 2.0 ** int(rng.integers(-30, -k))).astype(np.float32)
    assert np.all(y[perm].astype(np.float64) == sign * y5 * np.abs(y[perm[0]] / y5[0]))
    return x, y


def with_copies(n: int, d: int, copies: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    dst = rng.choice(np.arange(1, n), size=copies, replace=False)
    for i in dst:
        x[i] = x[rng.integers(0, i)]  # a bit-identical copy of an earlier row
    return x


def streamed(x: np.ndarray, eps: float, chunk: int, block: int):
    return streamed_evidence(
        len(x), lambda c: x[c * chunk : (c + 1) * chunk], chunk, x.shape[1], eps, block
    )


@pytest.mark.parametrize("block", [16, 4096])
def test_bit_identical_copies_at_eps_0_are_all_removed(block):
    x = with_copies(400, 32, copies=300, seed=1)
    want = exact_reference(x, 0.0)
    first = {}
    copies = np.array([first.setdefault(r.tobytes(), i) != i for i, r in enumerate(x)])
    np.testing.assert_array_equal(want, copies)  # the reference: exactly the later copies
    assert want.sum() >= 200  # copies of rows overwritten later are not copies
    ev = dedup_evidence(x, 0.0, block=block)
    np.testing.assert_array_equal(ev.duplicate, want)
    assert np.all(ev.max_similarity[want] == 1.0)
    # duplicate_of names a bit-identical earlier row
    assert all((x[ev.earlier[i]] == x[i]).all() and ev.earlier[i] < i for i in np.flatnonzero(want))
    np.testing.assert_array_equal(streamed(x, 0.0, chunk=64, block=block).duplicate, want)


def test_parallel_vectors_have_similarity_1():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(6, 24)).astype(np.float32)
    scaled = [base[i % 6] * np.float32(2.0 ** (i - 5)) for i in range(10)]  # exact in float32
    threes = [base[i] * np.float32(3.0) for i in range(6)]  # rounded: parallel or not, per row
    x = np.concatenate([base, np.array(scaled), np.array(threes), -base[:3]]).astype(np.float32)
    for eps in (0.0, 1e-12):
        want = exact_reference(x, eps)
        assert want[6:16].all() and not want[:6].any() and not want[-3:].any()
        np.testing.assert_array_equal(dedup_evidence(x, eps, block=5).duplicate, want)
        np.testing.assert_array_equal(streamed(x, eps, chunk=4, block=3).duplicate, want)


@pytest.mark.parametrize("k", [3, 12, 20, 24])
def test_pairs_exactly_at_1_minus_eps(k):
    rng = np.random.default_rng(k)
    d = 16
    pairs = [pair_at(k, d, rng) for _ in range(5)]
    noise = rng.normal(size=(20, d)).astype(np.float32)
    x = np.concatenate([noise[:10]] + [np.stack(p) for p in pairs] + [noise[10:]])
    eps = 2.0**-k  # 1 - eps is exactly the pairs' cosine
    # eps whose threshold 1 - eps is the next double above the pairs' cosine (exact: Sterbenz)
    below = 1.0 - float(np.nextafter(1.0 - eps, 2.0))
    assert 1.0 - below > 1.0 - eps
    for e, expect in ((eps, True), (below, False)):
        want = exact_reference(x, e)
        second = np.arange(11, 20, 2)
        assert want[second].all() == expect and want[second].any() == expect
        ev = dedup_evidence(x, e, block=4)
        np.testing.assert_array_equal(ev.duplicate, want)
        np.testing.assert_array_equal(streamed(x, e, chunk=6, block=4).duplicate, want)
        np.testing.assert_allclose(ev.max_similarity[second], 1.0 - eps, rtol=0, atol=1e-15)


def test_decimal_eps_on_a_rational_cosine():
    """cos((3, 4), (5, 0)) = 3/5 exactly; eps 0.4 makes the double 1 - 0.4 just below 3/5."""
    x = np.zeros((4, 6), np.float32)
    x[0, :2] = (5, 0)
    x[1, :2] = (3, 4)
    x[2, 2] = 1
    x[3, 2:4] = (0.75, 1.0)  # cos to x[2] = 3/5 as well
    for eps in (0.4, 0.39, 0.41):
        want = exact_reference(x, eps)
        np.testing.assert_array_equal(dedup_evidence(x, eps, block=2).duplicate, want)
    assert exact_reference(x, 0.4)[1] and not exact_reference(x, 0.39)[1]


def test_mixed_data_equals_the_exact_reference():
    rng = np.random.default_rng(9)
    x = with_copies(150, 12, copies=30, seed=5)
    near = x[:40] + rng.normal(size=(40, 12)).astype(np.float32) * np.float32(1e-7)
    x = np.concatenate([x, near.astype(np.float32), np.zeros((2, 12), np.float32)])
    for eps in (0.0, 1e-9, 1e-6, 0.01):
        want = exact_reference(x, eps)
        np.testing.assert_array_equal(dedup_evidence(x, eps, block=16).duplicate, want)
        np.testing.assert_array_equal(streamed(x, eps, chunk=50, block=16).duplicate, want)
