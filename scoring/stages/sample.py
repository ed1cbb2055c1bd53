"""Stage `sample`: a shard's rows of the prototype sample (see kernels.sampling for the rule).

The driver draws the sample plan over the input's row groups (`RunPlan.sample_picks`) and hands
each shard its picks: (row group, unit, rows to draw). The worker reads only those row groups
and draws the rows of each with the unit's own generator, so a row's membership in the sample
never depends on which shard holds it. `read_sample` is the IO half (a worker runs it outside
its compute lock), `embed_sample` the compute half; `sample_shard` both. With a `source` (a
scoring.embed.ShardEmbedder) only the sample rows are embedded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from scoring.config import RunConfig
from scoring.errors import BadInput
from scoring.inputs.parquet import Shard, read_shard_columns
from scoring.kernels.devices import normalize
from scoring.kernels.sampling import Pick, sample_digest, unit_rows
from scoring.stages.score import table_embeddings
from scoring.storage import Store


@dataclass(frozen=True)
class SampleTask:
    """One shard's part of the sample: the rows `picks` names in `shard`."""

    cfg: RunConfig
    in_store: Store
    shard: Shard
    picks: tuple[Pick, ...]


def sample_task(t: SampleTask) -> np.ndarray:
    return sample_shard(t.cfg, t.in_store, t.shard, t.picks)


def digest_task(t: SampleTask) -> str:
    """sha256 of the shard's sample rows (resume over a changed input file)."""
    return sample_digest(sample_task(t))


def pick_rows(picks: tuple[Pick, ...]) -> int:
    """Rows a shard gives to the sample."""
    return sum(c for _, _, c in picks)


def sample_shard(
    cfg: RunConfig, in_store: Store, shard: Shard, picks: tuple[Pick, ...], source: Any = None
) -> np.ndarray:
    """This shard's rows of the prototype sample (float32, normalised for cosine), in
    (row group, row) order."""
    return embed_sample(cfg, read_sample(cfg, in_store, shard, picks, source), source)


@dataclass
class SamplePart:
    """What `read_sample` read for a shard's sample part: the part of the shard (its picked
    row groups), the sample's row positions in it, and its rows (id and content columns)."""

    part: Shard
    rows: np.ndarray
    table: pa.Table
    where: str  # the input file's URL and the shard, for messages


def read_sample(
    cfg: RunConfig, in_store: Store, shard: Shard, picks: tuple[Pick, ...], source: Any = None
) -> SamplePart | None:
    """The IO half of `sample_shard` (a worker runs it outside its compute lock)."""
    if not pick_rows(picks):
        return None
    where = f"{in_store.uri(shard.file)} (shard {shard.index})"
    pf = in_store.parquet_file(shard.file)
    sub, rows = sample_subshard(pf, shard, picks, cfg.seed, where)
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


def sample_subshard(
    pf, shard: Shard, picks: tuple[Pick, ...], seed: int, where: str = ""
) -> tuple[Shard, np.ndarray]:
    """The part of a shard its sample rows are read from (its picked row groups, ascending; not
    necessarily contiguous) and the row positions to take from that part. `pf`: the shard
    file's opened ParquetFile."""
    md = pf.metadata
    groups, rows, o = [], [], 0
    for g, unit, count in sorted(picks):
        if g not in shard.row_groups:
            raise ValueError(f"{where}: sample row group {g} is not in shard {shard.index}")
        n = md.row_group(g).num_rows
        if count > n:  # the footer changed since the plan was made
            raise BadInput(
                f"{where or shard.file}: row group {g} holds {n} rows, the plan counted "
                f"at least {count}; the file changed during the run"
            )
        groups.append(g)
        rows.append(o + unit_rows(n, count, seed, unit))
        o += n
    sub = dataclasses.replace(shard, row_groups=tuple(groups), rows=o)
    return sub, np.concatenate(rows) if rows else np.zeros(0, np.int64)
