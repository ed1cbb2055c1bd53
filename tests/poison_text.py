"""A tiny text model for `--text-column` runs through `--model tests.poison_text:factory`.

Its preprocess ends the worker process (os._exit, as a decoder crash or the kernel's OOM killer
would) whenever a batch holds a text containing POISON: a shard holding such a row kills its
worker on every attempt.
"""

from __future__ import annotations

import os

import torch

POISON = "<poison-row>"
WIDTH = 32  # bytes of each text that count


def factory():
    """(model, preprocess) per the module:factory contract; seeded, so every call agrees."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.EmbeddingBag(256, 8, mode="mean")
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=g))
    return model, preprocess


def preprocess(texts: list[str]) -> torch.Tensor:
    if any(POISON in t for t in texts):
        os._exit(3)
    rows = [list(t.encode()[:WIDTH].ljust(WIDTH, b" ")) for t in texts]
    return torch.tensor(rows, dtype=torch.int64)
