"""Stage `score`: what one worker does with one shard.

`score_shard` reads (or embeds) a shard, finds each row's nearest prototype and writes
scores/shard-NNNNNN.parquet (sorted by cluster, so the reduce reads cluster ranges by row
group), its id hashes (duplicate-id check) and, for dedup, its embeddings; then its marker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from scoring import commit, layout
from scoring.config import RunConfig
from scoring.errors import BadInput
from scoring.inputs.parquet import (
    Shard,
    check_columns,
    check_ids,
    close_file,
    embedding_matrix,
    read_groups,
    read_shard_columns,
    row_group_batches,
)
from scoring.kernels.assign import NearestPrototype
from scoring.kernels.devices import normalize
from scoring.kernels.radix import random_key
from scoring.storage import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


@dataclass(frozen=True)
class ShardSummary:
    shard: int
    rows: int
    seconds: float
    sha256: str


BATCH_ROWS = 1 << 17  # rows per read of a shard's precomputed embeddings (whole row groups)


def embedding_batches(
    cfg: RunConfig, in_store: Store, shard: Shard
) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """(ids, float32 [n, d]) of a shard in batches of whole row groups (~BATCH_ROWS rows, at
    least one batch), so that `score_shard` searches one batch while the next is read and
    decoded. Validated as one shard: the ids whole first (null count); a batch that fails
    (nulls, widths, types), or whose width differs from the first's, has the whole column
    checked instead, so the message is the shard's (counts and row numbers over the shard);
    a NaN's first row is the first batch's that has one."""
    where = f"{in_store.uri(shard.file)} (shard {shard.index})"
    col = cfg.embedding_column
    pf = in_store.parquet_file(shard.file)
    try:
        check_columns(pf, [cfg.id_column, col], where)
        ids = read_groups(pf, shard.row_groups, [cfg.id_column])[cfg.id_column].combine_chunks()
        check_ids(ids, where, cfg.id_column)
        start, width = 0, None
        for part in row_group_batches(pf, shard.row_groups, BATCH_ROWS):
            try:
                x = embedding_matrix(read_groups(pf, part, [col])[col], where, col)
                if width is not None and x.shape[1] != width:
                    raise BadInput(f"{where}: column '{col}': widths differ between row groups")
            except BadInput:  # the shard's own message, from the whole column
                embedding_matrix(read_groups(pf, shard.row_groups, [col])[col], where, col)
                raise
            width = x.shape[1]
            ids_b = ids.slice(start, len(x))
            start += len(x)
            check_finite(x, ids_b, where, col)
            yield ids_b, x
    finally:
        close_file(pf)


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """`items`, each next one produced on a thread while the caller works on the current one
    (a batch is read and decoded while the previous one is searched)."""
    it = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as ex:
        nxt = ex.submit(next, it, _END)
        while (cur := nxt.result()) is not _END:
            nxt = ex.submit(next, it, _END)
            yield cur


def table_embeddings(cfg: RunConfig, table: pa.Table, where: str):
    """(ids, float32 [n, d]) of a table read from the input, validated."""
    ids = table[cfg.id_column].combine_chunks()
    check_ids(ids, where, cfg.id_column)
    x = embedding_matrix(table[cfg.embedding_column], where, cfg.embedding_column)
    check_finite(x, ids, where, cfg.embedding_column)
    return ids, x


def check_finite(x: np.ndarray, ids: pa.Array, where: str, column: str) -> None:
    # A NaN/inf anywhere in a row makes its sum of squares non-finite: one read pass, no
    # n x d boolean temporary; the exact row is searched only when something is wrong.
    if x.size and not np.isfinite(np.einsum("ij,ij->i", x, x)).all() and not np.isfinite(x).all():
        row = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
        raise BadInput(
            f"{where}: column '{column}' has NaN or inf in the embedding of id {ids[row].as_py()!r}"
        )


def scores_table(
    ids: pa.Array,
    cluster: np.ndarray,
    dist: np.ndarray,
    second: np.ndarray,
    order: np.ndarray | None = None,
) -> pa.Table:
    """The score table of a shard, sorted by cluster (stable; `order`: that sort, if known)."""
    order = np.argsort(cluster, kind="stable") if order is None else order
    dist = dist + np.float32(0.0)  # fold -0.0 into 0.0
    margin = (second - dist).astype(np.float32)
    return pa.table(
        {
            # layout.SCORE_COLUMNS
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

    `source(shard) -> (ids, x)`, or an iterator of such batches, embeds the shard (a
    scoring.embed.ShardEmbedder, or a closure over prefetched data); None reads the
    precomputed embedding column in batches (`embedding_batches`), each next batch read
    while the current one is searched.

    A shard whose marker already names these prototypes is committed: its files are not
    rewritten (a retry or a resumed run returns at once). The marker is create-only, so of two
    racing attempts (a zombie worker and its retry) the first commit stands.
    """
    t0 = time.perf_counter()
    old = commit.read_marker(run_store, layout.SCORES, shard.index)
    if old is not None:
        if old.get("prototypes_sha256") == prototypes_sha:
            log.info("shard %d is already committed; not rewritten", shard.index)
            return ShardSummary(shard.index, int(old.get("rows", 0)), 0.0, old.get("sha256", ""))
    got = source(shard) if source is not None else embedding_batches(cfg, in_store, shard)
    keep_x = cfg.save_embeddings or cfg.effective_dedup_eps is not None
    id_parts, x_parts, found = [], [], []
    # the search is row by row (kernels.canonical): batches give the bytes of one whole search
    for ids_b, x_b in prefetched([got] if isinstance(got, tuple) else got):
        if x_b.shape[1] != searcher.d:
            raise BadInput(
                f"{in_store.uri(shard.file)} (shard {shard.index}): column "
                f"'{cfg.text_column or cfg.image_column or cfg.embedding_column}' "
                f"has width {x_b.shape[1]}, the prototypes have {searcher.d}"
            )
        found.append(searcher.search(x_b))
        id_parts.append(ids_b)
        x_parts.append(x_b if keep_x else None)
    ids = id_parts[0] if len(id_parts) == 1 else pa.concat_arrays(id_parts)
    cluster, dist, second = (np.concatenate([f[i] for f in found]) for i in range(3))
    # issue 6: labels and embeddings, in exactly the score file's row order and row groups
    order = np.argsort(cluster, kind="stable")
    table = scores_table(ids, cluster, dist, second, order)
    if cfg.label_column:
        table = table.append_column(
            layout.LABEL, read_labels(cfg, in_store, shard).take(pa.array(order))
        )
    emb_sha = None
    if keep_x:
        # The distances are the canonical ones of the stored rows (kernels.canonical), so
        # they do not depend on whether the embeddings are saved; the saved rows (unit rows
        # for cosine: dedup compares them) are one n x d array, filled in the score order.
        x = sorted_rows(x_parts, order, unit=cfg.metric == "cosine")
        emb_sha = write_embeddings(run_store, shard.index, table["id"], x)
    nbytes, sha = run_store.write_parquet(
        layout.score_key(shard.index), table, row_group_size=layout.ROW_GROUP,
        **layout.encoding(table),
    )  # fmt: skip
    write_id_hashes(run_store, shard.index, ids)
    secs = time.perf_counter() - t0
    fresh = commit.write_marker(
        run_store,
        layout.SCORES,
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
            "distance_sum": float(dist.astype(np.float64).sum()),  # drift of a later update
        },
    )
    if not fresh:
        log.warning("shard %d: another attempt committed first; its marker stands", shard.index)
    return ShardSummary(shard.index, table.num_rows, secs, sha)


def read_labels(cfg: RunConfig, in_store: Store, shard: Shard) -> pa.Array:
    """The shard's label column (any type), in input row order."""
    where = f"{in_store.uri(shard.file)} (shard {shard.index})"
    t = read_shard_columns(in_store, shard, [cfg.label_column], where)
    return t[cfg.label_column].combine_chunks()


def sorted_rows(parts: list[np.ndarray], order: np.ndarray, unit: bool) -> np.ndarray:
    """float32 [n, d]: the rows of the batches `parts` (in input order) taken in `order`,
    L2-normalised when `unit`: one n x d allocation (each batch is scattered to its rows'
    places, then normalised in place), the same bytes as normalize(concatenate(parts)[order])."""
    n, d = len(order), parts[0].shape[1]
    out = np.empty((n, d), dtype=np.float32)
    place = np.empty(n, dtype=np.int64)
    place[order] = np.arange(n)
    start = 0
    for x in parts:
        out[place[start : start + len(x)]] = x
        start += len(x)
    return normalize(out, out=out) if unit else out


def write_embeddings(
    run_store: Store, shard_index: int, ids: pa.ChunkedArray, x: np.ndarray
) -> str:
    """layout.embeddings_key(shard): (id, embedding fixed_size_list<float32>), `ids` and `x`
    already in the score file's row order; its row groups (the embeddings the search used: unit
    rows for cosine)."""
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    t = pa.table({"id": ids, "embedding": emb})
    # Floats neither compress nor have useful min/max: both skipped (-20% of the encode).
    _, sha = run_store.write_parquet(
        layout.embeddings_key(shard_index), t, row_group_size=layout.ROW_GROUP,
        compression={"id": "snappy", "embedding": "none"}, write_statistics=["id"],
        **layout.encoding(t),
    )  # fmt: skip
    return sha


ID_HASH_SEED = 0x1D5EED


def id_hash(ids: pa.Array) -> np.ndarray:
    """A deterministic, uniform 64-bit hash of each id: the `random` rule's key with a fixed
    seed (splitmix64 for integer ids, keyed BLAKE2b-64 for string and binary ids)."""
    return random_key(ids, ID_HASH_SEED)


def write_id_hashes(run_store: Store, shard_index: int, ids: pa.Array) -> None:
    """layout.ids_key(shard): (hash uint64, id, row), sorted by hash, row groups of 65,536 rows,
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
    run_store.write_parquet(
        layout.ids_key(shard_index), t, row_group_size=layout.ROW_GROUP, **layout.encoding(t)
    )
