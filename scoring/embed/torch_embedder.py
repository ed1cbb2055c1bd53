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
        """Run a batch; on CUDA out-of-memory split it in halves and keep the smaller size."""
        import torch

        try:
            return self._run(batch)
        except torch.cuda.OutOfMemoryError:
            if n <= 1:
                raise
            torch.cuda.empty_cache()
            half = n // 2
            self.batch_size = max(1, half)
            log.warning("%s: out of GPU memory at batch %d; using %d", self.name, n, half)
            if isinstance(batch, Mapping):
                a = {k: v[:half] for k, v in batch.items()}
                b = {k: v[half:] for k, v in batch.items()}
            else:
                a, b = batch[:half], batch[half:]
            return np.concatenate([self._run_fitting(a, half), self._run_fitting(b, n - half)])

    def embed(self, values, ids=None, where: str = "") -> np.ndarray:
        values = single_array(values)
        n = len(values)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "text":
            texts = text_list(values, ids, where, self.column)
            parts = []
            for s in range(0, n, self.batch_size):
                chunk = texts[s : s + self.batch_size]
                parts.append(self._run_fitting(self.preprocess(chunk), len(chunk)))
            return np.concatenate(parts).astype(np.float32, copy=False)
        get = image_getter(values, ids, where, self.column, self.store)
        bs = self.batch_size
        starts = list(range(0, n, bs))
        pending: deque = deque()
        parts = []

        def load(i: int):
            return self.preprocess(decode_image(*get(i)))

        for s in starts:
            pending.append(self.pool.map(load, range(s, min(s + bs, n))))
            if len(pending) > LOOKAHEAD_BATCHES:
                batch = self._stack(list(pending.popleft()))
                parts.append(self._run_fitting(batch, len(batch)))
        while pending:
            batch = self._stack(list(pending.popleft()))
            parts.append(self._run_fitting(batch, len(batch)))
        return np.concatenate(parts).astype(np.float32, copy=False)
