"""Stage `annotate` of the reduce, per cluster range: scores + percentile + SemDeDup evidence.

`annotate_range` reads one contiguous cluster range from every score shard (and, with dedup,
the saved embeddings by the same row groups), adds `percentile` and, with dedup, `duplicate`,
`max_similarity` and `duplicate_of` (layout.DEDUP_COLUMNS), and writes
annotated/part-RRRRRR.parquet: all rows of the range, sorted by (cluster asc, distance desc,
id asc). Committed `scores/` files are never rewritten.

When a per-cluster rule's quotas are known before the range pass (no dedup), the same task
writes the range's keep part; for a global rule it returns the survivors' first radix digit
histogram, so the threshold search starts one pass over the annotated parts later.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import layout
from scoring.errors import BadInput
from scoring.inputs.parquet import groups_overlapping, read_groups
from scoring.kernels.dedup import (
    DEFAULT_BLOCK,
    Evidence,
    dedup_sorted,
    removal_curve,
    streamed_evidence,
)
from scoring.kernels.percentile import PercentileBins
from scoring.kernels.radix import key_histogram, rank_order
from scoring.stages.keep import KeepResult, cluster_counts, keep_quotas, label_counts, survivors
from scoring.storage import Store
from scoring.strategies import GlobalRule

RANGE_ROWS = 4_000_000  # rows per cluster range in the per-cluster reduce
DEDUP_MEMORY_FLOATS = 1 << 28  # with dedup: at most ~1 GiB of float32 embeddings per range; a
# single cluster above it is deduplicated through spilled chunks (`_streamed_dedup`)


@dataclass(frozen=True)
class RangeTask:
    """Annotate clusters [lo, hi) into annotated part `part`."""

    store: Store  # the run folder (scores, embeddings)
    shards: list[int]
    part: int
    lo: int
    hi: int
    k: int
    bins: PercentileBins
    dedup_eps: float | None = None
    quotas: np.ndarray | None = None  # per-cluster rule, no dedup pending: keep here too
    rule: GlobalRule | None = None  # global rule: return the first digit's histogram
    seed: int = 0
    block: int = DEFAULT_BLOCK
    stream_dim: int | None = None  # one cluster larger than `memory` floats: stream it
    memory: int = DEDUP_MEMORY_FLOATS
    within: str = "hardest"  # with quotas: the rule's order inside clusters
    out: Store | None = None  # where annotated/ and keep/ go (a selection); None: `store`


@dataclass
class RangeResult:
    survivors: np.ndarray  # int64 [k]: rows left after dedup, per cluster
    survivor_dist_sum: np.ndarray  # float64 [k]
    removed: np.ndarray  # int64 [k]: duplicates removed, per cluster
    labels: dict[str, int] = field(default_factory=dict)
    survivor_labels: dict[str, int] = field(default_factory=dict)
    annotated: str | None = None  # the part's key (None for an empty range)
    keep: KeepResult | None = None  # with quotas
    key_hist: np.ndarray | None = None  # with a global rule
    curve: np.ndarray | None = None  # with dedup evidence: rows removed per eps of EPS_GRID

    @staticmethod
    def empty(k: int) -> RangeResult:
        z = np.zeros(k, np.int64)
        return RangeResult(z, np.zeros(k, np.float64), z.copy())


def range_rows(dedup: bool, dim: int, memory: int) -> int:
    """Rows per cluster range: RANGE_ROWS, fewer with dedup (the range's `memory` floats of
    embeddings)."""
    if dedup and dim:
        return max(1, min(RANGE_ROWS, memory // dim))
    return RANGE_ROWS


def stream_dim(counts: np.ndarray, lo: int, hi: int, dedup: bool, dim: int, memory: int):
    """The embedding width when range [lo, hi) is one cluster of more than `memory` floats."""
    big = dedup and hi - lo == 1 and int(counts[lo]) * dim > memory
    return dim if big else None


def read_range(
    run_store: Store,
    shard_indices: list[int],
    lo: int,
    hi: int,
    with_embeddings: bool,
    provenance: bool = False,
) -> tuple[pa.Table | None, np.ndarray | None]:
    """Score rows with lo <= cluster < hi from all shards (+ their embeddings, same rows).
    With `provenance`, the columns _shard and _pos (row position among the shard's rows of
    the range) are added."""
    parts, embs = [], []
    for s in shard_indices:
        skey = layout.score_key(s)
        pf = run_store.parquet_file(skey)
        groups = groups_overlapping(pf, "cluster", lo, hi)
        if not groups:
            continue
        t = read_groups(pf, groups)
        mask = pc.and_(pc.greater_equal(t["cluster"], lo), pc.less(t["cluster"], hi))
        if with_embeddings:
            key = layout.embeddings_key(s)
            if not run_store.exists(key):
                raise BadInput(
                    f"{run_store.uri(key)}: not found (dedup needs the embeddings saved by the "
                    f"score stage; rerun with a new --run-id)"
                )
            ef = run_store.parquet_file(key)
            for g in groups:
                if ef.metadata.row_group(g).num_rows != pf.metadata.row_group(g).num_rows:
                    raise BadInput(f"{run_store.uri(key)}: row group {g} does not match {skey}")
            e = read_groups(ef, groups)
            if not e["id"].equals(t["id"]):
                raise BadInput(f"{run_store.uri(key)}: ids differ from {skey}")
            e = e.filter(mask)
            col_e = e["embedding"].combine_chunks()
            d = col_e.type.list_size
            embs.append(col_e.flatten().to_numpy(zero_copy_only=False).reshape(-1, d))
        t = t.filter(mask)
        if provenance:
            t = t.append_column("_shard", pa.array(np.full(t.num_rows, s, np.int64)))
            t = t.append_column("_pos", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        parts.append(t)
    if not parts:
        return None, None
    x = np.concatenate(embs) if with_embeddings else None
    return pa.concat_tables(parts), x


def evidence_columns(t: pa.Table, ev: Evidence) -> pa.Table:
    """Append duplicate, max_similarity (null without an earlier row) and duplicate_of (the
    id of that earlier row) to a rank-ordered table."""
    has = ev.earlier >= 0
    sim = pa.array(ev.max_similarity.astype(np.float32), mask=~has)
    of = t["id"].combine_chunks().take(pa.array(np.where(has, ev.earlier, 0), mask=~has))
    t = t.append_column(layout.DUPLICATE, pa.array(ev.duplicate))
    t = t.append_column(layout.MAX_SIMILARITY, sim)
    return t.append_column(layout.DUPLICATE_OF, of)


def annotate_range(task: RangeTask) -> RangeResult:
    """Write annotated/part-RRRRRR.parquet for clusters [lo, hi); see the module docstring."""
    eps = task.dedup_eps
    stream = task.stream_dim is not None and eps is not None
    t, x = read_range(
        task.store, task.shards, task.lo, task.hi, eps is not None and not stream, stream
    )
    if t is None or t.num_rows == 0:
        return RangeResult.empty(task.k)
    idx = rank_order(t)
    t = t.take(pa.array(idx))
    ev = None
    if stream:
        ev = _streamed_dedup(task, t)
        t = t.drop_columns(["_shard", "_pos"])
    elif eps is not None:
        ev = dedup_sorted(t["cluster"].to_numpy(), x[idx], float(eps), task.block)
    t = t.append_column(layout.PERCENTILE, pa.array(task.bins.percentile(t["distance"].to_numpy())))
    if ev is not None:
        t = evidence_columns(t, ev)
    out = task.out or task.store
    out.write_parquet(
        layout.annotated_key(task.part), t, row_group_size=layout.ROW_GROUP, **layout.encoding(t)
    )
    res = summarize(
        t, survivors(t), task.k, task.rule, task.seed, task.quotas, out, task.part, task.within
    )
    res.annotated = layout.annotated_key(task.part)
    return res


def summarize(
    t: pa.Table,
    live: pa.Table,
    k: int,
    rule,
    seed: int,
    quotas,
    out: Store,
    part: int,
    within: str = "hardest",
) -> RangeResult:
    """A range's counts from its annotated rows `t` and their survivors `live`: survivors,
    removed, labels, the removal curve, the first digit's histogram of a global `rule`, and
    the keep part by `quotas` in the order `within` (written to `out`) when they are known."""
    res = RangeResult.empty(k)
    cl = live["cluster"].to_numpy()
    res.survivors = np.bincount(cl, minlength=k).astype(np.int64)
    res.survivor_dist_sum = np.bincount(
        cl, weights=live["distance"].to_numpy().astype(np.float64), minlength=k
    )
    res.removed = cluster_counts(t, k) - res.survivors
    res.labels = label_counts(t)
    res.survivor_labels = label_counts(live)
    if layout.MAX_SIMILARITY in t.column_names:
        sim = t[layout.MAX_SIMILARITY].to_numpy(zero_copy_only=False)
        res.curve = removal_curve(sim)
    if rule is not None:
        keys = rule.key(live["distance"].to_numpy(), live["id"].combine_chunks(), seed)
        res.key_hist = key_histogram(keys, 0, 0, rule.key_bits)
    if quotas is not None:
        res.keep = keep_quotas(out, part, live, quotas, k, within, seed)
    return res


def _streamed_dedup(task: RangeTask, t: pa.Table) -> Evidence:
    """Dedup of one cluster too large for memory. `t` is sorted by rank and carries _shard and
    _pos. Each shard's embeddings of the cluster are read once and spilled, by rank chunk, to
    layout.dedup_spill(part); the chunks are then compared pairwise (see
    kernels.dedup.streamed_evidence) and the spill is deleted."""
    store, part, d = task.store, task.part, int(task.stream_dim)
    n = t.num_rows
    lo = int(t["cluster"][0].as_py())
    chunk_rows = max(1, task.memory // (2 * d))
    tmp = layout.dedup_spill(part)
    store.delete(tmp)
    shard_of = t["_shard"].to_numpy()
    pos = t["_pos"].to_numpy()
    rank = np.arange(n)
    for s in np.unique(shard_of):
        sel = shard_of == s
        sf = store.parquet_file(layout.score_key(int(s)))
        groups = groups_overlapping(sf, "cluster", lo, lo + 1)
        cl = read_groups(sf, groups, ["cluster"])["cluster"]
        ef = store.parquet_file(layout.embeddings_key(int(s)))
        e = read_groups(ef, groups).filter(pc.equal(cl, lo))["embedding"].combine_chunks()
        x = e.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)[pos[sel]]
        r = rank[sel]
        for c in np.unique(r // chunk_rows):
            m = (r // chunk_rows) == c
            buf = io.BytesIO()
            np.savez(buf, rank=r[m], x=x[m])
            store.put_bytes(layout.spill_chunk(part, int(c), int(s)), buf.getvalue())

    def load_chunk(c: int) -> np.ndarray:
        ranks, xs = [], []
        for key in store.list(layout.spill_chunk_dir(part, c), suffix=".npz"):
            z = np.load(io.BytesIO(store.get_bytes(key)))
            ranks.append(z["rank"])
            xs.append(z["x"])
        r, x = np.concatenate(ranks), np.concatenate(xs)
        expect = min(chunk_rows, n - c * chunk_rows)
        assert len(r) == expect, f"spilled chunk {c}: {len(r)} rows, expected {expect}"
        return x[np.argsort(r)]

    try:
        return streamed_evidence(n, load_chunk, chunk_rows, d, float(task.dedup_eps), task.block)
    finally:
        store.delete(tmp)
