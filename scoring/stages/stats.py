"""Stage `stats` of the reduce, per group of score shards: cluster counts, distance sums and
the percentile histograms; and the duplicate-id check, per range of id hashes.

A group of shards is one task with one k-sized result, so what the driver receives does not
grow with the number of shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from scoring import layout
from scoring.inputs.parquet import groups_overlapping, read_groups
from scoring.kernels.percentile import level1_histogram, refine_histogram
from scoring.storage import Store


@dataclass(frozen=True)
class StatsTask:
    store: Store  # the run folder
    shards: list[int]
    k: int


@dataclass
class Stats:
    counts: np.ndarray  # int64 [k]: rows per cluster
    dist_sum: np.ndarray  # float64 [k]: sum of distances per cluster
    hist: np.ndarray  # int64 [65536]: the percentile's first-level histogram

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            self.counts + other.counts, self.dist_sum + other.dist_sum, self.hist + other.hist
        )

    @staticmethod
    def zero(k: int) -> Stats:
        return Stats(np.zeros(k, np.int64), np.zeros(k, np.float64), level1_histogram([]))


def read_scores(run_store: Store, shard_index: int, columns: list[str] | None = None) -> pa.Table:
    return run_store.read_parquet(layout.score_key(shard_index), columns)


def shard_stats(run_store: Store, shard_index: int, k: int) -> Stats:
    """Per-cluster row counts and distance sums of one score shard."""
    t = read_scores(run_store, shard_index, ["cluster", "distance"])
    cl = t["cluster"].to_numpy()
    d = t["distance"].to_numpy()
    return Stats(
        np.bincount(cl, minlength=k).astype(np.int64),
        np.bincount(cl, weights=d.astype(np.float64), minlength=k),
        level1_histogram(d),
    )


def group_stats(task: StatsTask) -> Stats:
    """`shard_stats` summed over a group of shards."""
    out = Stats.zero(task.k)
    for i in task.shards:
        out = out + shard_stats(task.store, i, task.k)
    return out


@dataclass(frozen=True)
class RefineTask:
    store: Store
    shards: list[int]
    prefixes: np.ndarray
    low_bits: int


def group_refine(task: RefineTask) -> np.ndarray:
    """The percentile refinement histogram (scoring.kernels.percentile) of a group of shards."""
    out = np.zeros((len(task.prefixes), 256), np.int64)
    for i in task.shards:
        d = read_scores(task.store, i, ["distance"])["distance"].to_numpy()
        out += refine_histogram(d, task.prefixes, task.low_bits)
    return out


def shard_groups(indices: list[int], tasks: int) -> list[list[int]]:
    """At most `tasks` contiguous, near-equal groups of shard indices (none empty)."""
    n = max(1, min(len(indices), int(tasks)))
    bounds = np.linspace(0, len(indices), n + 1).astype(np.int64)
    return [list(indices[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# -- duplicate ids: per-shard sorted id hashes (stages.score), checked by hash range ------------
def hash_ranges(n_rows: int, range_rows: int) -> list[tuple[int, int]]:
    """Split the 64-bit hash space into equal ranges of about range_rows ids each (hashes are
    uniform), as (lo, hi) with hi exclusive; the last hi is 2**64."""
    parts = max(1, -(-n_rows // max(1, range_rows)))
    edges = [(i << 64) // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class DuplicateIdsTask:
    store: Store
    shards: list[int]
    lo: int
    hi: int  # exclusive; 2**64 for the last range
    limit: int = 10


@dataclass
class DuplicateIds:
    count: int = 0  # ids of the range that occur more than once
    examples: list[dict[str, Any]] = field(default_factory=list)  # {"id", "where": [[shard, row]]}


def first_pass(task: StatsTask | DuplicateIdsTask) -> Stats | DuplicateIds:
    """The reduce's first pass, one map over both kinds of task: a shard group's stats or a
    hash range's duplicate ids."""
    if isinstance(task, DuplicateIdsTask):
        return duplicate_ids(task)
    return group_stats(task)


def duplicate_ids(task: DuplicateIdsTask) -> DuplicateIds:
    """Ids occurring more than once among the ids with lo <= hash < hi, over all shards.
    Memory: the hashes of one hash range. Only the hash column is read; the ids and rows of
    the few rows whose hash repeats are read after (a collision or a duplicate)."""
    lo, hi = task.lo, task.hi
    hashes, where = [], []  # per shard read: its hashes in the range; (shard, pf, groups, rows)
    for s in task.shards:
        pf = task.store.parquet_file(layout.ids_key(s))
        groups = groups_overlapping(pf, "hash", lo, hi)
        if not groups:
            continue
        h = read_groups(pf, groups, ["hash"])["hash"].to_numpy()
        m = h >= np.uint64(lo)
        if hi < 2**64:
            m &= h < np.uint64(hi)
        rows = np.flatnonzero(m)
        hashes.append(h[rows])
        where.append((s, pf, groups, rows))
    if not hashes:
        return DuplicateIds()
    h = np.concatenate(hashes)
    order = np.argsort(h, kind="stable")  # sorted runs, one per shard: a merge
    hs = h[order]
    same = np.nonzero(hs[1:] == hs[:-1])[0]
    if len(same) == 0:
        return DuplicateIds()
    # rows whose hash occurs more than once; compare the ids themselves (hash collisions)
    cand = np.unique(np.concatenate([order[same], order[same + 1]]))
    start = np.cumsum([0] + [len(x) for x in hashes])
    part = np.searchsorted(start, cand, side="right") - 1
    groups: dict[Any, list[list[int]]] = {}
    for j in np.unique(part):
        s, pf, g, rows = where[j]
        t = read_groups(pf, g, ["id", "row"]).take(pa.array(rows[cand[part == j] - start[j]]))
        for i, r in zip(t["id"].to_pylist(), t["row"].to_pylist()):
            groups.setdefault(i, []).append([int(s), int(r)])
    dups = [(i, sorted(w)) for i, w in groups.items() if len(w) > 1]
    dups.sort(key=lambda d: (d[1][0], str(d[0])))
    return DuplicateIds(len(dups), [{"id": i, "where": w} for i, w in dups[: task.limit]])
