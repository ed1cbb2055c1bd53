"""Stage functions: what one worker does with one shard. No Ray here.

`score_shard` reads a shard's ids and embeddings, finds each row's nearest prototype and writes
scores/shard-NNNNNN.parquet (sorted by cluster, so the reducer can read cluster ranges by row
group), then its commit marker. `reduce_*` functions are the per-shard / per-range steps of the
reduce stage.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from scoring import manifest
from scoring.assign import NearestPrototype
from scoring.config import RunConfig
from scoring.prototypes import normalize, sample_groups
from scoring.shards import Shard, embedding_matrix, read_groups, read_shard_columns
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


def load_embeddings(cfg: RunConfig, in_store: Store, shard: Shard, pf=None):
    """(ids as pyarrow Array, float32 [n, d] embeddings) of a shard, validated."""
    where = f"{in_store.uri(shard.file)} (shard {shard.index})"
    cols = [cfg.id_column, cfg.embedding_column]
    return table_embeddings(cfg, read_shard_columns(in_store, shard, cols, where, pf), where)


def table_embeddings(cfg: RunConfig, table: pa.Table, where: str):
    """(ids, float32 [n, d]) of a table read from the input, validated."""
    ids = table[cfg.id_column].combine_chunks()
    if ids.null_count:
        raise ValueError(f"{where}: column '{cfg.id_column}' has {ids.null_count} null id(s)")
    x = embedding_matrix(table[cfg.embedding_column], where, cfg.embedding_column)
    check_finite(x, ids, where, cfg.embedding_column)
    return ids, x


def check_finite(x: np.ndarray, ids: pa.Array, where: str, column: str) -> None:
    # A NaN/inf anywhere in a row makes its sum of squares non-finite: one read pass, no
    # n x d boolean temporary; the exact row is searched only when something is wrong.
    if x.size and not np.isfinite(np.einsum("ij,ij->i", x, x)).all() and not np.isfinite(x).all():
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
    return embed_sample(cfg, read_sample(cfg, in_store, shard, count, source), source)


@dataclass
class SamplePart:
    """What `read_sample` read for a shard's sample share: the part of the shard (a few of its
    row groups), the sample's row positions in it, and its rows (id and content columns)."""

    part: Shard
    rows: np.ndarray
    table: pa.Table
    where: str  # the input file's URL and the shard, for messages


def read_sample(
    cfg: RunConfig, in_store: Store, shard: Shard, count: int, source: Any = None
) -> SamplePart | None:
    """The IO half of `sample_shard` (a worker runs it outside its compute lock)."""
    if count == 0:
        return None
    where = f"{in_store.uri(shard.file)} (shard {shard.index})"
    pf = in_store.parquet_file(shard.file)
    sub, rows = sample_subshard(pf, shard, count, cfg.seed)
    if source is not None:
        table = source.read(sub, pf=pf)
    else:
        table = read_shard_columns(in_store, sub, [cfg.id_column, cfg.embedding_column], where, pf)
    return SamplePart(sub, rows, table, where)


def embed_sample(cfg: RunConfig, sample: SamplePart | None, source: Any = None) -> np.ndarray:
    """The compute half of `sample_shard`: the sample rows' embeddings."""
    if sample is None:
        return np.zeros((0, 0), np.float32)
    if source is not None:
        _, x = source.embed(sample.part, table=sample.table, rows=sample.rows)
    else:
        _, x = table_embeddings(cfg, sample.table, sample.where)
        x = x[sample.rows]
    return normalize(x) if cfg.metric == "cosine" else x


def sample_subshard(pf, shard: Shard, count: int, seed: int) -> tuple[Shard, np.ndarray]:
    """The part of a shard its sample share is read from (a few of its row groups, see
    prototypes.sample_groups) and the row positions to take from that part. The part's
    row_groups need not be contiguous. `pf`: the shard file's opened ParquetFile."""
    md = pf.metadata
    group_rows = [md.row_group(g).num_rows for g in shard.row_groups]
    picked, rows = sample_groups(group_rows, count, seed, shard.index)
    sub = dataclasses.replace(
        shard,
        row_groups=tuple(shard.row_groups[i] for i in picked),
        rows=int(sum(group_rows[i] for i in picked)),
    )
    return sub, rows


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
    """Score one shard and commit it: data first (scores, id hashes), marker last.

    `source(shard) -> (ids, x)` embeds the shard (a scoring.embed.ShardEmbedder, or a closure
    over prefetched data); None reads the precomputed embedding column.

    A shard whose marker already names these prototypes is committed: its files are not
    rewritten (a retry or a resumed run returns at once). The marker is create-only, so of two
    racing attempts (a zombie worker and its retry) the first commit stands.
    """
    t0 = time.perf_counter()
    mkey = manifest.marker_key("scores", shard.index)
    if run_store.exists(mkey):
        old = manifest.read_json(run_store, mkey)
        if old.get("prototypes_sha256") == prototypes_sha:
            log.info("shard %d is already committed; not rewritten", shard.index)
            return ShardSummary(shard.index, int(old.get("rows", 0)), 0.0, old.get("sha256", ""))
    ids, x = source(shard) if source is not None else load_embeddings(cfg, in_store, shard)
    if x.shape[1] != searcher.d:
        raise ValueError(
            f"{in_store.uri(shard.file)} (shard {shard.index}): column "
            f"'{cfg.text_column or cfg.image_column or cfg.embedding_column}' "
            f"has width {x.shape[1]}, the prototypes "
            f"have {searcher.d}"
        )
    # Unit rows are needed only when the embeddings are saved (dedup compares them);
    # otherwise the search divides the two best scores by the row norms (no n x d copy).
    keep_x = cfg.save_embeddings or cfg.dedup_eps is not None
    if cfg.metric == "cosine" and keep_x:
        x = normalize(x)
    cluster, dist, second = searcher.search(x, unit=cfg.metric != "cosine" or keep_x)
    table = scores_table(ids, cluster, dist, second)
    # issue 6: labels and embeddings, in exactly the score file's row order and row groups
    order = np.argsort(cluster, kind="stable")
    if cfg.label_column:
        table = table.append_column(
            "label", read_labels(cfg, in_store, shard).take(pa.array(order))
        )
    emb_sha = None
    if cfg.save_embeddings or cfg.dedup_eps is not None:
        emb_sha = write_embeddings(run_store, shard.index, ids, x, order)
    nbytes, sha = run_store.write_parquet(
        score_key(shard.index), table, row_group_size=SCORE_ROW_GROUP
    )
    write_id_hashes(run_store, shard.index, ids)
    secs = time.perf_counter() - t0
    fresh = manifest.write_marker(
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
            "embeddings_sha256": emb_sha,
        },
    )
    if not fresh:
        log.warning("shard %d: another attempt committed first; its marker stands", shard.index)
    return ShardSummary(shard.index, table.num_rows, secs, sha)


def embeddings_key(shard_index: int) -> str:
    return f"embeddings/shard-{shard_index:06d}.parquet"


def read_labels(cfg: RunConfig, in_store: Store, shard: Shard) -> pa.Array:
    """The shard's label column (any type), in input row order."""
    where = f"{in_store.uri(shard.file)} (shard {shard.index})"
    t = read_shard_columns(in_store, shard, [cfg.label_column], where)
    return t[cfg.label_column].combine_chunks()


def write_embeddings(
    run_store: Store, shard_index: int, ids: pa.Array, x: np.ndarray, order: np.ndarray
) -> str:
    """embeddings/shard-NNNNNN.parquet: (id, embedding fixed_size_list<float32>) in the score
    file's row order and row groups (the embeddings the search used: unit rows for cosine)."""
    x = np.ascontiguousarray(x[order], dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    t = pa.table({"id": ids.take(pa.array(order)), "embedding": emb})
    _, sha = run_store.write_parquet(embeddings_key(shard_index), t, row_group_size=SCORE_ROW_GROUP)
    return sha


# -- duplicate ids: per-shard sorted id hashes, checked by hash range in the reduce -------------
IDS_ROW_GROUP = 65_536


def ids_key(shard_index: int) -> str:
    return f"ids/shard-{shard_index:06d}.parquet"


ID_HASH_SEED = 0x1D5EED


def id_hash(ids: pa.Array) -> np.ndarray:
    """A deterministic, uniform 64-bit hash of each id: the `random` rule's key with a fixed
    seed (splitmix64 for integer ids, keyed BLAKE2b-64 for string and binary ids)."""
    from scoring.select import random_key

    return random_key(ids, ID_HASH_SEED)


def write_id_hashes(run_store: Store, shard_index: int, ids: pa.Array) -> None:
    """ids/shard-N.parquet: (hash uint64, id, row), sorted by hash, row groups of 65,536 rows,
    so a hash range can be read from every shard by row-group statistics."""
    h = id_hash(ids)
    order = np.argsort(h, kind="stable")
    t = pa.table(
        {
            "hash": pa.array(h[order], pa.uint64()),
            "id": ids.take(pa.array(order)),
            "row": pa.array(order.astype(np.int64)),
        }
    )
    run_store.write_parquet(ids_key(shard_index), t, row_group_size=IDS_ROW_GROUP)


def hash_ranges(n_rows: int, range_rows: int) -> list[tuple[int, int]]:
    """Split the 64-bit hash space into equal ranges of about range_rows ids each (hashes are
    uniform), as (lo, hi) with hi exclusive; the last hi is 2**64."""
    parts = max(1, -(-n_rows // max(1, range_rows)))
    edges = [(i << 64) // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def duplicate_ids(
    run_store: Store, shard_indices: list[int], lo: int, hi: int, limit: int = 10
) -> dict[str, Any]:
    """Ids occurring more than once among the ids with lo <= hash < hi, over all shards.

    Memory: the ids of one hash range. Returns {"count": duplicated ids in the range,
    "examples": [{"id", "where": [[shard, row], ...]}, ...] (at most `limit`)}.
    """
    parts = []
    for s in shard_indices:
        pf = run_store.parquet_file(ids_key(s))
        groups = []
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(0).statistics
            if st is None or not st.has_min_max or (st.max >= lo and st.min < hi):
                groups.append(g)
        if not groups:
            continue
        t = read_groups(pf, groups)
        h = t["hash"].to_numpy()
        m = h >= np.uint64(lo)
        if hi < 2**64:
            m &= h < np.uint64(hi)
        t = t.filter(pa.array(m))
        parts.append(t.append_column("shard", pa.array(np.full(t.num_rows, s, np.int64))))
    if not parts:
        return {"count": 0, "examples": []}
    t = pa.concat_tables(parts)
    h = t["hash"].to_numpy()
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = np.nonzero(hs[1:] == hs[:-1])[0]
    if len(same) == 0:
        return {"count": 0, "examples": []}
    # rows whose hash occurs more than once; compare the ids themselves (hash collisions)
    cand = np.unique(np.concatenate([order[same], order[same + 1]]))
    sub = t.take(pa.array(cand)).to_pydict()
    groups: dict[Any, list[list[int]]] = {}
    for i, sh, r in zip(sub["id"], sub["shard"], sub["row"]):
        groups.setdefault(i, []).append([int(sh), int(r)])
    dups = [(i, sorted(w)) for i, w in groups.items() if len(w) > 1]
    dups.sort(key=lambda d: (d[1][0], str(d[0])))
    return {
        "count": len(dups),
        "examples": [{"id": i, "where": w} for i, w in dups[:limit]],
    }


# -- reduce: per score shard -----------------------------------------------------------------
def read_scores(run_store: Store, shard_index: int, columns: list[str] | None = None) -> pa.Table:
    return run_store.read_parquet(score_key(shard_index), columns)


def shard_stats(run_store: Store, shard_index: int, k: int) -> dict[str, Any]:
    """Per-cluster row counts and distance sums of one score shard."""
    t = read_scores(run_store, shard_index, ["cluster", "distance"])
    cl = t["cluster"].to_numpy()
    d = t["distance"].to_numpy().astype(np.float64)
    from scoring.percentile import level1_histogram

    return {
        "rows": t.num_rows,
        "counts": np.bincount(cl, minlength=k).astype(np.int64),
        "dist_sum": np.bincount(cl, weights=d, minlength=k),
        "hist": level1_histogram(t["distance"].to_numpy()),
    }


def shard_refine(run_store: Store, shard_index: int, prefixes: np.ndarray, low_bits: int):
    """The percentile refinement histogram of one score shard (see scoring.percentile)."""
    from scoring.percentile import refine_histogram

    d = read_scores(run_store, shard_index, ["distance"])["distance"].to_numpy()
    return refine_histogram(d, prefixes, low_bits)


def group_stats(run_store: Store, shard_indices: list[int], k: int) -> dict[str, Any]:
    """`shard_stats` summed over a group of shards: one task and one k-sized result per group,
    so what the driver receives does not grow with the number of shards."""
    out: dict[str, Any] = {}
    for i in shard_indices:
        st = shard_stats(run_store, i, k)
        for key, v in st.items():
            out[key] = out[key] + v if key in out else v
    return out


def group_refine(run_store: Store, shard_indices: list[int], prefixes: np.ndarray, low_bits: int):
    """`shard_refine` summed over a group of shards."""
    out = np.zeros((len(prefixes), 256), np.int64)
    for i in shard_indices:
        out += shard_refine(run_store, i, prefixes, low_bits)
    return out


def shard_groups(indices: list[int], tasks: int) -> list[list[int]]:
    """At most `tasks` contiguous, near-equal groups of shard indices (none empty)."""
    n = max(1, min(len(indices), int(tasks)))
    bounds = np.linspace(0, len(indices), n + 1).astype(np.int64)
    return [list(indices[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


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
