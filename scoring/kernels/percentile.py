"""Difficulty percentiles from a global histogram (no global sort).

A row's percentile is its rank by distance (ascending: 0 = easiest, 1 = hardest) among all N
rows, divided by N - 1. It is estimated from a histogram of the order-preserving 32-bit key of
the distance (`select.float_key`): level 1 counts the top 16 bits; every bin holding more than
2 x 0.1% of the rows is split by the next 8 bits, and again by the last 8 bits, so the final
bins are single keys where needed. A row in a bin with c rows and b rows before it gets rank
b + (c - 1) / 2, at most (c - 1) / 2 from its exact rank: within 0.1% of N - 1 whenever the
bin could be split far enough. Rows with bit-identical distances share one key; such a group
gets its mid-rank (exact rank with ties broken by id lies within half the group's size).
At most 500 bins can be heavy at each level, so the driver holds at most
65,536 + 2 x 500 x 256 bins.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scoring.kernels.radix import float_key

TOLERANCE = 0.001
LEVEL1_BITS = 16
REFINE_BITS = 8


def level1_histogram(distance: np.ndarray) -> np.ndarray:
    """Counts of the top 16 bits of the distance keys (int64[65536])."""
    keys = float_key(distance)
    return np.bincount(keys >> np.uint32(32 - LEVEL1_BITS), minlength=1 << LEVEL1_BITS).astype(
        np.int64
    )


def refine_histogram(distance: np.ndarray, prefixes: np.ndarray, low_bits: int) -> np.ndarray:
    """For each sorted prefix (key >> low_bits), counts of the next 8 bits: int64[len, 256]."""
    keys = float_key(distance)
    n = len(prefixes)
    if n == 0 or len(keys) == 0:
        return np.zeros((n, 1 << REFINE_BITS), np.int64)
    pre = keys >> np.uint32(low_bits)
    pos = np.searchsorted(prefixes, pre)
    pos_c = np.minimum(pos, n - 1)
    match = (pos < n) & (prefixes[pos_c] == pre)
    digit = (keys >> np.uint32(low_bits - REFINE_BITS)) & np.uint32((1 << REFINE_BITS) - 1)
    flat = pos_c[match].astype(np.int64) * (1 << REFINE_BITS) + digit[match].astype(np.int64)
    out = np.bincount(flat, minlength=n << REFINE_BITS).astype(np.int64)
    return out.reshape(n, 1 << REFINE_BITS)


class PercentileBins:
    """Disjoint key bins covering the uint32 key space, in key order, with global counts.

    Bin i holds the keys k with k >> low_bits[i] == start[i] >> low_bits[i].
    """

    def __init__(self, level1: np.ndarray, tolerance: float = TOLERANCE):
        hist = np.asarray(level1, np.int64)
        assert len(hist) == 1 << LEVEL1_BITS
        self.n = int(hist.sum())
        self.tolerance = tolerance
        self.start = np.arange(1 << LEVEL1_BITS, dtype=np.uint64) << np.uint64(32 - LEVEL1_BITS)
        self.low_bits = np.full(1 << LEVEL1_BITS, 32 - LEVEL1_BITS, np.int64)
        self.count = hist
        self.levels = 1

    def _heavy(self) -> np.ndarray:
        limit = 2 * self.tolerance * max(self.n - 1, 0)
        return np.flatnonzero((self.count - 1 > limit) & (self.low_bits > 0))

    def refine_request(self) -> tuple[np.ndarray, int] | None:
        """(sorted prefixes, low_bits) of the bins to split next, or None when done."""
        h = self._heavy()
        if len(h) == 0:
            return None
        bits = int(self.low_bits[h].max())
        h = h[self.low_bits[h] == bits]
        return (self.start[h] >> np.uint64(bits)).astype(np.uint32), bits

    def apply_refinement(self, prefixes: np.ndarray, low_bits: int, counts: np.ndarray) -> None:
        """Replace the bins named by prefixes with their 256 sub-bins (counts summed over
        all shards)."""
        counts = np.asarray(counts, np.int64)
        pre_of_bin = self.start >> np.uint64(low_bits)
        split = np.flatnonzero(
            (self.low_bits == low_bits) & np.isin(pre_of_bin, prefixes.astype(np.uint64))
        )
        assert len(split) == len(prefixes)
        assert (counts.sum(axis=1) == self.count[split]).all(), "refinement counts disagree"
        nb = low_bits - REFINE_BITS
        sub = 1 << REFINE_BITS
        new_start, new_bits, new_count = [], [], []
        prev = 0
        for row, i in enumerate(split):
            new_start.append(self.start[prev:i])
            new_bits.append(self.low_bits[prev:i])
            new_count.append(self.count[prev:i])
            new_start.append(self.start[i] + (np.arange(sub, dtype=np.uint64) << np.uint64(nb)))
            new_bits.append(np.full(sub, nb, np.int64))
            new_count.append(counts[row])
            prev = i + 1
        new_start.append(self.start[prev:])
        new_bits.append(self.low_bits[prev:])
        new_count.append(self.count[prev:])
        self.start = np.concatenate(new_start)
        self.low_bits = np.concatenate(new_bits)
        self.count = np.concatenate(new_count)
        # drop empty bins to keep the table small (lookups never land in them)
        keep = self.count > 0
        keep[0] = True
        self.start, self.low_bits, self.count = (
            self.start[keep],
            self.low_bits[keep],
            self.count[keep],
        )
        self.levels += 1

    def percentile(self, distance: np.ndarray) -> np.ndarray:
        """Estimated rank / (N - 1) of each distance, float32 in [0, 1]."""
        keys = float_key(distance).astype(np.uint64)
        before = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        i = np.searchsorted(self.start, keys, side="right") - 1
        rank = before[i] + (self.count[i] - 1) / 2.0
        if self.n <= 1:
            return np.zeros(len(keys), np.float32)
        return np.clip(rank / (self.n - 1), 0.0, 1.0).astype(np.float32)

    def info(self) -> dict[str, Any]:
        return {"bins": int(len(self.count)), "levels": self.levels, "tolerance": self.tolerance}
