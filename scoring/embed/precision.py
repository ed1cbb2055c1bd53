"""The inference precision: which autocast dtype a device gets, and the context that applies it."""

from __future__ import annotations

import contextlib
import os

from scoring.errors import BadConfig
from scoring.kernels.devices import cpu_has_bf16


def autocast_dtype(device: str):
    """The autocast dtype for inference on `device` (None = fp32).

    CUDA: bf16 where supported, else fp16. CPU: bf16 only with native bf16 instructions, where
    it measured 2.7x faster than fp32 for all-MiniLM-L6-v2 with 1 - cos <= 3e-5
    (benchmarks/README.md); elsewhere bf16 is emulated and slower, so fp32.
    PROTOPRUNE_PRECISION=fp32|bf16|fp16 overrides the choice.
    """
    import torch

    forced = os.environ.get("PROTOPRUNE_PRECISION", "").lower()
    if forced:
        table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if forced not in table:
            raise BadConfig(f"PROTOPRUNE_PRECISION={forced!r}: expected one of fp32, bf16, fp16")
        return table[forced]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: str, dtype):
    """torch.autocast on `device` at `dtype`; nothing when `dtype` is None (fp32)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)
