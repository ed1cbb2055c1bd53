"""A tiny torch CNN for the image tests, loaded through `--model tests.tiny_cnn:factory`.

When PP_TINY_CNN_LOG names a file, preprocess appends one line per real (non-probe) image, so a
test can count how many rows were embedded.
"""

from __future__ import annotations

import os

import numpy as np
import torch

SIZE = 32


def factory():
    """(model, preprocess) per the module:factory contract; seeded, so every call agrees."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 12),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, preprocess


def preprocess(img) -> torch.Tensor:
    log = os.environ.get("PP_TINY_CNN_LOG")
    if log and img.size != (224, 224):  # 224x224 is the loader's probe image
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"1\n")
        finally:
            os.close(fd)
    a = np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def not_a_pair():
    return "nope"


def broken_factory():
    """A factory whose weights fail to load on the worker (the error tests use it)."""
    raise ValueError("weights file tiny.bin is truncated")
