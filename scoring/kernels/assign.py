"""Nearest-prototype search: cluster index and distance for every row.

Metric cosine: distance = 1 - cos; metric l2: Euclidean distance. The search keeps the two
nearest prototypes so that the margin (second - first) is available as an extra score column.

A backend only finds candidates; the committed cluster, distance and second distance come
from one definition (`kernels.canonical`): exact values of the stored float32 numbers,
correctly rounded to float32, ties to the lower prototype index. So every backend, machine,
worker count and shard layout writes the same bytes, and the backend can be chosen for speed.

Two candidate backends:

* ``faiss``: an IndexFlatIP / IndexFlatL2 (faiss-gpu when present and asked for), fp32 top 3.
* ``torch``: a chunked GEMM (precision "auto": bf16 on CUDA and on CPUs with AMX, fp32 on
  other CPUs, `devices.product_precision`; fp16 for cosine on request) that keeps the top
  ``CANDIDATES[precision]`` prototypes of every row, then an fp32 re-score of those candidates.
  A row's nearest is certain when its best fp32 score beats the best possible score of any
  non-candidate (the lowest low-precision candidate score plus the precision's error bound);
  every other row is searched again in full fp32. Every call runs under `devices.exact_fp32`
  (no TF32 or bf16 passes in the fp32 re-check, whatever the process set globally). On CUDA a
  chunk is sized from the free device memory (`search_chunk_rows`: chunk x k < 2^31), goes up
  through a page-locked buffer, and its results come back in one copy.

Either way a row whose first two candidates are not certified (a gap to the third, or to any
non-candidate, within the backend's rounding error plus a float32 step) goes to
`Canonical.nearest`: when the torch backend proves the true two are among its m candidates
(level 1, "closed") the canonical distance of all m decides; otherwise the row is searched
again over every prototype in float64 (on the GPU when the search has one).

``backend="auto"`` (or the environment variable PROTOPRUNE_SEARCH_BACKEND=faiss|torch|auto,
read by every worker) picks torch bf16 on CUDA and on a CPU with native bf16 dot products, and
faiss otherwise (faiss-gpu stays available: pin `faiss`). Since the
answer no longer depends on the backend, the rule is only about speed (benchmarks/README.md).
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from scoring.kernels.canonical import Canonical
from scoring.kernels.devices import (
    count,
    cpu_has_bf16,
    exact_fp32,
    free_cuda_bytes,
    has_faiss_gpu,
    product_precision,
    search_chunk_rows,
    torch_cuda,
    torch_threads,
)
from scoring.kernels.flat import FaissSearch, cosine_slack

log = logging.getLogger(__name__)

CANDIDATES = {"bf16": 8, "fp16": 8, "fp32": 3}  # top-m kept per row and re-scored exactly.
# bf16: 8 certify ~98% of rows on clustered 384-d data, against ~45% with 3. fp32's error bound
# is ~2^16 times smaller: 3 certify all but ~8 rows in 10^4 (searched again in float64), and a
# top 3 costs about half a top 8 (`top_m`: m passes over the score block)
ROW_RANGE_MIN = 1 << 15  # rows per thread of a CPU search cut into row ranges (search)
_UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24}


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
        precision: str = "auto",
        chunk_rows: int | None = None,
    ):
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto, faiss or torch, got {backend!r}")
        if precision not in (*_UNIT_ROUNDOFF, "auto"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
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
        self.chunk_rows = chunk_rows
        self._faiss = None
        self._torch = None
        self.backend = backend
        if backend == "auto":
            self.backend = auto_backend(use_gpu)
        device = "cuda" if use_gpu and self.backend == "torch" and torch_cuda() else "cpu"
        if precision == "auto":  # the candidates' product: bf16 where it is fast
            precision = product_precision(device)
        self.precision = precision
        if self.backend == "faiss":
            self._faiss = FaissSearch(self.centroids, metric, use_gpu and has_faiss_gpu())
        if self.backend == "torch":
            self._torch = TorchTopKSearch(self.centroids, metric, device, precision, chunk_rows)
        self.device = device if self.backend == "torch" else ("cuda" if use_gpu else "cpu")
        # the float64 full search of the open rows on the search's GPU, if it has one
        self.canonical = Canonical(self.centroids, metric, device if device == "cuda" else None)

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster int32, distance float32, second-nearest distance float32) per row.

        The answer is `kernels.canonical`'s for the rows exactly as given (any norm for
        cosine): pass the stored rows, not a normalised copy, whose rounding would show.

        On the CPU with torch allowed several threads (an actor given spare CPUs,
        `placement.widest`), the rows are cut into ranges (~4 per thread, >= ROW_RANGE_MIN
        rows) searched on that many threads with one-thread products: the top-m passes and the
        canonical step are single-threaded numpy, so this uses the CPUs where intra-op threads
        leave them idle (10^6 x 64 rows, k = 1000, 2 CPUs: 3.2-3.4 s -> 3.0 s). The same
        bytes: the canonical step decides every row whatever found its candidates.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(
                f"embedding width {x.shape[-1]} does not match the prototypes' {self.d}"
            )
        threads = self._row_threads(len(x))
        if threads <= 1:
            return self._search(x)
        step = max(ROW_RANGE_MIN, -(-len(x) // (4 * threads)))  # ~4 ranges per thread
        parts = [x[a : a + step] for a in range(0, len(x), step)]
        # exact_fp32 held here, so the threads' own (nested) entries never restore a lower
        # matmul precision while another thread computes
        with exact_fp32(), torch_threads(1), ThreadPoolExecutor(threads) as ex:
            got = list(ex.map(self._search, parts))
        return tuple(np.concatenate([g[i] for g in got]) for i in range(3))

    def _search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.backend == "torch":  # normalises each chunk for cosine: no n x d copy
            cand, ok = self._torch.candidates(x)
        else:
            cand, ok = self._faiss.candidates(x)
        return self.canonical.nearest(x, cand, ok)

    def _row_threads(self, n: int) -> int:
        """Threads for row ranges: torch's thread count on the CPU torch backend, at most one
        per ROW_RANGE_MIN rows; 1 elsewhere (faiss and CUDA parallelise inside)."""
        if self.backend != "torch" or self.device != "cpu":
            return 1
        import torch

        return max(1, min(torch.get_num_threads(), n // ROW_RANGE_MIN))

    @property
    def stats(self) -> dict[str, float]:
        """Rows searched and re-checked: by the torch backend (fp32) and by the canonical
        step (`full`: searched again in float64; `exact`: decided in decimal arithmetic)."""
        out = dict(self._torch.stats) if self._torch is not None else {}
        out.update({f"canonical_{k}": v for k, v in self.canonical.stats.items()})
        return out


def auto_backend(use_gpu: bool) -> str:
    """The backend `auto` picks, for speed only (every backend writes the same bytes): torch
    bf16 on CUDA (tensor-core bf16 against faiss-gpu's fp32 GEMM, the search's whole cost at
    large k) and on a CPU with native bf16 dot products; faiss otherwise."""
    if use_gpu and torch_cuda():
        return "torch"
    return "torch" if cpu_has_bf16() else "faiss"


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
        self.m = min(CANDIDATES[precision], self.k)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.eps = error_bound(precision, self.d)
        # fp32 accumulation inside the low-precision GEMM and true fp32 in the re-check are
        # set on every call (devices.exact_fp32), not once here: a later global
        # set_float32_matmul_precision("high") would turn TF32 back on
        c = torch.from_numpy(np.array(centroids, np.float32)).to(self.device)  # own, writable
        self.c32 = c
        self._c_np = c.cpu().numpy()
        self.cT_low = c.to(self.dtype).T.contiguous()
        self.cT32 = c.T.contiguous()
        hn = 0.5 * (c.double() ** 2).sum(1)
        self.half_norm32 = hn.float()
        self.cmax = float(torch.sqrt(2 * hn).max()) if self.k else 0.0
        self.hnmax = float(hn.max()) if metric == "l2" and self.k else 0.0
        self.g32 = 2 * self.d * 2.0**-24 / (1 - self.d * 2.0**-24)
        self.fixed_chunk = chunk_rows  # None: sized from the free memory at each search
        self.chunk_rows = chunk_rows or self._chunk_rows()
        self.stats = {"rows": 0, "rechecked": 0, "certified": 0, "closed": 0}
        slack = cosine_slack(centroids) + (self.d + 4) * 2.0**-24  # x normalised in fp32
        self.cos_tol = slack
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
                torch.empty((rows, self.m + 1), dtype=torch.int32, pin_memory=True),
            )
        return self._pinned

    def candidates(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host rows (any norm) -> (candidates int32 [n, m] by exact fp32 score, level int8
        [n]: 2 certified, 1 closed, 0 open), chunk by chunk: on CUDA each chunk goes up through a page-locked buffer and its results
        come back in one packed copy."""
        torch = self.torch
        n = len(x)
        m = self.m
        cand = np.empty((n, m), np.int32)
        ok = np.empty(n, np.int8)
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
                if self.metric == "cosine":  # unit rows, one chunk at a time
                    x32 = torch.nn.functional.normalize(x32, dim=1)
                ci, sure = self._chunk(x32)
                packed = torch.cat([ci.to(torch.int32), sure[:, None]], 1)
                if cuda:  # one copy back, then one wait
                    pin_out[: b - a].copy_(packed, non_blocking=True)
                    torch.cuda.current_stream(self.device).synchronize()
                    got = pin_out[: b - a].numpy()
                else:
                    got = packed.numpy()
                cand[a:b] = got[:, :m]
                ok[a:b] = got[:, m]
        count(self.stats, certified=int((ok == 2).sum()), closed=int((ok == 1).sum()))
        return cand, ok

    def _low_scores(self, x32):
        """Low-precision scores [n, k]: kept in bf16/fp16 for cosine (topk reads them as is)."""
        s = x32.to(self.dtype) @ self.cT_low
        if self.metric == "l2":
            s = s.float() - self.half_norm32
        return s

    def _exact(self, x32, cand):
        """fp32 scores of the candidate prototypes [n, m]: one small batched dot per row on
        CUDA; on the CPU a row-wise dot per candidate column (numpy: 6x torch's gather + bmm)."""
        if self.device.type == "cpu":
            xn, cn, jn = x32.numpy(), self._c_np, cand.numpy()
            ex = np.empty(jn.shape, np.float32)
            for t in range(jn.shape[1]):
                ex[:, t] = np.einsum("ij,ij->i", xn, cn[jn[:, t]])
            ex = self.torch.from_numpy(ex)
        else:
            ex = self.torch.bmm(self.c32[cand], x32.unsqueeze(2)).squeeze(2)
        if self.metric == "l2":
            ex = ex - self.half_norm32[cand]
        return ex

    def _chunk(self, x32):
        """(candidates [n, m] by exact score, level [n]: 2 certified, 1 closed, 0 open; see
        `kernels.canonical`) of one chunk on the device."""
        torch = self.torch
        n = x32.shape[0]
        m = self.m
        lv, cand = top_m(torch, self._low_scores(x32), m)  # descending
        ex = self._exact(x32, cand)
        # order the candidates by exact score, ties to the lower prototype index
        order = _order_desc(torch, ex, cand)
        ex = torch.gather(ex, 1, order)
        cand = torch.gather(cand, 1, order)
        xnorm = torch.linalg.vector_norm(x32, dim=1)
        xc = xnorm * self.cmax
        e32 = self.g32 * (xc + self.hnmax) + 2.0**-23 * (xc + self.hnmax)  # an fp32 score's
        if self.metric == "cosine":
            tol = self.cos_tol * xnorm * 1.01
        else:  # two float32 steps of the distance, in score units, plus both scores' errors
            sq = (xnorm * xnorm - 2 * ex[:, -1]).clamp_min(0)
            tol = 2 * e32 + 2.0**-21 * sq + 1e-30
        if m < self.k:
            bound = lv[:, m - 1] + self.eps * xc + e32  # the best any non-candidate can score
            first = ex[:, 0] > bound
            bad = torch.nonzero(~first).flatten()  # the chunk's one wait for the device
            closed = ex[:, 1] - tol > bound  # m >= 3 here: the true two are candidates
            if bad.numel():
                ex_b, cand_b = self._full(x32[bad])
                ex[bad] = ex_b
                cand[bad] = cand_b
                # fp32 top-m: a non-candidate scores at most the m-th plus twice an fp32 error
                closed[bad] = ex_b[:, 1] - tol[bad] - 2 * e32[bad] > ex_b[:, m - 1]
            count(self.stats, rechecked=int(bad.numel()))
            # 2: the first two certified; 1: closed (the canonical step orders all m); 0: open
            sure = closed.to(torch.int32) + (closed & (ex[:, 1] - ex[:, 2] > tol)).to(torch.int32)
        else:
            sure = torch.full((n,), 2, dtype=torch.int32, device=x32.device)
        count(self.stats, rows=n)
        return cand, sure

    def _full(self, x32):
        """Full fp32 search of some rows: fp32 top-m, then the re-score, re-ordered."""
        s = x32 @ self.cT32
        if self.metric == "l2":
            s -= self.half_norm32
        _, cand = top_m(self.torch, s, self.m)
        ex = self._exact(x32, cand)
        order = _order_desc(self.torch, ex, cand)
        return self.torch.gather(ex, 1, order), self.torch.gather(cand, 1, order)


def top_m(torch, s, m: int):
    """(values float32, indices int64) of each row's m largest scores, descending. On the CPU
    by m passes of numpy's SIMD argmax (ties to the lower index), each masking its winner,
    over blocks of 256 rows that stay in cache: ~3x faster than torch's CPU topk at m = 3, k =
    1000 (10^6 rows: 0.98 s against 2.8 s on one core; torch's per-row topk, and its max with
    indices, cost ~1.6 µs a row), ~1.6x at m = 8. Single-threaded: two threads on row blocks
    ran slower on 2 cores. Any correct top m will do (the canonical step decides). `s`, a
    score block used once, is overwritten."""
    if s.device.type != "cpu":
        v, j = s.topk(m, dim=1)
        return v.float(), j
    a = _host_fp32(torch, s)
    vs = np.empty((len(a), m), np.float32)
    js = np.empty((len(a), m), np.int64)
    for p in range(0, len(a), 256):  # ~1 MB at k = 1000: the m passes read it from cache
        q = min(len(a), p + 256)
        b, r = a[p:q], np.arange(q - p)
        for t in range(m):
            j = np.argmax(b, axis=1)
            js[p:q, t] = j
            vs[p:q, t] = b[r, j]
            b[r, j] = -np.inf
    return torch.from_numpy(vs), torch.from_numpy(js)


def row_argmax(torch, s):
    """Each row's index of its largest score, the first on ties: numpy's SIMD argmax on the
    CPU (~6x torch's max(1) there), torch's on a GPU."""
    if s.device.type != "cpu":
        return s.max(1).indices
    return torch.from_numpy(np.argmax(_host_fp32(torch, s), axis=1))


def _host_fp32(torch, s) -> np.ndarray:
    """A CPU score block as a float32 numpy array (a view when it is float32 already)."""
    return s.numpy() if s.dtype == torch.float32 else s.float().numpy()


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
