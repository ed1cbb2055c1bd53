"""Stage `apply` (`protoprune apply`): the pruned dataset, one file per input shard.

Two passes, neither holding the keep list of the whole run:

1. `index_part`, per keep part (a cluster range): the part's kept ids, located in their score
   shards (each score file holds one input shard's ids, sorted by cluster, so the part's range
   is a few row groups of each), written to `<output>/_index/part-NNNNNN.parquet` as
   (shard, id, cluster, distance, percentile) sorted by shard. Memory: one keep part.
2. `apply_shard`, per input shard N: the rows of shard N from every index file (the row groups
   whose shard statistics cover N), then shard N's input rows filtered to those ids, in input
   order, with the input's schema (all columns, or those named; plus cluster, distance and
   percentile with --with-scores), written to `part-NNNNNN.parquet`, then its marker.
   Memory: one input shard and its kept ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import commit, layout
from scoring.errors import BadInput
from scoring.inputs.parquet import Shard, groups_overlapping, read_groups, read_shard
from scoring.storage import Store

ID = "id"  # the id column of score and keep tables


@dataclass(frozen=True)
class IndexTask:
    run: Store  # the run folder
    out: Store  # the apply output
    keep_key: str  # a keep part, relative to the run folder
    part: int
    shards: list[int]


def index_part(task: IndexTask) -> int:
    """Write the index file of one keep part (skipped when it exists: writes are atomic and
    deterministic); returns its rows."""
    key = layout.apply_index_key(task.part)
    if task.out.exists(key):
        return task.out.parquet_file(key).metadata.num_rows
    kept = task.run.read_parquet(task.keep_key, [ID, *layout.WITH_SCORES]).combine_chunks()
    cl = kept["cluster"].to_numpy()
    lo, hi = int(cl.min()), int(cl.max()) + 1
    found = []
    for s in task.shards:
        pf = task.run.parquet_file(layout.score_key(s))
        groups = groups_overlapping(pf, "cluster", lo, hi)
        if not groups:
            continue
        ids = read_groups(pf, groups, [ID])[ID]
        hit = pc.filter(ids, pc.is_in(ids, value_set=kept[ID].chunk(0)))
        if len(hit):
            found.append(pa.table({layout.SHARD: np.full(len(hit), s, np.int64), ID: hit}))
    t = pa.concat_tables(found) if found else None
    if t is None or t.num_rows != kept.num_rows:
        got = 0 if t is None else t.num_rows
        raise BadInput(
            f"{task.run.uri(task.keep_key)}: {kept.num_rows} kept ids, {got} found in the "
            "run's score files"
        )
    pos = pc.index_in(t[ID], value_set=kept[ID].chunk(0))
    t = pa.table(
        {layout.SHARD: t[layout.SHARD], **{c: kept[c].take(pos) for c in kept.column_names}}
    )
    t = t.sort_by([(layout.SHARD, "ascending")])
    task.out.write_parquet(key, t, row_group_size=layout.ROW_GROUP, **layout.encoding(t))
    return t.num_rows


@dataclass(frozen=True)
class ApplyTask:
    inp: Store  # the input root
    out: Store
    shard: Shard
    index_keys: list[str]  # below `out`
    columns: list[str]  # input columns written
    id_column: str
    with_scores: bool
    where: str  # the input file, for messages


def kept_of_shard(out: Store, keys: list[str], shard: int) -> pa.Table | None:
    """(id, cluster, distance, percentile) of the kept rows of one input shard (None: none)."""
    parts = []
    for key in keys:
        pf = out.parquet_file(key)
        groups = groups_overlapping(pf, layout.SHARD, shard, shard + 1)
        if groups:
            t = read_groups(pf, groups)
            parts.append(t.filter(pc.equal(t[layout.SHARD], shard)).drop_columns([layout.SHARD]))
    return pa.concat_tables(parts) if parts else None


def apply_shard(task: ApplyTask) -> dict:
    """Write part-NNNNNN.parquet of one input shard, then its marker; returns the marker."""
    s = task.shard.index
    kept = kept_of_shard(task.out, task.index_keys, s)
    read = list(task.columns)
    if task.id_column not in read:
        read.append(task.id_column)
    t = read_shard(task.inp, task.shard, read)
    ids = t[task.id_column]
    n_kept = 0 if kept is None else kept.num_rows
    if n_kept:
        pos = pc.index_in(ids, value_set=kept[ID].combine_chunks().cast(ids.type))
    else:
        pos = pa.nulls(len(ids), pa.int32())
    mask = pc.is_valid(pos)
    rows = t.filter(mask).select(task.columns)
    if rows.num_rows != n_kept:
        raise BadInput(
            f"{task.where}: {rows.num_rows} of the {n_kept} kept ids of shard {s} found "
            "in the input (did it change after the run?)"
        )
    if task.with_scores:
        at = pc.filter(pos, mask)
        for c, typ in zip(layout.WITH_SCORES, (pa.int32(), pa.float32(), pa.float32())):
            rows = rows.append_column(c, kept[c].take(at) if n_kept else pa.array([], typ))
    key = layout.apply_part_key(s)
    nbytes, sha = task.out.write_parquet(key, rows)
    marker = {"path": key, "shard": s, "rows": rows.num_rows, "bytes": nbytes, "sha256": sha}
    commit.write_marker(task.out, layout.APPLY, s, marker)  # create-only; the first one stands
    return marker
