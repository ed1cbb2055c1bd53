"""Density-based pruning quotas (Abbas et al. 2024; DESIGN §5), exact.

Cluster complexity C_j = d_inter(j) x d_intra(j): d_intra is the mean distance of the
cluster's rows to their centroid, d_inter the mean (1 - cos) from centroid j to its
min(20, k - 1) nearest other centroids (1 when k = 1). Only non-empty clusters take part:
the target is p = softmax(C / T) over them, t_j = p_j x n_keep.

Quotas: the integer vector q closest to t in Euclidean distance subject to sum(q) = n_keep and
L_j <= q_j <= n_j, with L_j = min(floor(n_keep / (2k)), n_j) (the DESIGN floor 0.5 x n_keep / k,
rounded down so the bounds are always feasible). It is computed in exact rational arithmetic
(every float t_j is taken as the exact binary fraction it is):

1. water-filling: the real lambda with sum_j clip(t_j + lambda, L_j, n_j) = n_keep, giving
   r_j = clip(t_j + lambda, L_j, n_j) (the Euclidean projection of t onto the constraints);
2. q_j = floor(r_j), plus one for the n_keep - sum floor(r_j) clusters with the largest
   fractional part of r_j, ties to the lower cluster index.

Step 2 gives q_j = clip(ceil(t_j + s), L_j, n_j) for one global shift s, the optimality
condition of this separable convex integer problem, so q is a closest integer vector.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

NEIGHBORS = 20


def inter_distance(centroids: np.ndarray, neighbors: int = NEIGHBORS, block: int = 1024):
    """Mean (1 - cos) from each centroid to its min(neighbors, k - 1) nearest others.

    float64 throughout (torch matmul + top-k per block of rows), memory O(block x k).
    """
    import torch

    c = np.asarray(centroids, np.float64)
    k = len(c)
    m = min(neighbors, k - 1)
    if m <= 0:
        return np.ones(k, np.float64)
    norms = np.linalg.norm(c, axis=1)
    ct = torch.from_numpy(c / np.where(norms > 0, norms, 1.0)[:, None])
    out = np.empty(k, np.float64)
    with torch.no_grad():
        for a in range(0, k, block):
            b = min(k, a + block)
            s = ct[a:b] @ ct.T
            s[torch.arange(b - a), torch.arange(a, b)] = -float("inf")
            top = torch.topk(s, m, dim=1).values  # the m largest similarities
            out[a:b] = (1.0 - top).mean(dim=1).numpy()
    return out


def complexity(
    centroids: np.ndarray, counts: np.ndarray, dist_sum: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, d_inter, d_intra); C is 0 for empty clusters (they take no part)."""
    counts = np.asarray(counts, np.int64)
    d_intra = np.divide(np.asarray(dist_sum, np.float64), np.maximum(counts, 1), dtype=np.float64)
    d_inter = inter_distance(centroids)
    c = np.where(counts > 0, d_inter * d_intra, 0.0)
    return c, d_inter, d_intra


def softmax_target(c: np.ndarray, counts: np.ndarray, temperature: float) -> np.ndarray:
    """p = softmax(C / T) over the non-empty clusters (0 elsewhere), float64."""
    live = np.asarray(counts) > 0
    p = np.zeros(len(c), np.float64)
    if not live.any():
        return p
    z = np.asarray(c, np.float64)[live] / float(temperature)
    z = np.exp(z - z.max())
    p[live] = z / z.sum()
    return p


def closest_quotas(
    target: list[Fraction] | np.ndarray, lower: np.ndarray, upper: np.ndarray, n: int
) -> np.ndarray:
    """The closest integer vector to `target` with sum n and lower <= q <= upper (exact)."""
    t = [x if isinstance(x, Fraction) else Fraction(float(x)) for x in target]
    lo = [int(v) for v in lower]
    hi = [int(v) for v in upper]
    k = len(t)
    if any(a > b for a, b in zip(lo, hi)):
        raise ValueError("quota bounds: a lower bound exceeds its upper bound")
    if not sum(lo) <= n <= sum(hi):
        raise ValueError(f"quotas: n = {n} outside [{sum(lo)}, {sum(hi)}]")
    if n == sum(lo):
        return np.array(lo, np.int64)
    if n == sum(hi):
        return np.array(hi, np.int64)
    # sweep lambda over the breakpoints of g(lambda) = sum clip(t + lambda, lo, hi)
    events: list[tuple[Fraction, int]] = []
    for j in range(k):
        if hi[j] > lo[j]:
            events.append((lo[j] - t[j], +1))
            events.append((hi[j] - t[j], -1))
    events.sort(key=lambda e: e[0])
    g = Fraction(sum(lo))
    slope = 0
    prev = events[0][0]
    lam = None
    for pos, delta in events:
        g_here = g + slope * (pos - prev)
        if g_here >= n and slope > 0:
            lam = prev + (n - g) / slope
            break
        g, prev = g_here, pos
        slope += delta
    assert lam is not None, "water-filling found no level"
    r = [min(max(t[j] + lam, lo[j]), hi[j]) for j in range(k)]
    q = [int(x.numerator // x.denominator) for x in r]
    frac = [r[j] - q[j] for j in range(k)]
    short = n - sum(q)
    for j in sorted(range(k), key=lambda j: (-frac[j], j))[:short]:
        q[j] += 1
    out = np.array(q, np.int64)
    assert int(out.sum()) == n and (out >= np.array(lo)).all() and (out <= np.array(hi)).all()
    return out


def dbp_quotas(
    centroids: np.ndarray,
    counts: np.ndarray,
    dist_sum: np.ndarray,
    n_keep: int,
    temperature: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Integer DBP quotas (sum = min(n_keep, M)) and what they came from, for the manifest."""
    counts = np.asarray(counts, np.int64)
    k = len(counts)
    n = min(int(n_keep), int(counts.sum()))
    c, d_inter, d_intra = complexity(centroids, counts, dist_sum)
    p = softmax_target(c, counts, temperature)
    floor = n // (2 * k)
    lower = np.minimum(floor, counts)
    target = [Fraction(float(pj)) * n for pj in p]
    q = closest_quotas(target, lower, counts, n)
    info = {
        "temperature": float(temperature),
        "floor": int(floor),
        "complexity": [round(float(v), 6) for v in c],
        "target": [round(float(v), 6) for v in p],
    }
    return q, info
