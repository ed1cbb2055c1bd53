"""Stage functions: what one worker does with one shard. No Ray here.

`score_shard` reads a shard's ids and embeddings, finds each row's nearest prototype and writes
scores/shard-NNNNNN.parquet (sorted by cluster, so the reducer can read cluster ranges by row
group), then its commit marker. `reduce_*` functions are the per-shard / per-range steps of the
reduce stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import manifest
from scoring.assign import NearestPrototype
from scoring.config import RunConfig
from scoring.prototypes import normalize, sample_rows
from scoring.select import (
    gather_candidates,
    keep_mask,
    key_histogram,
    rule_key,
    select_per_cluster,
)
from scoring.shards import Shard, embedding_matrix, read_shard
from scoring.storage import Store

log = logging.getLogger(__name__)

SCORE_ROW_GROUP = 65_536
SCORE_COLUMNS = ["id", "cluster", "distance"]


def score_key(shard_index: int) -> str:
    return f"scores/shard-{shard_index:06d}.parquet"


@dataclass(frozen=True)
class ShardSummary:
    shard: int
    rows: int
    seconds: float
    sha256: str


def load_embeddings(cfg: RunConfig, in_store: Store, shard: Shard):
    """(ids as pyarrow Array, float32 [n, d] embeddings) of a shard, validated."""
    where = f"{in_store.uri(shard.file)} (shard {shard.index})"
    table = read_shard_columns(in_store, shard, [cfg.id_column, cfg.embedding_column], where)
    ids = table[cfg.id_column].combine_chunks()
    if ids.null_count:
        raise ValueError(f"{where}: column '{cfg.id_column}' has {ids.null_count} null id(s)")
    x = embedding_matrix(table[cfg.embedding_column], where, cfg.embedding_column)
    check_finite(x, ids, where, cfg.embedding_column)
    return ids, x


def read_shard_columns(in_store: Store, shard: Shard, columns: list[str], where: str) -> pa.Table:
    pf = in_store.parquet_file(shard.file)
    names = pf.schema_arrow.names
    for c in columns:
        if c not in names:
            raise ValueError(f"{where}: column '{c}' not found (columns: {', '.join(names)})")
    return read_shard(in_store, shard, columns)


def check_finite(x: np.ndarray, ids: pa.Array, where: str, column: str) -> None:
    if x.size and not np.isfinite(x).all():
        row = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
        raise ValueError(
            f"{where}: column '{column}' has NaN or inf in the embedding of id {ids[row].as_py()!r}"
        )


def sample_shard(
    cfg: RunConfig, in_store: Store, shard: Shard, count: int, source: Any = None
) -> np.ndarray:
    """This shard's rows of the prototype sample (float32, normalised for cosine).

    With a `source` (a scoring.embed.ShardEmbedder), only the sample rows are embedded.
    """
    if count == 0:
        return np.zeros((0, 0), np.float32)
    rows = sample_rows(shard.index, shard.rows, count, cfg.seed)
    if source is not None:
        _, x = source.embed(shard, rows=rows)
        return normalize(x) if cfg.metric == "cosine" else x
    _, x = load_embeddings(cfg, in_store, shard)
    x = x[rows]
    return normalize(x) if cfg.metric == "cosine" else x


def scores_table(
    ids: pa.Array, cluster: np.ndarray, dist: np.ndarray, second: np.ndarray
) -> pa.Table:
    """The score table of a shard, sorted by cluster (stable)."""
    order = np.argsort(cluster, kind="stable")
    dist = dist + np.float32(0.0)  # fold -0.0 into 0.0
    margin = (second - dist).astype(np.float32)
    return pa.table(
        {
            "id": ids.take(pa.array(order)),
            "cluster": pa.array(cluster[order], pa.int32()),
            "distance": pa.array(dist[order], pa.float32()),
            "margin": pa.array(margin[order], pa.float32()),
        }
    )


def score_shard(
    cfg: RunConfig,
    in_store: Store,
    run_store: Store,
    shard: Shard,
    searcher: NearestPrototype,
    prototypes_sha: str,
    source: Any = None,
) -> ShardSummary:
    """Score one shard and commit it: data first, marker last.

    `source(shard) -> (ids, x)` embeds the shard (a scoring.embed.ShardEmbedder, or a closure
    over prefetched data); None reads the precomputed embedding column.
    """
    t0 = time.perf_counter()
    ids, x = source(shard) if source is not None else load_embeddings(cfg, in_store, shard)
    if x.shape[1] != searcher.d:
        raise ValueError(
            f"{in_store.uri(shard.file)} (shard {shard.index}): column "
            f"'{cfg.text_column or cfg.image_column or cfg.embedding_column}' "
            f"has width {x.shape[1]}, the prototypes "
            f"have {searcher.d}"
        )
    if cfg.metric == "cosine":
        x = normalize(x)
    cluster, dist, second = searcher.search(x)
    table = scores_table(ids, cluster, dist, second)
    nbytes, sha = run_store.write_parquet(
        score_key(shard.index), table, row_group_size=SCORE_ROW_GROUP
    )
    secs = time.perf_counter() - t0
    manifest.write_marker(
        run_store,
        "scores",
        shard.index,
        {
            "rows": table.num_rows,
            "sha256": sha,
            "bytes": nbytes,
            "prototypes_sha256": prototypes_sha,
            "seconds": round(secs, 3),
            "input": shard.file,
            "row_groups": shard.to_json()["row_groups"],
        },
    )
    return ShardSummary(shard.index, table.num_rows, secs, sha)


# -- reduce: per score shard -----------------------------------------------------------------
def read_scores(run_store: Store, shard_index: int, columns: list[str] | None = None) -> pa.Table:
    return run_store.read_parquet(score_key(shard_index), columns)


def shard_stats(run_store: Store, shard_index: int, k: int) -> dict[str, Any]:
    """Per-cluster row counts and distance sums of one score shard."""
    t = read_scores(run_store, shard_index, ["cluster", "distance"])
    cl = t["cluster"].to_numpy()
    d = t["distance"].to_numpy().astype(np.float64)
    return {
        "rows": t.num_rows,
        "counts": np.bincount(cl, minlength=k).astype(np.int64),
        "dist_sum": np.bincount(cl, weights=d, minlength=k),
    }


def _shard_keys(run_store: Store, shard_index: int, strategy: str, seed: int):
    t = read_scores(run_store, shard_index, ["id", "distance"])
    ids = t["id"].combine_chunks()
    return rule_key(strategy, t["distance"].to_numpy(), ids, seed), ids


def shard_histogram(
    run_store: Store,
    shard_index: int,
    strategy: str,
    seed: int,
    prefix: int,
    prefix_bits: int,
    total_bits: int,
) -> np.ndarray:
    keys, _ = _shard_keys(run_store, shard_index, strategy, seed)
    return key_histogram(keys, prefix, prefix_bits, total_bits)


def shard_candidates(
    run_store: Store,
    shard_index: int,
    strategy: str,
    seed: int,
    prefix: int,
    prefix_bits: int,
    total_bits: int,
    limit: int,
) -> pa.Table:
    keys, ids = _shard_keys(run_store, shard_index, strategy, seed)
    return gather_candidates(keys, ids, prefix, prefix_bits, total_bits, limit)


def keep_key(part: int) -> str:
    return f"keep/part-{part:06d}.parquet"


def write_keep_part(run_store: Store, part: int, table: pa.Table) -> dict[str, Any] | None:
    """Write one keep part (skipped when empty); returns its manifest entry."""
    if table.num_rows == 0:
        return None
    nbytes, sha = run_store.write_parquet(keep_key(part), table)
    return {"path": keep_key(part), "rows": table.num_rows, "bytes": nbytes, "sha256": sha}


def kept_counts(table: pa.Table, k: int) -> np.ndarray:
    return np.bincount(table["cluster"].to_numpy(), minlength=k).astype(np.int64)


def keep_global(
    run_store: Store, shard_index: int, strategy: str, seed: int, threshold, k: int
) -> tuple[dict[str, Any] | None, np.ndarray]:
    """Write the keep part of one score shard for a global rule."""
    t = read_scores(run_store, shard_index)
    ids = t["id"].combine_chunks()
    keys = rule_key(strategy, t["distance"].to_numpy(), ids, seed)
    kept = t.filter(pa.array(keep_mask(keys, ids, threshold)))
    return write_keep_part(run_store, shard_index, kept), kept_counts(kept, k)


# -- reduce: per cluster range ---------------------------------------------------------------
def read_cluster_range(run_store: Store, shard_indices: list[int], lo: int, hi: int) -> pa.Table:
    """All score rows with lo <= cluster < hi, reading only overlapping row groups."""
    import pyarrow.parquet as pq

    parts = []
    for s in shard_indices:
        pf = pq.ParquetFile(run_store.open(score_key(s)))
        col = pf.schema_arrow.get_field_index("cluster")
        groups = []
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(col).statistics
            if st is None or not st.has_min_max or (st.max >= lo and st.min < hi):
                groups.append(g)
        if groups:
            t = pf.read_row_groups(groups)
            cl = t["cluster"]
            parts.append(t.filter(pc.and_(pc.greater_equal(cl, lo), pc.less(cl, hi))))
    if not parts:
        return read_scores(run_store, shard_indices[0]).slice(0, 0) if shard_indices else None
    return pa.concat_tables(parts)


def keep_cluster_range(
    run_store: Store,
    shard_indices: list[int],
    part: int,
    lo: int,
    hi: int,
    quotas: np.ndarray,
    k: int,
) -> tuple[dict[str, Any] | None, np.ndarray]:
    t = read_cluster_range(run_store, shard_indices, lo, hi)
    kept = select_per_cluster(t, quotas)
    return write_keep_part(run_store, part, kept), kept_counts(kept, k)
