"""`ShardEmbedder`: one run's embedder (loaded once per actor) over its shards.

It reads a shard's id and content columns through `Store` (`read`, IO only, so a worker can
prefetch the next shard) and embeds them (`embed`, compute). Normalisation for the cosine
metric happens where the spine always did it (`score_shard`, `sample_shard`), so every
embedder's output is treated the same way.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from scoring.config import RunConfig
from scoring.embed.base import content_column, row_label
from scoring.embed.registry import load_embedder
from scoring.errors import BadInput
from scoring.inputs.parquet import Shard, check_ids, read_shard_columns
from scoring.storage import Store


class ShardEmbedder:
    """Reads and embeds the shards of one run; loads its model once (one per actor)."""

    def __init__(
        self, cfg: RunConfig, in_store: Store, device: str = "cpu", threads: int | None = None
    ):
        self.cfg, self.in_store, self.device = cfg, in_store, device
        self.column = content_column(cfg)
        self.embedder = load_embedder(cfg, in_store, device, threads)

    def where(self, shard: Shard) -> str:
        return f"{self.in_store.uri(shard.file)} (shard {shard.index})"

    def read(self, shard: Shard, columns: list[str] | None = None, pf=None) -> pa.Table:
        """The shard's id and content columns (IO only), validated. `pf`: the shard file's
        opened ParquetFile, if the caller has it (one footer read)."""
        where = self.where(shard)
        cols = columns or [self.cfg.id_column, self.column]
        table = read_shard_columns(self.in_store, shard, cols, where, pf)
        check_ids(table[self.cfg.id_column], where, self.cfg.id_column)
        return table

    def embed(
        self, shard: Shard, table: pa.Table | None = None, rows: np.ndarray | None = None
    ) -> tuple[pa.Array, np.ndarray]:
        """(ids, float32 [n, d]) of the shard, or of its `rows` only (positions in the shard)."""
        where = self.where(shard)
        table = table if table is not None else self.read(shard)
        if rows is not None and len(rows) < table.num_rows:
            table = table.take(pa.array(rows))
        ids = table[self.cfg.id_column].combine_chunks()
        x = self.embedder.embed(table[self.column], ids, where)
        if x.size and not np.isfinite(x).all():
            row = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
            raise BadInput(
                f"{where}: column '{self.column}' has NaN or inf in the embedding of "
                f"{row_label(ids, row)}"
            )
        return ids, x

    def __call__(self, shard: Shard) -> tuple[pa.Array, np.ndarray]:
        return self.embed(shard)
