"""`TorchEmbedder`: any torch module plus its preprocessing (open_clip, timm, torchvision and
module:factory models, see `scoring.embed.loaders`), batched, under autocast, on one device."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from scoring.embed.base import default_batch, single_array
from scoring.embed.images import decode_image, image_getter
from scoring.embed.precision import autocast, autocast_dtype
from scoring.embed.text import text_list
from scoring.errors import BadConfig, first_line
from scoring.storage import Store

log = logging.getLogger(__name__)

LOOKAHEAD_BATCHES = 2  # image batches decoded ahead of the model


class TorchEmbedder:
    """A torch module plus its preprocessing, batched, autocast, on one device.

    Images: `preprocess(PIL.Image in RGB) -> Tensor[C, H, W]`, decoded on a thread pool with
    LOOKAHEAD_BATCHES batches in flight ahead of the model. Text: `preprocess(list[str])`
    returns a Tensor or a mapping of Tensors (passed as keyword arguments). The module returns
    a Tensor [B, d] (or a tuple/list whose first element is one).
    """

    def __init__(
        self,
        model,
        preprocess: Callable,
        kind: str,
        column: str,
        device: str,
        batch_size: int | None,
        name: str,
        store: Store | None = None,
        threads: int | None = None,
        forward: Callable | None = None,
    ):
        import torch

        if not isinstance(model, torch.nn.Module):
            raise BadConfig(
                f"model '{name}': the factory must return (torch.nn.Module, preprocess), "
                f"got a {type(model).__name__} as the module"
            )
        if not callable(preprocess):
            raise BadConfig(f"model '{name}': preprocess must be callable")
        self.model = model.to(device).eval()
        self.forward = forward or self.model
        self.preprocess = preprocess
        self.kind, self.column, self.device, self.name = kind, column, device, name
        self.store = store
        self.dtype = autocast_dtype(device)
        self.batch_size = batch_size or default_batch(kind, device)
        self.threads = threads or min(16, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.dim = self._probe()

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        return self._pool

    def _probe(self) -> int:
        """Run one sample through preprocess + model: checks the contract, finds d."""
        if self.kind == "image":
            from PIL import Image

            batch = self._stack([self.preprocess(Image.new("RGB", (224, 224), (127, 127, 127)))])
        else:
            batch = self.preprocess(["probe"])
        try:
            out = self._run(batch)
        except Exception as e:  # noqa: BLE001
            raise BadConfig(
                f"model '{self.name}': calling the module on a preprocessed sample failed: "
                f"{first_line(e)}"
            ) from None
        return out.shape[1]

    def _stack(self, tensors: Sequence[Any]):
        import torch

        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise BadConfig(
                    f"model '{self.name}': preprocess must return a torch.Tensor per image, "
                    f"got {type(t).__name__}"
                )
        return torch.stack(list(tensors))

    def _run(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode(), autocast(self.device, self.dtype):
            if isinstance(batch, Mapping):
                out = self.forward(**{k: v.to(self.device) for k, v in batch.items()})
            else:
                out = self.forward(batch.to(self.device, non_blocking=True))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadConfig(
                f"model '{self.name}': the module must return a [batch, d] tensor, got {got}"
            )
        return out.float().cpu().numpy()

    def _run_fitting(self, batch, n: int) -> np.ndarray:
        """Run a batch of `n` rows; on CUDA out-of-memory halve it and keep the smaller size.

        A batch cut before the size came down runs in pieces of the current size. The halves
        run after the `except` block: inside it the traceback keeps the failed pass's tensors
        (its frames' locals) alive, so nothing could be freed and every half failed again."""
        if n > self.batch_size:
            return np.concatenate(
                [
                    self._run_fitting(_rows(batch, a, min(n, a + step)), min(n, a + step) - a)
                    for step in [self.batch_size]
                    for a in range(0, n, step)
                ]
            )
        try:
            return self._run(batch)
        except out_of_memory_errors():
            if n <= 1:
                raise
        free_device_memory(self.device)
        half = n // 2
        self.batch_size = max(1, min(self.batch_size, half))
        log.warning("%s: out of GPU memory at batch %d; using %d", self.name, n, half)
        return np.concatenate(
            [
                self._run_fitting(_rows(batch, 0, half), half),
                self._run_fitting(_rows(batch, half, n), n - half),
            ]
        )

    def embed(self, values, ids=None, where: str = "") -> np.ndarray:
        values = single_array(values)
        n = len(values)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "text":
            texts = text_list(values, ids, where, self.column)
            parts = []
            s = 0
            while s < n:  # the step is read per batch: an out-of-memory halving lowers it
                chunk = texts[s : s + self.batch_size]
                parts.append(self._run_fitting(self.preprocess(chunk), len(chunk)))
                s += len(chunk)
            return np.concatenate(parts).astype(np.float32, copy=False)
        get = image_getter(values, ids, where, self.column, self.store)
        pending: deque = deque()
        parts = []

        def load(i: int):
            return self.preprocess(decode_image(*get(i)))

        s = 0
        while s < n or pending:
            if s < n:  # the step is read per batch, as for text
                e = min(n, s + self.batch_size)
                pending.append(self.pool.map(load, range(s, e)))
                s = e
                if len(pending) <= LOOKAHEAD_BATCHES:
                    continue
            batch = self._stack(list(pending.popleft()))
            parts.append(self._run_fitting(batch, len(batch)))
        return np.concatenate(parts).astype(np.float32, copy=False)


def _rows(batch, a: int, b: int):
    """Rows a:b of a batch (a Tensor or a mapping of Tensors)."""
    if isinstance(batch, Mapping):
        return {k: v[a:b] for k, v in batch.items()}
    return batch[a:b]


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """torch's CUDA out-of-memory error class (torch.OutOfMemoryError in torch >= 2.5, the
    same class as torch.cuda.OutOfMemoryError)."""
    import torch

    return tuple(
        {
            getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
            torch.cuda.OutOfMemoryError,
        }
    )


def free_device_memory(device: str) -> None:
    """Return the caching allocator's free blocks to CUDA (after a failed pass)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
