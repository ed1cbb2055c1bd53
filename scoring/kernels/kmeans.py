"""k-means on the prototype sample: faiss (CPU or GPU), or torch Lloyd iterations on CUDA.

Both run exactly the requested iterations on the whole sample (no silent subsampling) and
return unit centroids for the cosine metric (spherical k-means).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from scoring.errors import BadInput
from scoring.kernels.devices import has_faiss_gpu, normalize, torch_cuda


def fit_kmeans(
    x: np.ndarray, k: int, iters: int, metric: str, seed: int, use_gpu: bool = False
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """faiss k-means on the whole sample: exactly `iters` iterations, no silent subsampling.

    Returns (centroids float32 [k, d], final inertia, stats). For metric cosine the sample is
    normalised and spherical k-means keeps unit centroids.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise BadInput(f"k = {k} is larger than the {n} sampled rows")
    if metric == "cosine":
        x = normalize(x)
    if use_gpu and not has_faiss_gpu() and torch_cuda():
        return fit_kmeans_torch(x, k, iters, metric, seed, device="cuda")
    import faiss

    t0 = time.perf_counter()
    km = faiss.Kmeans(
        d,
        k,
        niter=iters,
        seed=seed,
        spherical=(metric == "cosine"),
        max_points_per_centroid=(n + k - 1) // k + 1,  # never subsample the sample again
        min_points_per_centroid=1,
        early_stop_threshold=-1.0,
        verbose=False,
        gpu=bool(use_gpu and has_faiss_gpu()),
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
        "gpu": bool(use_gpu and has_faiss_gpu()),
    }
    return c, inertia, stats


def fit_kmeans_torch(
    x: np.ndarray, k: int, iters: int, metric: str, seed: int, device: str = "cuda"
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Lloyd k-means in torch (the GPU path when faiss-gpu is not installed).

    Same contract as fit_kmeans: exactly `iters` iterations on the whole sample, k distinct
    sample rows as the seeded initial centroids, spherical (unit centroids) for cosine. The
    assignment uses a bf16 GEMM (an assignment off by less than the bf16 error only moves a
    border row between two nearly equidistant centroids). Empty clusters are re-seeded with
    random sample rows. Inertia as faiss reports it: sum of squared distances (l2) or of
    similarities (cosine). Reproducible: the same input gives the same bytes on every run
    (`segment_sum`, no floating-point atomics); the GPU memory it used is released at the end.
    """
    import torch

    t0 = time.perf_counter()
    n, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    xt = torch.from_numpy(x).to(device)
    c = xt[torch.randperm(n, generator=gen)[:k].to(device)].clone()
    chunk = max(1024, min(65536, (512 << 20) // (2 * k)))
    obj: list[float] = []
    for _ in range(max(1, iters)):
        sums = torch.zeros(c.shape, device=device, dtype=torch.float64)
        counts = torch.zeros(k, device=device, dtype=torch.float32)
        total = 0.0
        cT = c.to(torch.bfloat16).T.contiguous()
        hn = 0.5 * (c * c).sum(1)
        for a in range(0, n, chunk):
            xb = xt[a : a + chunk]
            s = (xb.to(torch.bfloat16) @ cT).float()
            if metric != "cosine":
                s -= hn
            best, j = s.max(1)
            segment_sum(sums, j, xb)
            counts += torch.bincount(j, minlength=k).float()
            if metric == "cosine":
                total += float(best.sum())
            else:
                total += float(((xb * xb).sum(1) - 2 * best).clamp_min(0).sum())
        obj.append(total)
        empty = torch.nonzero(counts == 0).flatten()
        c = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        if empty.numel():
            pick = torch.randint(0, n, (int(empty.numel()),), generator=gen).to(device)
            c[empty] = xt[pick]
        if metric == "cosine":
            c = torch.nn.functional.normalize(c, dim=1)
    cent = np.ascontiguousarray(c.float().cpu().numpy(), dtype=np.float32)
    del xt, c, sums, counts, cT, hn, xb, s, best, j
    if device != "cpu":  # 8-16 GB at k = 50,000 stayed cached in the actor otherwise
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
        "gpu": device != "cpu",
        "backend": "torch",
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
