"""Brute-force single-process references for dedup, dbp and percentile (written independently
of scoring/: full similarity matrices, plain loops, greedy integer quotas)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pyarrow as pa

from scoring.storage import Store
from tests.helpers import read_all


def all_scores(run: Store) -> pa.Table:
    return read_all(run, "scores")


def hardest_first(ids: list, dist: np.ndarray) -> list[int]:
    return sorted(range(len(ids)), key=lambda i: (-float(dist[i]), ids[i]))


def dedup_survivors(ids: list, cluster: np.ndarray, dist: np.ndarray, x: np.ndarray, eps: float):
    """Set of ids that survive SemDeDup (x: rows aligned with ids)."""
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = set()
    for j in np.unique(cluster):
        members = [i for i in range(len(ids)) if cluster[i] == j]
        order = sorted(members, key=lambda i: (-float(dist[i]), ids[i]))
        xs = x[order]
        s = xs @ xs.T
        for r, i in enumerate(order):
            if r == 0 or s[r, :r].max() < 1.0 - eps:
                out.add(ids[i])
    return out


def exact_ranks(ids: list, dist: np.ndarray) -> dict:
    """id -> rank / (N - 1) by (distance asc, id asc)."""
    order = sorted(range(len(ids)), key=lambda i: (float(dist[i]), ids[i]))
    n = len(ids)
    return {ids[i]: r / max(n - 1, 1) for r, i in enumerate(order)}


def dbp_reference(centroids, counts, dist_sum, n_keep: int, temperature: float) -> list[int]:
    """DBP quotas: complexity in loops, then greedy L2 increments from the lower bounds."""
    c = np.asarray(centroids, np.float64)
    k = len(c)
    unit = [v / math.sqrt(float(v @ v)) for v in c]
    cx = []
    for j in range(k):
        sims = sorted((float(unit[j] @ unit[i]) for i in range(k) if i != j), reverse=True)
        m = min(20, k - 1)
        d_inter = sum(1 - s for s in sims[:m]) / m if m else 1.0
        d_intra = dist_sum[j] / counts[j] if counts[j] else 0.0
        cx.append(d_inter * d_intra)
    live = [j for j in range(k) if counts[j] > 0]
    zmax = max(cx[j] / temperature for j in live)
    w = {j: math.exp(cx[j] / temperature - zmax) for j in live}
    tot = sum(w.values())
    n = min(n_keep, int(sum(counts)))
    t = [Fraction(w[j] / tot) * n if j in w else Fraction(0) for j in range(k)]
    lo = [min(n // (2 * k), int(counts[j])) for j in range(k)]
    q = list(lo)
    for _ in range(n - sum(q)):
        best = min(
            (j for j in range(k) if q[j] < counts[j]), key=lambda j: (2 * (q[j] - t[j]) + 1, j)
        )
        q[best] += 1
    return q


def per_cluster_pick(ids, cluster, dist, quotas, allowed: set) -> set:
    out = set()
    for j in range(len(quotas)):
        members = [i for i in range(len(ids)) if cluster[i] == j and ids[i] in allowed]
        members.sort(key=lambda i: (-float(dist[i]), ids[i]))
        out |= {ids[i] for i in members[: quotas[j]]}
    return out
