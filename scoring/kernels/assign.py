"""Nearest-prototype search: cluster index and distance for every row.

Metric cosine: rows and centroids are unit vectors, distance = 1 - cos. Metric l2: Euclidean
distance. The search keeps the two nearest prototypes so that the margin (second - first) is
available as an extra score column.

Two exact backends:

* ``faiss``: an IndexFlatIP / IndexFlatL2 (faiss-gpu when present and asked for).
* ``torch``: a chunked low-precision GEMM (bf16, or fp16 for cosine) that keeps the top
  ``CANDIDATES`` prototypes of every row, then an fp32 re-score of those candidates.
  A row is *certified* when its best exact score beats the best possible score of any
  non-candidate (the lowest low-precision candidate score plus the precision's error bound);
  every other row is searched again in full fp32. The result is the fp32 brute-force answer:
  the same cluster except true fp32 ties, and the distance from the exact re-score.
  The second-nearest distance (the extra `margin` column) is exact when the second candidate
  is certified too (or the row was re-checked); otherwise it is the exact distance of the best
  other candidate, which can exceed the true second-nearest distance by at most twice the
  error bound (about 0.03 in cosine distance for bf16; `stats["second_exact"]` counts the
  exact ones). Certifying the second as well would re-check most rows of typical data, whose
  second and third prototypes are nearly equidistant. Every call runs under
  `devices.exact_fp32` (no TF32 or bf16 passes in the fp32 re-check, whatever the process set
  globally). On CUDA a chunk is sized from the free device memory (`search_chunk_rows`: chunk ×
  k < 2^31), goes up through a page-locked buffer, and its results come back in one copy.

``backend="auto"`` (or the environment variable PROTOPRUNE_SEARCH_BACKEND=faiss|torch|auto,
read by every worker) picks faiss-gpu when a GPU and faiss-gpu are present, torch on CUDA when only
a GPU is, and faiss on CPU. The choice is a fixed rule, never a timing: the two backends agree on
the cluster but their fp32 distances can differ in the last bit, and a keep list must not depend
on which backend a worker happened to pick. On these CPUs the bf16 torch path measured no faster
than faiss's fp32 IndexFlatIP on real shards (benchmarks/README.md); pin `torch` to try it.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np

from scoring.kernels.devices import (
    exact_fp32,
    free_cuda_bytes,
    has_faiss_gpu,
    row_norms,
    search_chunk_rows,
    torch_cuda,
)
from scoring.kernels.flat import FaissSearch

log = logging.getLogger(__name__)

CANDIDATES = 3  # low-precision top-m kept per row and re-scored exactly
_UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


def error_bound(precision: str, d: int) -> float:
    """Bound on |low-precision dot - exact dot| per unit of ||x||·||c||.

    Inputs rounded to the precision (relative error u each), products accumulated in fp32
    (gamma_d = d·2^-24 / (1 - d·2^-24), any summation order) and the output rounded to the
    precision again (u): 3u + 4u² + 2·gamma_d, a worst case (Cauchy-Schwarz on the rounding
    errors), so the re-check never misses a row.
    """
    u = _UNIT_ROUNDOFF[precision]
    g = d * 2.0**-24 / (1 - d * 2.0**-24)
    return 3 * u + 4 * u * u + 2 * g


class NearestPrototype:
    """Exact nearest and second-nearest prototype of each row; see the module docstring."""

    def __init__(
        self,
        centroids: np.ndarray,
        metric: str,
        use_gpu: bool = False,
        backend: str = "auto",
        precision: str = "bf16",
        chunk_rows: int | None = None,
    ):
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto, faiss or torch, got {backend!r}")
        if precision not in _UNIT_ROUNDOFF:
            raise ValueError(f"precision must be bf16 or fp16, got {precision!r}")
        if precision == "fp16" and metric != "cosine":
            raise ValueError("precision fp16 is only safe for metric cosine (range); use bf16")
        self.metric = metric
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.k, self.d = self.centroids.shape
        if backend == "auto":  # operators and benchmarks may pin it for every worker
            backend = os.environ.get("PROTOPRUNE_SEARCH_BACKEND", "auto") or "auto"
            if backend not in ("auto", "faiss", "torch"):
                raise ValueError(
                    f"PROTOPRUNE_SEARCH_BACKEND must be auto, faiss or torch: {backend!r}"
                )
        self.precision = precision
        self.chunk_rows = chunk_rows
        self._faiss = None
        self._torch = None
        self.backend = backend
        if backend == "auto":
            self.backend = "torch" if use_gpu and not has_faiss_gpu() and torch_cuda() else "faiss"
        device = "cuda" if use_gpu and self.backend == "torch" and torch_cuda() else "cpu"
        if self.backend == "faiss":
            self._faiss = FaissSearch(self.centroids, metric, use_gpu and has_faiss_gpu())
        if self.backend == "torch":
            self._torch = TorchTopKSearch(self.centroids, metric, device, precision, chunk_rows)
        self.device = device if self.backend == "torch" else ("cuda" if use_gpu else "cpu")

    def search(self, x: np.ndarray, unit: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster int32, distance float32, second-nearest distance float32) per row.

        For cosine, x must be L2-normalised unless `unit=False`: then the faiss backend
        searches the raw rows (with unit centroids the nearest prototype by x·c equals the
        nearest by cosine) and divides the two best scores by ‖x‖, which saves normalising an
        n × d copy of the shard; the torch backend normalises first.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(
                f"embedding width {x.shape[-1]} does not match the prototypes' {self.d}"
            )
        if self.metric == "cosine" and not unit:
            if self.backend == "torch":
                from scoring.kernels.devices import normalize

                return self._torch.search(normalize(x))
            return self._faiss.search(x, scale=row_norms(x))
        if self.backend == "torch":
            return self._torch.search(x)
        return self._faiss.search(x)

    @property
    def stats(self) -> dict[str, float]:
        """Rows searched and rows re-checked in full by the torch backend (empty otherwise)."""
        return dict(self._torch.stats) if self._torch is not None else {}


class TorchTopKSearch:
    """Low-precision GEMM top-m, fp32 re-score, full fp32 search of the uncertain rows.

    Scores are "larger is nearer": cosine s = x·c; l2 s = x·c - ||c||²/2 (so that
    ||x - c||² = ||x||² - 2s).
    """

    def __init__(
        self,
        centroids: np.ndarray,
        metric: str,
        device: str = "cpu",
        precision: str = "bf16",
        chunk_rows: int | None = None,
    ):
        import torch

        self.torch = torch
        self.metric = metric
        self.device = torch.device(device)
        self.k, self.d = centroids.shape
        self.m = min(CANDIDATES, self.k)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.eps = error_bound(precision, self.d)
        # fp32 accumulation inside the low-precision GEMM and true fp32 in the re-check are
        # set on every call (devices.exact_fp32), not once here: a later global
        # set_float32_matmul_precision("high") would turn TF32 back on
        c = torch.from_numpy(np.array(centroids, np.float32)).to(self.device)  # own, writable
        self.c32 = c
        self.cT_low = c.to(self.dtype).T.contiguous()
        self.cT32 = c.T.contiguous()
        hn = 0.5 * (c.double() ** 2).sum(1)
        self.half_norm32 = hn.float()
        self.cmax = float(torch.sqrt(2 * hn).max()) if self.k else 0.0
        self.hnmax = float(hn.max()) if metric == "l2" and self.k else 0.0
        self.g32 = 2 * self.d * 2.0**-24 / (1 - self.d * 2.0**-24)
        self.fixed_chunk = chunk_rows  # None: sized from the free memory at each search
        self.chunk_rows = chunk_rows or self._chunk_rows()
        self.stats = {"rows": 0, "rechecked": 0, "second_exact": 0}
        self._pinned: tuple[Any, Any] | None = None  # host buffers (CUDA): rows in, results out

    def _chunk_rows(self) -> int:
        cuda = self.device.type == "cuda"
        free = free_cuda_bytes(self.device) if cuda else None
        return search_chunk_rows(self.k, self.d, free)

    def _buffers(self, rows: int):
        """Page-locked host buffers for one chunk: the rows in, the packed results out."""
        torch = self.torch
        if self._pinned is None or self._pinned[0].shape[0] < rows:
            self._pinned = (
                torch.empty((rows, self.d), dtype=torch.float32, pin_memory=True),
                torch.empty((rows, 4), dtype=torch.int32, pin_memory=True),
            )
        return self._pinned

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host rows -> host results, chunk by chunk: on CUDA each chunk goes up through a
        page-locked buffer and its results come back in one packed copy."""
        torch = self.torch
        n = len(x)
        cluster = np.empty(n, np.int32)
        dist = np.empty(n, np.float32)
        second = np.empty(n, np.float32)
        with warnings.catch_warnings():  # x may be a read-only Arrow/Ray buffer: only read here
            warnings.simplefilter("ignore", UserWarning)
            xt = torch.from_numpy(x)
        cuda = self.device.type == "cuda"
        if self.fixed_chunk is None:
            self.chunk_rows = self._chunk_rows()
        step = self.chunk_rows
        pin_in, pin_out = self._buffers(min(n, step)) if cuda else (None, None)
        with exact_fp32():
            for a in range(0, n, step):
                b = min(n, a + step)
                if cuda:
                    pin_in[: b - a].copy_(xt[a:b])
                    x32 = pin_in[: b - a].to(self.device, non_blocking=True)
                else:
                    x32 = xt[a:b]
                ci, d1, d2, sec = self._chunk(x32)
                packed = torch.stack(
                    [ci, d1.view(torch.int32), d2.view(torch.int32), sec.to(torch.int32)], 1
                )
                if cuda:  # one copy back, then one wait
                    pin_out[: b - a].copy_(packed, non_blocking=True)
                    torch.cuda.current_stream(self.device).synchronize()
                    got = pin_out[: b - a].numpy()
                else:
                    got = packed.numpy()
                cluster[a:b] = got[:, 0]
                dist[a:b] = got[:, 1].view(np.float32)
                second[a:b] = got[:, 2].view(np.float32)
                self.stats["second_exact"] += int(got[:, 3].sum())
        return cluster, dist, second

    def search_device(self, x32):
        """One chunk already on the device (float32 [n, d] tensor) -> (cluster int32,
        distance float32, second-nearest distance float32) tensors on the device."""
        with exact_fp32():
            ci, d1, d2, sec = self._chunk(x32)
        self.stats["second_exact"] += int(sec.sum())
        return ci, d1, d2

    def _low_scores(self, x32):
        """Low-precision scores [n, k]: kept in bf16/fp16 for cosine (topk reads them as is)."""
        s = x32.to(self.dtype) @ self.cT_low
        if self.metric == "l2":
            s = s.float() - self.half_norm32
        return s

    def _exact(self, x32, cand):
        """fp32 scores of the candidate prototypes [n, m] (one small batched dot per row)."""
        cg = self.c32[cand]  # [n, m, d]
        ex = self.torch.bmm(cg, x32.unsqueeze(2)).squeeze(2)
        if self.metric == "l2":
            ex = ex - self.half_norm32[cand]
        return ex

    def _chunk(self, x32):
        torch = self.torch
        n = x32.shape[0]
        m = self.m
        low = self._low_scores(x32)
        lv, cand = low.topk(m, dim=1)  # sorted descending
        lv = lv.float()
        del low
        ex = self._exact(x32, cand)
        # order the candidates by exact score, ties to the lower prototype index
        order = _order_desc(torch, ex, cand)
        ex = torch.gather(ex, 1, order)
        cand = torch.gather(cand, 1, order)
        if m < self.k:
            xnorm = torch.linalg.vector_norm(x32, dim=1)
            xc = xnorm * self.cmax
            eps = self.eps * xc
            # fp32 rounding: of the half norms (l2), and of the exact re-score itself
            eps = eps + self.g32 * (xc + self.hnmax) + 2.0**-23 * (xc + self.hnmax)
            bound = lv[:, m - 1] + eps  # the best any non-candidate can score
            ok = ex[:, 0] > bound
            sec_ok = (ex[:, 1] > bound) if m > 1 else ok
            bad = torch.nonzero(~ok).flatten()  # the chunk's one wait for the device
            if bad.numel():
                ex_b, cand_b = self._full(x32[bad])
                ex[bad] = ex_b
                cand[bad] = cand_b
                sec_ok[bad] = True
            self.stats["rechecked"] += int(bad.numel())
        else:
            sec_ok = torch.ones(n, dtype=torch.bool, device=x32.device)
        self.stats["rows"] += n
        d1, d2 = self._distances(ex, x32, cand)
        return cand[:, 0].to(torch.int32), d1, d2, sec_ok

    def _full(self, x32):
        """Full fp32 search of some rows: fp32 top-m, then the re-score, re-ordered."""
        s = x32 @ self.cT32
        if self.metric == "l2":
            s -= self.half_norm32
        _, cand = s.topk(self.m, dim=1)
        ex = self._exact(x32, cand)
        order = _order_desc(self.torch, ex, cand)
        return self.torch.gather(ex, 1, order), self.torch.gather(cand, 1, order)

    def _distances(self, ex, x32, cand):
        torch = self.torch
        if self.metric == "cosine":
            d = 1.0 - ex[:, :2]
        else:
            # direct ||x - c|| of the two best (no cancellation near a prototype)
            diff = x32[:, None, :] - self.c32[cand[:, :2]]
            d = torch.linalg.vector_norm(diff, dim=2)
        d = d.float()
        d2 = d[:, 1] if d.shape[1] > 1 else torch.full_like(d[:, 0], float("inf"))
        return d[:, 0], d2


def _order_desc(torch, ex, cand):
    """Column order sorting each row by exact score descending, then prototype index."""
    o1 = torch.argsort(cand, dim=1, stable=True)
    ex1 = torch.gather(ex, 1, o1)
    o2 = torch.argsort(-ex1, dim=1, stable=True)
    return torch.gather(o1, 1, o2)


def brute_force_nearest(x: np.ndarray, centroids: np.ndarray, metric: str):
    """Reference implementation in numpy float64 (tests and checks)."""
    x = np.asarray(x, np.float64)
    c = np.asarray(centroids, np.float64)
    if metric == "cosine":
        d = 1.0 - x @ c.T
    else:
        d = np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None], 0))
    j = d.argmin(1)
    return j.astype(np.int32), d[np.arange(len(x)), j]
