"""Stage `sample`: a shard's rows of the prototype sample (see kernels.sampling for the rule).

`read_sample` is the IO half (a worker runs it outside its compute lock), `embed_sample` the
compute half; `sample_shard` both. With a `source` (a scoring.embed.ShardEmbedder) only the
sample rows are embedded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from scoring.config import RunConfig
from scoring.inputs.parquet import Shard, read_shard_columns
from scoring.kernels.devices import normalize
from scoring.kernels.sampling import sample_digest, sample_groups
from scoring.stages.score import table_embeddings
from scoring.storage import Store


@dataclass(frozen=True)
class SampleTask:
    """One shard's share of the sample: `count` rows of `shard`."""

    cfg: RunConfig
    in_store: Store
    shard: Shard
    count: int


def sample_task(t: SampleTask) -> np.ndarray:
    return sample_shard(t.cfg, t.in_store, t.shard, t.count)


def digest_task(t: SampleTask) -> str:
    """sha256 of the shard's sample rows (resume over a changed input file)."""
    return sample_digest(sample_task(t))


def sample_shard(
    cfg: RunConfig, in_store: Store, shard: Shard, count: int, source: Any = None
) -> np.ndarray:
    """This shard's rows of the prototype sample (float32, normalised for cosine)."""
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
