"""Embedders: turn a shard's content column into a float32 [n, d] matrix, on the worker.

An `Embedder` maps one Arrow column (precomputed embeddings, text, or images) to float32
embeddings; `ShardEmbedder` (shard.py) wraps one for a run. Model specs and their loaders:
registry.py (one parser, one table of check/load per scheme). Text: text.py; images: images.py;
torch modules: torch_embedder.py and loaders.py; precision: precision.py.
"""

from __future__ import annotations

from scoring.embed.base import Embedder, PrecomputedEmbedder, content_column, content_kind
from scoring.embed.images import decode_image, image_getter
from scoring.embed.loaders import load_factory
from scoring.embed.precision import autocast_dtype
from scoring.embed.registry import LOADERS, ModelSpec, check_model_spec, load_embedder, parse_spec
from scoring.embed.shard import ShardEmbedder
from scoring.embed.text import SentenceTransformerEmbedder, text_list
from scoring.embed.torch_embedder import TorchEmbedder
from scoring.errors import ModelLoadError

__all__ = [
    "LOADERS",
    "Embedder",
    "ModelLoadError",
    "ModelSpec",
    "PrecomputedEmbedder",
    "SentenceTransformerEmbedder",
    "ShardEmbedder",
    "TorchEmbedder",
    "autocast_dtype",
    "check_model_spec",
    "content_column",
    "content_kind",
    "decode_image",
    "image_getter",
    "load_embedder",
    "load_factory",
    "parse_spec",
    "text_list",
]
