"""What every embedder shares: the `Embedder` protocol, the run's content column and kind,
the precomputed-column embedder, the default batch sizes and the row label of messages."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from scoring.config import RunConfig
from scoring.inputs.parquet import embedding_matrix

# Starting batch sizes when --embed-batch-size is not given; on CUDA a batch that runs out of
# memory is split in halves (and the smaller size kept), so the batch settles to what fits.
DEFAULT_BATCH = {("text", "cpu"): 128, ("text", "cuda"): 1024}
DEFAULT_BATCH.update({("image", "cpu"): 32, ("image", "cuda"): 256})


class Embedder(Protocol):
    """Maps a column of one shard to float32 [n, dim] embeddings (not normalised)."""

    kind: str  # "embedding", "text" or "image"
    dim: int | None  # None until known (precomputed columns)

    def embed(
        self, values: pa.Array | pa.ChunkedArray, ids: pa.Array | None = None, where: str = ""
    ) -> np.ndarray: ...


def content_column(cfg: RunConfig) -> str:
    """The input column a run embeds: text, image, or the precomputed embedding column."""
    return cfg.text_column or cfg.image_column or cfg.embedding_column


def content_kind(cfg: RunConfig) -> str:
    return "text" if cfg.text_column else "image" if cfg.image_column else "embedding"


def default_batch(kind: str, device: str) -> int:
    """The starting batch size of `kind` ("text" or "image") on `device` ("cpu", "cuda:0")."""
    return DEFAULT_BATCH[(kind, "cuda" if device.startswith("cuda") else "cpu")]


def row_label(ids: pa.Array | None, row: int) -> str:
    """How messages name a row: by its id when the ids are known, else by its position."""
    if ids is None:
        return f"row {row}"
    return f"id {ids[row].as_py()!r}"


def single_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The column as one Array (a ChunkedArray's chunks combined)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values


class PrecomputedEmbedder:
    """The spine's path: a list<float> / fixed_size_list<float> column, validated."""

    kind = "embedding"

    def __init__(self, column: str):
        self.column = column
        self.dim: int | None = None

    def embed(self, values, ids=None, where: str = "") -> np.ndarray:
        x = embedding_matrix(values, where, self.column)
        self.dim = x.shape[1]
        return x
