"""The prototype sample rule: a function of the input's rows and the seed, never of the layout.

The units of the rule are the input's row groups in canonical order: files in planning order
(sorted keys), row groups ascending; unit u is the u-th row group of that concatenation. Shards
are row-group-aligned slices of files, so the rule never sees `--shard-rows`, the worker count
or the cluster:

1. `sample_plan`: a generator seeded with (seed, 1) permutes all units and picks them in that
   order until they hold min(N, `SAMPLE_OVERSAMPLE` x S) rows; the S sample rows are split
   over the picked units by a multivariate hypergeometric draw (as many as a uniform draw of S
   rows from the picked units' rows would put in each). Result: rows to draw from each unit.
2. `unit_rows`: which rows of unit u, for its count c: c sorted positions drawn uniformly by a
   generator seeded with (seed, 2, u), computed by whichever worker reads that row group.

Together: S rows drawn uniformly from the picked row groups (a uniform draw when the picked
groups are all of them). The rows reach k-means in canonical (file, row group, row) order: a
shard's part holds its picked groups ascending, and parts are gathered in shard order, which is
file then row-group order. At 10^9 rows and a 1-2M-row sample the picked groups hold 8 x S rows,
a few % of the data, instead of every byte. The driver computes the plan from the footers
(one count per row group) and hands each shard task its (row group, unit, count) triples.

Sample size rule (`sample_size_rule`): the requested size (default 256 x k, faiss's upper
recommendation), at most N, and at most `SAMPLE_MAX_BYTES` of float32 embeddings when the width
is known at planning time; never below k.
"""

from __future__ import annotations

import hashlib

import numpy as np

SAMPLE_MAX_BYTES = 8 << 30  # cap on the float32 sample held by the k-means task
SAMPLE_OVERSAMPLE = 8  # the picked row groups hold 8x the sample's rows

# (row group in its file, canonical unit index, rows to draw from it): one shard's picks
Pick = tuple[int, int, int]


def sample_size_rule(
    requested: int, n_rows: int, k: int, dim: int | None, max_bytes: int = SAMPLE_MAX_BYTES
) -> int:
    """Rows to sample: the requested size, at most N, and at most max_bytes of float32 rows of
    width `dim` when known (never fewer than k rows)."""
    s = min(int(requested), int(n_rows))
    if dim:
        s = min(s, max(int(k), int(max_bytes) // (4 * int(dim))))
    return s


def sample_plan(
    unit_rows_: list[int] | np.ndarray,
    size: int,
    seed: int,
    oversample: int = SAMPLE_OVERSAMPLE,
) -> np.ndarray:
    """Rows to draw from each unit (the input's row groups in canonical order): int64, one
    entry per unit, summing to min(size, N); nonzero only on the picked units."""
    rows = np.asarray(unit_rows_, dtype=np.int64)
    total = int(rows.sum())
    s = min(int(size), total)
    if s >= total:
        return rows.copy()
    counts = np.zeros(len(rows), dtype=np.int64)
    if s <= 0:
        return counts
    target = min(total, int(oversample) * s)
    rng = np.random.default_rng([int(seed), 1])
    order = rng.permutation(len(rows))
    held = np.cumsum(rows[order])
    stop = int(np.searchsorted(held, target)) + 1  # the first prefix holding >= target rows
    picked = np.sort(order[:stop])
    picked = picked[rows[picked] > 0]
    counts[picked] = rng.multivariate_hypergeometric(rows[picked], s)
    return counts


def unit_rows(n: int, count: int, seed: int, unit: int) -> np.ndarray:
    """Sorted positions of the `count` sample rows among the `n` rows of unit `unit`."""
    if count >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 2, int(unit)])
    return np.sort(rng.choice(n, size=int(count), replace=False)).astype(np.int64)


def plan_digest(counts: np.ndarray, unit_rows_: list[int] | np.ndarray) -> str:
    """sha256 of the sample plan (rows drawn per unit): the resume check of a changed input file
    refuses a change that moves the sample to other row groups or counts. A sample of every row
    has one digest whatever the row groups (it is every row in canonical order)."""
    c = np.asarray(counts, dtype=np.int64)
    if np.array_equal(c, np.asarray(unit_rows_, dtype=np.int64)):
        return hashlib.sha256(b"every row").hexdigest()
    nz = np.flatnonzero(c)
    return hashlib.sha256(np.stack([nz, c[nz]]).astype("<i8").tobytes()).hexdigest()


def sample_digest(x: np.ndarray) -> str:
    """sha256 of one shard's sample rows (float32, C order): the resume check of a changed
    input file compares it with the digest recorded when the prototypes were fitted."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()
