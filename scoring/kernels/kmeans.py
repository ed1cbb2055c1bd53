"""k-means on the prototype sample: faiss (fp32, CPU or GPU) or torch Lloyd iterations with a
bf16 assignment product (CPU with native bf16, or CUDA).

Both run exactly the requested iterations on the whole sample (no silent subsampling; early
stopping only when a tolerance is given) and return unit centroids for the cosine metric
(spherical k-means). `choose_backend` picks one: `auto` takes torch where bf16 is native (CUDA,
or a CPU with AVX512_BF16 / AMX), faiss elsewhere.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from scoring.errors import BadInput
from scoring.kernels.assign import row_argmax
from scoring.kernels.devices import (
    cpu_has_bf16,
    has_faiss_gpu,
    normalize,
    product_precision,
    torch_cuda,
)

BACKENDS = ("auto", "faiss", "torch")


def choose_backend(backend: str, use_gpu: bool = False) -> tuple[str, str]:
    """(backend, device) that a fit with `--kmeans-backend backend` runs here.

    auto: torch on CUDA (tensor-core bf16 against faiss-gpu's fp32) when `use_gpu` and torch
    sees a GPU; torch on the CPU when it has native bf16 (~3-4x faiss's fp32 GEMM, measured in
    benchmarks/README.md); faiss otherwise. faiss: on the GPU only when faiss-gpu sees one.
    torch: CUDA when asked for and present, else the CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "auto":
        if use_gpu and torch_cuda():
            return "torch", "cuda"
        if use_gpu and has_faiss_gpu():
            return "faiss", "cuda"
        backend = "torch" if cpu_has_bf16() and _has_torch() else "faiss"
    if backend == "torch":
        return "torch", "cuda" if use_gpu and torch_cuda() else "cpu"
    return "faiss", "cuda" if use_gpu and has_faiss_gpu() else "cpu"


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


def fit_kmeans(
    x: np.ndarray,
    k: int,
    iters: int,
    metric: str,
    seed: int,
    use_gpu: bool = False,
    backend: str = "auto",
    tol: float | None = None,
    precision: str | None = None,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """k-means on the whole sample with the backend `choose_backend` picks.

    Exactly `iters` iterations, unless `tol` is given: then it stops after the first iteration
    whose objective moved by at most tol x |objective| from the previous one (faiss's rule).
    Returns (centroids float32 [k, d], final objective, stats). For metric cosine the sample is
    normalised and spherical k-means keeps unit centroids. The objective is faiss's: the sum of
    squared distances (l2) or of similarities (cosine) of the last assignment. The stats name
    the backend, device and precision that ran, and the iterations actually run.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise BadInput(f"k = {k} is larger than the {n} sampled rows")
    if metric == "cosine":
        x = normalize(x)
    name, device = choose_backend(backend, use_gpu)
    if name == "torch":
        c, obj, stats = fit_kmeans_torch(
            x, k, iters, metric, seed, device=device, tol=tol, precision=precision
        )
    else:
        c, obj, stats = _fit_faiss(x, k, iters, metric, seed, device == "cuda", tol)
    stats["requested_backend"] = backend
    return c, obj, stats


def _fit_faiss(
    x: np.ndarray, k: int, iters: int, metric: str, seed: int, gpu: bool, tol: float | None
) -> tuple[np.ndarray, float, dict[str, Any]]:
    import faiss

    t0 = time.perf_counter()
    n, d = x.shape
    km = faiss.Kmeans(
        d,
        k,
        niter=iters,
        seed=seed,
        spherical=(metric == "cosine"),
        max_points_per_centroid=(n + k - 1) // k + 1,  # never subsample the sample again
        min_points_per_centroid=1,
        early_stop_threshold=-1.0 if tol is None else float(tol),
        verbose=False,
        gpu=gpu,
    )
    km.train(x)
    c = np.ascontiguousarray(km.centroids, dtype=np.float32)
    if metric == "cosine":
        c = normalize(c)
    inertia = float(km.obj[-1]) if len(km.obj) else float("nan")
    stats = {
        "sample_rows": n,
        "dim": d,
        "k": k,
        "iterations": len(km.iteration_stats),
        "inertia": inertia,
        "seconds": round(time.perf_counter() - t0, 3),
        "gpu": gpu,
        "backend": "faiss",
        "device": "cuda" if gpu else "cpu",
        "precision": "fp32",
        "tol": tol,
    }
    return c, inertia, stats


def fit_kmeans_torch(
    x: np.ndarray,
    k: int,
    iters: int,
    metric: str,
    seed: int,
    device: str = "cuda",
    tol: float | None = None,
    precision: str | None = None,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Lloyd k-means in torch: the assignment product in bf16 (fp32 accumulation) where bf16
    products are fast (`devices.product_precision`: CUDA, a CPU with AMX), else in fp32;
    centroid updates in float64 sums; on CUDA or on a CPU.

    Same contract as fit_kmeans: exactly `iters` iterations on the whole sample (fewer only
    with `tol`), k distinct sample rows as the seeded initial centroids, spherical (unit
    centroids) for cosine; `x` is taken as given (fit_kmeans normalises it for cosine). An
    assignment off by less than the bf16 error only moves a border row between two nearly
    equidistant centroids. For l2 the rows are centred before the cast, so that the scores
    x·c − ‖c‖²/2 are not dominated by a common offset that bf16 would round away. On the CPU
    the sample is cast once (2 bytes per value), not per chunk per iteration. Empty clusters
    are re-seeded with random sample rows. The objective comes from the per-cluster sums (no
    per-row pass). Reproducible: the same input gives the same bytes on every run (row-order
    `index_add_` on the CPU, `segment_sum` on CUDA, no floating-point atomics); the GPU memory
    it used is released at the end.
    """
    import torch

    t0 = time.perf_counter()
    n, d = x.shape
    cuda = device != "cpu"
    precision = precision or product_precision(device)  # tests force either
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"k-means precision must be bf16 or fp32, got {precision!r}")
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    l2 = metric != "cosine"
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    c = xt[torch.randperm(n, generator=gen)[:k].to(device)].clone()
    if cuda:
        chunk = max(1024, min(65536, (512 << 20) // (2 * k)))
    else:  # a [chunk, k] score block of a few MB: the argmax reads it from cache
        chunk = max(256, min(8192, (16 << 20) // (2 * k)))
    spans = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    mu = torch.zeros(d, dtype=torch.float64, device=device)
    if l2:
        for a, b in spans:
            mu += xt[a:b].double().sum(0)
        mu /= n
    mu32 = mu.float()
    sq = 0.0  # sum of the centred rows' squared norms (l2 objective)
    if l2:
        for a, b in spans:
            sq += float(((xt[a:b].double() - mu) ** 2).sum())

    def lowered(xb):
        """Rows in the product's precision; l2: centred, with a column of ones that carries
        −‖c‖²/2 into the product."""
        if not l2:
            return xb.to(low)
        out = torch.empty((len(xb), d + 1), dtype=low, device=device)
        out[:, :d] = xb - mu32
        out[:, d] = 1
        return out

    # CPU: the sample in bf16 once (CUDA: per chunk, cheap there, and no second copy in memory)
    xlow = None
    if not cuda and (l2 or low != torch.float32):
        xlow = torch.empty((n, d + l2), dtype=low)
        for a, b in spans:
            xlow[a:b] = lowered(xt[a:b])
    part = None if cuda else torch.zeros((k, d), dtype=torch.float32)
    labels = torch.empty(n, dtype=torch.int64, device=device)
    obj: list[float] = []
    for _ in range(max(1, iters)):
        sums = torch.zeros((k, d), device=device, dtype=torch.float64)
        if l2:
            cc = c - mu32
            w = torch.cat([cc, -0.5 * (cc * cc).sum(1, keepdim=True)], 1)
        else:
            w = c
        wT = w.to(low).T.contiguous()
        for a, b in spans:
            xb16 = xlow[a:b] if xlow is not None else (xt[a:b] if not cuda else lowered(xt[a:b]))
            j = row_argmax(torch, xb16 @ wT)
            labels[a:b] = j
            if cuda:
                segment_sum(sums, j, xt[a:b])
        if not cuda:  # blocks of rows summed in fp32 (row order), then added in float64
            for a in range(0, n, 1 << 16):
                b = min(n, a + (1 << 16))
                part.zero_()
                part.index_add_(0, labels[a:b], xt[a:b])
                sums += part
        counts = torch.bincount(labels, minlength=k)
        c64 = c.double()
        if l2:  # sum ||x - c||^2 over the assignment, centred: no cancellation on an offset
            cc64 = c64 - mu
            sc = sums - counts.unsqueeze(1).double() * mu
            total = (
                sq
                - 2 * float((sc * cc64).sum())
                + float((counts.double() * (cc64 * cc64).sum(1)).sum())
            )
        else:
            total = float((sums * c64).sum())
        obj.append(total)
        empty = torch.nonzero(counts == 0).flatten()
        c = (sums / counts.clamp_min(1).unsqueeze(1).double()).float()
        if empty.numel():
            pick = torch.randint(0, n, (int(empty.numel()),), generator=gen).to(device)
            c[empty] = xt[pick]
        if metric == "cosine":
            c = torch.nn.functional.normalize(c, dim=1)
        if tol is not None and len(obj) > 1 and abs(obj[-1] - obj[-2]) <= tol * abs(obj[-1]):
            break
    cent = np.ascontiguousarray(c.float().cpu().numpy(), dtype=np.float32)
    del xt, xlow, c, sums, counts, wT, labels
    if cuda:  # 8-16 GB at k = 50,000 stayed cached in the actor otherwise
        torch.cuda.empty_cache()
    if metric == "cosine":
        cent = normalize(cent)
    stats = {
        "sample_rows": n,
        "dim": d,
        "k": k,
        "iterations": len(obj),
        "inertia": obj[-1],
        "seconds": round(time.perf_counter() - t0, 3),
        "gpu": cuda,
        "backend": "torch",
        "device": "cuda" if cuda else "cpu",
        "precision": "bf16" if low == torch.bfloat16 else "fp32",
        "tol": tol,
    }
    return cent, obj[-1], stats


def segment_sum(out, j, x) -> None:
    """out[j[i]] += x[i] for every row i, the same bytes on every run.

    `index_add_` on CUDA adds with floating-point atomics, in whatever order the threads come:
    two identical fits gave different centroids. On CUDA, `index_put_(accumulate=True)` sorts
    the indices and adds each output row's inputs in that order (the path torch's
    deterministic mode takes for index_add_); on the CPU `index_add_` adds in row order."""
    if out.device.type == "cuda":
        out.index_put_((j,), x.to(out.dtype), accumulate=True)
    else:
        out.index_add_(0, j, x.to(out.dtype))
