"""The reduce's range pass: scores + percentile + SemDeDup flags, by cluster range.

`annotate_range` reads one contiguous cluster range from every score shard (and, with dedup,
the saved embeddings by the same row groups), adds the columns `percentile` and (with dedup)
`duplicate`, and writes `annotated/part-RRRRRR.parquet`: all rows of the range, sorted by
(cluster asc, distance desc, id asc). Committed `scores/` files are never rewritten; the
annotated parts are the scores table with the new columns, one file per cluster range.

The selection rule then reads the annotated parts: per-cluster rules pick inside each part
(in the same task when their quotas are known before dedup), global rules run the radix
select over the dedup survivors of all parts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring.dedup import DEFAULT_BLOCK, dedup_sorted
from scoring.percentile import PercentileBins
from scoring.score import (
    SCORE_ROW_GROUP,
    embeddings_key,
    kept_counts,
    score_key,
    write_keep_part,
)
from scoring.select import gather_candidates, keep_mask, key_histogram, rule_key, select_per_cluster
from scoring.shards import read_groups
from scoring.storage import Store


def annotated_key(part: int) -> str:
    return f"annotated/part-{part:06d}.parquet"


DEDUP_MEMORY_FLOATS = 1 << 28  # a cluster with more embedding floats streams through storage


def _groups(pf, lo: int, hi: int) -> list[int]:
    """Row groups of a cluster-sorted file that may hold clusters in [lo, hi)."""
    col = pf.schema_arrow.get_field_index("cluster")
    groups = []
    for g in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(g).column(col).statistics
        if st is None or not st.has_min_max or (st.max >= lo and st.min < hi):
            groups.append(g)
    return groups


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
        pf = run_store.parquet_file(score_key(s))
        groups = _groups(pf, lo, hi)
        if not groups:
            continue
        t = read_groups(pf, groups)
        mask = pc.and_(pc.greater_equal(t["cluster"], lo), pc.less(t["cluster"], hi))
        if with_embeddings:
            key = embeddings_key(s)
            if not run_store.exists(key):
                raise FileNotFoundError(
                    f"{run_store.uri(key)}: not found (dedup needs the embeddings saved by the "
                    f"score stage; rerun with a new --run-id)"
                )
            ef = run_store.parquet_file(key)
            for g in groups:
                if ef.metadata.row_group(g).num_rows != pf.metadata.row_group(g).num_rows:
                    raise ValueError(
                        f"{run_store.uri(key)}: row group {g} does not match {score_key(s)}"
                    )
            e = read_groups(ef, groups)
            if not e["id"].equals(t["id"]):
                raise ValueError(f"{run_store.uri(key)}: ids differ from {score_key(s)}")
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


def label_counts(table: pa.Table) -> dict[str, int]:
    """{str(label): rows}; a null label counts under 'null'."""
    if "label" not in table.column_names or table.num_rows == 0:
        return {}
    out: dict[str, int] = {}
    for item in pc.value_counts(table["label"].combine_chunks()).to_pylist():
        v = item["values"]
        out["null" if v is None else str(v)] = out.get("null" if v is None else str(v), 0) + int(
            item["counts"]
        )
    return out


def survivors(table: pa.Table) -> pa.Table:
    if "duplicate" not in table.column_names:
        return table
    return table.filter(pc.invert(table["duplicate"]))


def annotate_range(
    run_store: Store,
    shard_indices: list[int],
    part: int,
    lo: int,
    hi: int,
    k: int,
    bins: PercentileBins,
    dedup_eps: float | None,
    quotas: np.ndarray | None = None,
    block: int = DEFAULT_BLOCK,
    stream_dim: int | None = None,
    memory: int = DEDUP_MEMORY_FLOATS,
    rule: tuple[str, int, int] | None = None,
) -> dict[str, Any]:
    """Write annotated/part-RRRRRR.parquet for clusters [lo, hi); with `quotas` (per-cluster
    rule, no dedup pending) also write keep/part-RRRRRR.parquet. Returns k-vectors and counts.

    `rule` = (strategy, seed, key bits) of a global rule: the range's survivors' first radix
    digit histogram is returned too (`key_hist`), so the threshold search starts one pass
    over the annotated parts later.

    `stream_dim` (the embedding width) marks a range of one cluster whose embeddings exceed
    `memory` floats: it is deduplicated through spilled rank-ordered chunks (see
    `_streamed_dedup`) instead of in memory."""
    stream = stream_dim is not None and dedup_eps is not None
    t, x = read_range(
        run_store, shard_indices, lo, hi, dedup_eps is not None and not stream, stream
    )
    res: dict[str, Any] = {
        "survivors": np.zeros(k, np.int64),
        "survivor_dist_sum": np.zeros(k, np.float64),
        "removed": np.zeros(k, np.int64),
        "labels": {},
        "survivor_labels": {},
        "entry": None,
        "kept": np.zeros(k, np.int64),
        "kept_labels": {},
        "annotated": None,
    }
    if t is None or t.num_rows == 0:
        return res
    idx = pc.sort_indices(
        t, sort_keys=[("cluster", "ascending"), ("distance", "descending"), ("id", "ascending")]
    )
    t = t.take(idx)
    dup = None
    if stream:
        dup = _streamed_dedup(run_store, part, t, float(dedup_eps), stream_dim, memory, block)
        t = t.drop_columns(["_shard", "_pos"])
    elif dedup_eps is not None:
        x = x[idx.to_numpy()]
        dup = dedup_sorted(t["cluster"].to_numpy(), x, float(dedup_eps), block)
    t = t.append_column("percentile", pa.array(bins.percentile(t["distance"].to_numpy())))
    if dup is not None:
        t = t.append_column("duplicate", pa.array(dup))
    run_store.write_parquet(annotated_key(part), t, row_group_size=SCORE_ROW_GROUP)
    res["annotated"] = annotated_key(part)
    live = survivors(t)
    cl = live["cluster"].to_numpy()
    res["survivors"] = np.bincount(cl, minlength=k).astype(np.int64)
    res["survivor_dist_sum"] = np.bincount(
        cl, weights=live["distance"].to_numpy().astype(np.float64), minlength=k
    )
    res["removed"] = kept_counts(t, k) - res["survivors"]
    res["labels"] = label_counts(t)
    res["survivor_labels"] = label_counts(live)
    if rule is not None:
        strategy, seed, bits = rule
        keys = rule_key(strategy, live["distance"].to_numpy(), live["id"].combine_chunks(), seed)
        res["key_hist"] = key_histogram(keys, 0, 0, bits)
    if quotas is not None:
        res.update(_keep_from(run_store, part, live, quotas, k))
    return res


def _streamed_dedup(
    run_store: Store, part: int, t: pa.Table, eps: float, d: int, memory: int, block: int
) -> np.ndarray:
    """Dedup of one cluster too large for memory. `t` is sorted by rank and carries _shard and
    _pos. Each shard's embeddings of the cluster are read once and spilled, by rank chunk, to
    `_tmp/dedup/part-RRRRRR/`; the chunks are then compared pairwise (see
    dedup.streamed_flags) and the spill is deleted."""
    import io

    from scoring.dedup import streamed_flags

    n = t.num_rows
    lo = int(t["cluster"][0].as_py())
    chunk_rows = max(1, memory // (2 * d))
    tmp = f"_tmp/dedup/part-{part:06d}"
    run_store.delete(tmp)
    shard_of = t["_shard"].to_numpy()
    pos = t["_pos"].to_numpy()
    rank = np.arange(n)
    for s in np.unique(shard_of):
        sel = shard_of == s
        sf = run_store.parquet_file(score_key(int(s)))
        groups = _groups(sf, lo, lo + 1)
        cl = read_groups(sf, groups, ["cluster"])["cluster"]
        ef = run_store.parquet_file(embeddings_key(int(s)))
        e = read_groups(ef, groups).filter(pc.equal(cl, lo))["embedding"].combine_chunks()
        x = e.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)[pos[sel]]
        r = rank[sel]
        for c in np.unique(r // chunk_rows):
            m = (r // chunk_rows) == c
            buf = io.BytesIO()
            np.savez(buf, rank=r[m], x=x[m])
            run_store.put_bytes(f"{tmp}/chunk-{int(c):06d}/shard-{int(s):06d}.npz", buf.getvalue())

    def load_chunk(c: int) -> np.ndarray:
        ranks, xs = [], []
        for key in run_store.list(f"{tmp}/chunk-{c:06d}/", suffix=".npz"):
            z = np.load(io.BytesIO(run_store.get_bytes(key)))
            ranks.append(z["rank"])
            xs.append(z["x"])
        r, x = np.concatenate(ranks), np.concatenate(xs)
        expect = min(chunk_rows, n - c * chunk_rows)
        assert len(r) == expect, f"spilled chunk {c}: {len(r)} rows, expected {expect}"
        return x[np.argsort(r)]

    try:
        return streamed_flags(n, load_chunk, chunk_rows, d, eps, block)
    finally:
        run_store.delete(tmp)


def _keep_from(run_store: Store, part: int, live: pa.Table, quotas, k: int) -> dict[str, Any]:
    kept = select_per_cluster(live, quotas)
    return {
        "entry": write_keep_part(run_store, part, kept),
        "kept": kept_counts(kept, k),
        "kept_labels": label_counts(kept),
    }


def _read_part(run_store: Store, part: int) -> pa.Table | None:
    key = annotated_key(part)
    if not run_store.exists(key):
        return None  # an empty cluster range writes no part
    return run_store.read_parquet(key)


def keep_range_part(run_store: Store, part: int, quotas: np.ndarray, k: int) -> dict[str, Any]:
    """Per-cluster rule after dedup: pick the q_j hardest survivors in one annotated part."""
    t = _read_part(run_store, part)
    if t is None:
        return {"entry": None, "kept": np.zeros(k, np.int64), "kept_labels": {}}
    return _keep_from(run_store, part, survivors(t), quotas, k)


def _part_keys(run_store: Store, part: int, strategy: str, seed: int):
    t = _read_part(run_store, part)
    if t is None:
        return None, None, None
    live = survivors(t)
    ids = live["id"].combine_chunks()
    return rule_key(strategy, live["distance"].to_numpy(), ids, seed), ids, live


def part_histogram(run_store, part, strategy, seed, prefix, prefix_bits, total_bits):
    from scoring.select import NBINS

    keys, _, _ = _part_keys(run_store, part, strategy, seed)
    if keys is None:
        return np.zeros(NBINS, np.int64)
    return key_histogram(keys, prefix, prefix_bits, total_bits)


def part_candidates(run_store, part, strategy, seed, prefix, prefix_bits, total_bits, limit):
    keys, ids, _ = _part_keys(run_store, part, strategy, seed)
    if keys is None:
        return None
    return gather_candidates(keys, ids, prefix, prefix_bits, total_bits, limit)


def keep_global_part(
    run_store: Store, part: int, strategy: str, seed: int, threshold, k: int
) -> dict[str, Any]:
    """Global rule: keep the survivors of one annotated part with (key, id) <= threshold."""
    keys, ids, live = _part_keys(run_store, part, strategy, seed)
    if keys is None:
        return {"entry": None, "kept": np.zeros(k, np.int64), "kept_labels": {}}
    kept = live.filter(pa.array(keep_mask(keys, ids, threshold)))
    return {
        "entry": write_keep_part(run_store, part, kept),
        "kept": kept_counts(kept, k),
        "kept_labels": label_counts(kept),
    }


def merge_counts(total: Counter, part: dict[str, int]) -> None:
    for key, v in part.items():
        total[key] += v
