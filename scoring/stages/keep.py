"""Stage `keep` of the reduce, per annotated part: the rule's picks, written to
keep/part-NNNNNN-<sha16>.parquet. Per-cluster rules keep the q_j first survivors of each cluster in
their order (hardest, easiest or stratified random);
global rules keep the survivors with (key, id) <= the threshold, which the radix select finds
from the parts' key histograms and candidates (also here)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import layout
from scoring.kernels.quotas import select_per_cluster
from scoring.kernels.radix import NBINS, Threshold, gather_candidates, keep_mask, key_histogram
from scoring.storage import Store, parquet_bytes
from scoring.strategies import GlobalRule


@dataclass
class KeepResult:
    """What one part kept: its keep-file entry for the manifest (None when it kept nothing),
    kept rows per cluster, kept rows per label."""

    entry: dict[str, Any] | None
    kept: np.ndarray  # int64 [k]
    labels: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def none(k: int) -> KeepResult:
        return KeepResult(None, np.zeros(k, np.int64))


def label_counts(table: pa.Table) -> dict[str, int]:
    """{str(label): rows}; a null label counts under 'null'."""
    if layout.LABEL not in table.column_names or table.num_rows == 0:
        return {}
    out: Counter = Counter()
    for item in pc.value_counts(table[layout.LABEL].combine_chunks()).to_pylist():
        v = item["values"]
        out["null" if v is None else str(v)] += int(item["counts"])
    return dict(out)


def cluster_counts(table: pa.Table, k: int) -> np.ndarray:
    return np.bincount(table["cluster"].to_numpy(), minlength=k).astype(np.int64)


@dataclass(frozen=True)
class DedupView:
    """The dedup of a selection over a run's annotated parts (`protoprune select`): a row is a
    duplicate when its stored max_similarity is >= 1 - eps, except the rows whose flag was
    re-decided from the embeddings (layout.redecided_key(part) in `store`, for the parts in
    `redecided`). eps None: no dedup, every row survives and the dedup columns are dropped.
    `same`: eps is the run's own, whose exact flags are the `duplicate` column."""

    eps: float | None
    store: Store | None = None  # the selection folder
    redecided: frozenset[int] = frozenset()
    same: bool = False

    def flags(self, table: pa.Table, part: int) -> np.ndarray:
        sim = table[layout.MAX_SIMILARITY].to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            dup = np.nan_to_num(sim, nan=-np.inf) >= 1.0 - float(self.eps)
        if part in self.redecided:
            r = self.store.read_parquet(layout.redecided_key(part))
            dup[r["row"].to_numpy()] = r[layout.DUPLICATE].to_numpy(zero_copy_only=False)
        return dup

    def apply(self, table: pa.Table, part: int) -> pa.Table:
        """The part with its `duplicate` column decided for this eps (none without dedup)."""
        if self.eps is None:
            return table.drop_columns([c for c in layout.DEDUP_COLUMNS if c in table.column_names])
        if self.same:
            return table
        i = table.column_names.index(layout.DUPLICATE)
        return table.set_column(i, layout.DUPLICATE, pa.array(self.flags(table, part)))


def survivors(table: pa.Table, view: DedupView | None = None, part: int = -1) -> pa.Table:
    """The rows dedup did not flag (all rows without dedup); with a selection's `view`, by its
    eps."""
    if view is not None:
        table = view.apply(table, part)
    if layout.DUPLICATE not in table.column_names:
        return table
    return table.filter(pc.invert(table[layout.DUPLICATE]))


def write_keep(run_store: Store, part: int, kept: pa.Table, k: int) -> KeepResult:
    """Write one keep part (none when empty)."""
    entry = None
    if kept.num_rows:
        data = parquet_bytes(kept, **layout.encoding(kept))  # named by its content
        sha = hashlib.sha256(data).hexdigest()
        key = layout.keep_key(part, sha)
        run_store.put_bytes(key, data)
        entry = {"path": key, "rows": kept.num_rows, "bytes": len(data), "sha256": sha}
    return KeepResult(entry, cluster_counts(kept, k), label_counts(kept))


def keep_quotas(
    run_store: Store, part: int, live: pa.Table, quotas, k: int, within: str, seed: int
) -> KeepResult:
    """The q_j first survivors of each cluster of an annotated part (in rank order) in the
    rule's order `within` (kernels.quotas.select_per_cluster)."""
    kept = select_per_cluster(live, quotas, presorted=True, within=within, seed=seed)
    return write_keep(run_store, part, kept, k)


def read_part(run_store: Store, part: int) -> pa.Table | None:
    key = layout.annotated_key(part)
    if not run_store.exists(key):
        return None  # an empty cluster range writes no part
    return run_store.read_parquet(key)


@dataclass(frozen=True)
class KeepTask:
    """Keep from one annotated part: by `quotas` (a per-cluster rule after dedup), or by the
    global `rule`'s `threshold`."""

    store: Store
    part: int
    k: int
    quotas: np.ndarray | None = None
    rule: GlobalRule | None = None
    seed: int = 0
    threshold: Threshold | None = None
    within: str = "hardest"  # with quotas: the rule's order inside clusters
    out: Store | None = None  # where keep/ goes (a selection folder); None: `store`
    view: DedupView | None = None  # a selection over the run's annotated parts


def keep_part(task: KeepTask) -> KeepResult:
    t = read_part(task.store, task.part)
    out = task.out or task.store
    if t is None:
        return KeepResult.none(task.k)
    live = survivors(t, task.view, task.part)
    if task.quotas is not None:
        return keep_quotas(out, task.part, live, task.quotas, task.k, task.within, task.seed)
    assert task.rule is not None and task.threshold is not None
    ids = live["id"].combine_chunks()
    keys = task.rule.key(live["distance"].to_numpy(), ids, task.seed)
    kept = live.filter(pa.array(keep_mask(keys, ids, task.threshold)))
    return write_keep(out, task.part, kept, task.k)


@dataclass(frozen=True)
class SelectTask:
    """One radix-select pass over one annotated part: the next digit's histogram under
    `prefix` (limit None), or the `limit` smallest (key, id) candidates under it."""

    store: Store
    part: int
    rule: GlobalRule
    seed: int
    prefix: int
    prefix_bits: int
    limit: int | None = None
    view: DedupView | None = None


def select_pass(task: SelectTask):
    """int64[65536] histogram, or a (key, id) table of candidates (None for an empty part)."""
    t = read_part(task.store, task.part)
    bits = task.rule.key_bits
    if t is None:
        return np.zeros(NBINS, np.int64) if task.limit is None else None
    live = survivors(t, task.view, task.part)
    ids = live["id"].combine_chunks()
    keys = task.rule.key(live["distance"].to_numpy(), ids, task.seed)
    if task.limit is None:
        return key_histogram(keys, task.prefix, task.prefix_bits, bits)
    return gather_candidates(keys, ids, task.prefix, task.prefix_bits, bits, task.limit)
