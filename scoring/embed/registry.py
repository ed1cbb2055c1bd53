"""The one registry of model loaders: a `--model` spec is parsed once (`parse_spec`) into a
`ModelSpec`, whose scheme names its `Loader` in `LOADERS`: `check` on the driver (cheap, no
weights loaded), `load` on a worker.

Model specs (`--model`):

- ``DIR`` or ``NAME``: a sentence-transformers model (text), from a local folder or the
  Hugging Face cache; loaded with ``local_files_only=True`` (nothing is downloaded).
- ``open_clip:ARCH`` or ``open_clip:ARCH@WEIGHTS``: an open_clip model (images or text);
  WEIGHTS is a local checkpoint file or a pretrained tag already in the user's cache.
- ``timm:NAME`` or ``timm:NAME@FILE``: a timm model with its classifier removed
  (``num_classes=0``); weights from FILE, else from the user's cache.
- ``torchvision:NAME`` or ``torchvision:NAME@WEIGHTS``: a torchvision model with its head
  replaced by identity; WEIGHTS is a local state-dict file or a weights enum name
  (``IMAGENET1K_V1``) whose file is in the torch hub cache. Without WEIGHTS: random weights.
- ``module:factory``: ``factory()`` (no arguments) returns ``(model, preprocess)``; see
  `load_factory` for the exact contract.

A run with a precomputed embedding column has no model: its spec has the scheme "embedding".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scoring.config import RunConfig
from scoring.embed import loaders
from scoring.embed.base import Embedder, PrecomputedEmbedder, content_column, content_kind
from scoring.embed.text import SentenceTransformerEmbedder, check_sentence_transformer
from scoring.embed.torch_embedder import TorchEmbedder
from scoring.errors import BadConfig
from scoring.storage import Store

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
PREFIXED = ("open_clip", "timm", "torchvision")  # SCHEME:NAME[@WEIGHTS]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model`. `text` is the spec as given (every message names it)."""

    text: str
    scheme: str  # a key of LOADERS
    name: str = ""  # architecture or model name; the module of module:factory; the ST model
    weights: str | None = None  # @WEIGHTS of a prefixed spec
    factory: str = ""  # the callable of module:factory


def parse_spec(spec: str | None, kind: str) -> ModelSpec:
    """The one parser of model specs; `kind` is the run's content kind (text, image or
    embedding). Raises BadConfig for a malformed prefixed spec or an unknown image spec."""
    if kind == "embedding":
        return ModelSpec("" if spec is None else str(spec), "embedding")
    text = str(spec)
    scheme, sep, rest = text.partition(":")
    if sep and scheme in PREFIXED:
        name, _, weights = rest.partition("@")
        if not name:
            raise BadConfig(f"model '{text}': expected {scheme}:NAME[@WEIGHTS]")
        return ModelSpec(text, scheme, name, weights or None)
    if FACTORY_RE.match(text) and not os.path.exists(text):
        return ModelSpec(text, "factory", name=scheme, factory=rest)
    if kind == "image":
        raise BadConfig(
            f"model '{text}': unknown image model spec; use open_clip:ARCH[@WEIGHTS], "
            "timm:NAME[@FILE], torchvision:NAME[@WEIGHTS] or module:factory"
        )
    return ModelSpec(text, "sentence_transformers", name=text)


@dataclass(frozen=True)
class Target:
    """Where and how a worker runs the model."""

    kind: str  # "embedding", "text" or "image"
    column: str
    device: str
    batch_size: int | None
    store: Store | None = None  # the input store (image paths are read through it)
    threads: int | None = None  # image decode threads


@dataclass(frozen=True)
class Loader:
    check: Callable[[ModelSpec], Any]  # driver: raises BadConfig; loads no weights
    load: Callable[[ModelSpec, Target], Embedder]  # worker


def _torch_module(build: Callable) -> Callable[[ModelSpec, Target], Embedder]:
    """A loader that wraps `build(spec, kind) -> (model, preprocess, forward)` in TorchEmbedder."""

    def load(spec: ModelSpec, t: Target) -> Embedder:
        model, pre, fwd = build(spec, t.kind)
        return TorchEmbedder(
            model, pre, t.kind, t.column, t.device, t.batch_size, spec.text, t.store, t.threads, fwd
        )

    return load


LOADERS: dict[str, Loader] = {
    "embedding": Loader(lambda spec: None, lambda spec, t: PrecomputedEmbedder(t.column)),
    "open_clip": Loader(loaders.check_open_clip, _torch_module(loaders.build_open_clip)),
    "timm": Loader(loaders.check_timm, _torch_module(loaders.build_timm)),
    "torchvision": Loader(loaders.check_torchvision, _torch_module(loaders.build_torchvision)),
    "factory": Loader(loaders.check_factory, _torch_module(loaders.build_factory)),
    "sentence_transformers": Loader(
        lambda spec: check_sentence_transformer(spec.text),
        lambda spec, t: SentenceTransformerEmbedder(spec.text, t.column, t.device, t.batch_size),
    ),
}


def load_embedder(
    cfg: RunConfig, in_store: Store | None = None, device: str = "cpu", threads: int | None = None
) -> Embedder:
    """The embedder a run's config asks for, loaded on `device` ("cpu" or "cuda")."""
    kind = content_kind(cfg)
    spec = parse_spec(cfg.model, kind)
    target = Target(kind, content_column(cfg), device, cfg.embed_batch_size, in_store, threads)
    return LOADERS[spec.scheme].load(spec, target)


def check_model_spec(cfg: RunConfig) -> None:
    """Cheap checks on the driver, before any actor starts (no weights are loaded): the
    package of a prefixed spec is installed, a module:factory imports and names a callable, a
    sentence-transformers spec is a local folder or a cached model. Raises BadConfig."""
    spec = parse_spec(cfg.model, content_kind(cfg))
    LOADERS[spec.scheme].check(spec)
