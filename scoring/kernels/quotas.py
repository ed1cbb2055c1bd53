"""Per-cluster quotas and picks: balanced quotas, cluster ranges, the q_j first rows of each
cluster. Pure numpy/pyarrow, integer arithmetic where every implementation must agree."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring.kernels.radix import random_key


def balanced_quotas(counts: np.ndarray, n_keep: int) -> np.ndarray:
    """q_j = floor(n_keep·n_j/M) plus one for the largest remainders (ties: lower j). Exact."""
    n = [int(c) for c in counts]
    m = sum(n)
    if m == 0:
        return np.zeros(len(n), dtype=np.int64)
    q = [n_keep * c // m for c in n]
    rem = [n_keep * c % m for c in n]
    short = n_keep - sum(q)
    order = sorted(range(len(n)), key=lambda j: (-rem[j], j))
    for j in order[:short]:
        q[j] += 1
    return np.array(q, dtype=np.int64)


def plan_cluster_ranges(counts: np.ndarray, max_rows: int) -> list[tuple[int, int]]:
    """Contiguous cluster ranges [a, b) of at most max_rows rows (a single cluster may exceed)."""
    ranges: list[tuple[int, int]] = []
    start, acc = 0, 0
    for j, c in enumerate(np.asarray(counts, dtype=np.int64)):
        if acc and acc + c > max_rows:
            ranges.append((start, j))
            start, acc = j, 0
        acc += int(c)
    if len(counts):
        ranges.append((start, len(counts)))
    return ranges


WITHIN = ("hardest", "easiest", "random")  # the orders a per-cluster rule may pick rows in


def select_per_cluster(
    table: pa.Table,
    quotas: np.ndarray,
    presorted: bool = False,
    within: str = "hardest",
    seed: int = 0,
) -> pa.Table:
    """Rows of `table` (all rows of some whole clusters) with the q_j first rows of each
    cluster in the order `within`:

    * "hardest": distance desc, id asc;
    * "easiest": distance asc, id asc;
    * "random": hash(seed, id) asc, id asc (the `random` rule's key, per cluster: a
      stratified random sample).

    `quotas` is indexed by global cluster id. `presorted`: the table is already in (cluster
    asc, distance desc, id asc) order (an annotated part), so "hardest" does not sort again.
    """
    if within not in WITHIN:
        raise ValueError(f"within must be one of {WITHIN} (got {within!r})")
    if table.num_rows == 0:
        return table
    t = table
    if within == "random":
        key = pa.array(random_key(table["id"], seed))
        t = table.append_column("_key", key)
        idx = pc.sort_indices(
            t, sort_keys=[("cluster", "ascending"), ("_key", "ascending"), ("id", "ascending")]
        )
        t = t.take(idx).drop_columns(["_key"])
    elif within == "easiest" or not presorted:
        order = "descending" if within == "hardest" else "ascending"
        idx = pc.sort_indices(
            table, sort_keys=[("cluster", "ascending"), ("distance", order), ("id", "ascending")]
        )
        t = table.take(idx)
    cl = t["cluster"].to_numpy()
    starts = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(cl)]))
    rank = np.arange(len(cl)) - first
    keep = rank < np.asarray(quotas)[cl]
    return t.filter(pa.array(keep))
