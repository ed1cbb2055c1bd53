"""The prototype sample rule: deterministic and distributable.

Shard i contributes a number of rows proportional to its size (largest remainder, ties to the
lower shard index). Inside a shard the sample touches few row groups (`sample_groups`): a
generator seeded with (seed, shard index) picks random row groups until they hold
`SAMPLE_OVERSAMPLE` x the shard's share, then draws the share uniformly from those rows. At
10^9 rows and a 1-2M-row sample this reads one row group per shard (a few % of the data)
instead of every byte. Any worker can compute its shard's sample rows without talking to the
others.

Sample size rule (`sample_size_rule`): the requested size (default 256 x k, faiss's upper
recommendation), at most N, and at most `SAMPLE_MAX_BYTES` of float32 embeddings when the width
is known at planning time; never below k.
"""

from __future__ import annotations

import hashlib

import numpy as np

SAMPLE_MAX_BYTES = 8 << 30  # cap on the float32 sample held by the k-means task
SAMPLE_OVERSAMPLE = 8  # a shard's picked row groups hold 8x its share of the sample


def sample_counts(shard_rows: list[int], sample_size: int) -> np.ndarray:
    """Rows to draw from each shard: proportional to its rows, summing to min(S, N)."""
    rows = np.asarray(shard_rows, dtype=np.int64)
    total = int(rows.sum())
    s = min(int(sample_size), total)
    if total == 0:
        return np.zeros(len(rows), dtype=np.int64)
    prod = rows * s  # exact in int64 for N*S < 9.2e18
    base = prod // total
    rem = prod % total
    short = s - int(base.sum())
    if short:
        order = np.lexsort((np.arange(len(rows)), -rem))  # largest remainder, lower index first
        base[order[:short]] += 1
    return base


def sample_size_rule(
    requested: int, n_rows: int, k: int, dim: int | None, max_bytes: int = SAMPLE_MAX_BYTES
) -> int:
    """Rows to sample: the requested size, at most N, and at most max_bytes of float32 rows of
    width `dim` when known (never fewer than k rows)."""
    s = min(int(requested), int(n_rows))
    if dim:
        s = min(s, max(int(k), int(max_bytes) // (4 * int(dim))))
    return s


def sample_groups(
    group_rows: list[int],
    count: int,
    seed: int,
    shard_index: int,
    oversample: int = SAMPLE_OVERSAMPLE,
) -> tuple[list[int], np.ndarray]:
    """Which of a shard's row groups to read, and which rows of them, for its sample share.

    Returns (positions into `group_rows` of the picked groups, ascending; sorted row positions
    inside the concatenation of the picked groups). Groups are picked in a seeded random order
    until they hold min(all rows, oversample x count) rows; the count rows are then drawn
    uniformly from them.
    """
    total = int(sum(group_rows))
    if count >= total:
        return [i for i, r in enumerate(group_rows) if r], np.arange(total, dtype=np.int64)
    target = min(total, oversample * int(count))
    rng = np.random.default_rng([seed, shard_index, 1])
    picked: list[int] = []
    acc = 0
    for g in rng.permutation(len(group_rows)):
        if group_rows[g] == 0:
            continue
        picked.append(int(g))
        acc += int(group_rows[g])
        if acc >= target:
            break
    picked.sort()
    rows = np.sort(rng.choice(acc, size=int(count), replace=False))
    return picked, rows


def sample_digest(x: np.ndarray) -> str:
    """sha256 of one shard's sample rows (float32, C order): the resume check of a changed
    input file compares it with the digest recorded when the prototypes were fitted."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()
