"""Prototype fitting: a seeded sample spread across all shards, then faiss k-means.

The sample rule is deterministic and distributable: shard i contributes a number of rows
proportional to its size (largest remainder, ties to the lower shard index). Inside a shard the
sample touches few row groups (`sample_groups`): a generator seeded with (seed, shard index)
picks random row groups until they hold `SAMPLE_OVERSAMPLE` x the shard's share, then draws the
share uniformly from those rows. At 10^9 rows and a 1-2M-row sample this reads one row group per
shard (a few % of the data) instead of every byte. Any worker can compute its shard's sample
rows without talking to the others.

Sample size rule (`sample_size_rule`): the requested size (default 256 x k, faiss's upper
recommendation), at most N, and at most `SAMPLE_MAX_BYTES` of float32 embeddings when the width
is known at planning time; never below k.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from typing import Any

import numpy as np

from scoring.storage import Store

log = logging.getLogger(__name__)

CENTROIDS_KEY = "prototypes/centroids.npy"
SAMPLE_MAX_BYTES = 8 << 30  # cap on the float32 sample held by the k-means task
SAMPLE_OVERSAMPLE = 8  # a shard's picked row groups hold 8x its share of the sample
COMMIT_KEY = "prototypes/_COMMITTED.json"


def sample_counts(shard_rows: list[int], sample_size: int) -> np.ndarray:
    """Rows to draw from each shard: proportional to its rows, summing to min(S, N)."""
    rows = np.asarray(shard_rows, dtype=np.int64)
    total = int(rows.sum())
    s = min(int(sample_size), total)
    if total == 0:
        return np.zeros(len(rows), dtype=np.int64)
    prod = rows * s  # exact in int64 for N*S < 9.2e18
    base = prod // total
    rem = prod % total
    short = s - int(base.sum())
    if short:
        order = np.lexsort((np.arange(len(rows)), -rem))  # largest remainder, lower index first
        base[order[:short]] += 1
    return base


def sample_size_rule(
    requested: int, n_rows: int, k: int, dim: int | None, max_bytes: int = SAMPLE_MAX_BYTES
) -> int:
    """Rows to sample: the requested size, at most N, and at most max_bytes of float32 rows of
    width `dim` when known (never fewer than k rows)."""
    s = min(int(requested), int(n_rows))
    if dim:
        s = min(s, max(int(k), int(max_bytes) // (4 * int(dim))))
    return s


def sample_groups(
    group_rows: list[int],
    count: int,
    seed: int,
    shard_index: int,
    oversample: int = SAMPLE_OVERSAMPLE,
) -> tuple[list[int], np.ndarray]:
    """Which of a shard's row groups to read, and which rows of them, for its sample share.

    Returns (positions into `group_rows` of the picked groups, ascending; sorted row positions
    inside the concatenation of the picked groups). Groups are picked in a seeded random order
    until they hold min(all rows, oversample x count) rows; the count rows are then drawn
    uniformly from them.
    """
    total = int(sum(group_rows))
    if count >= total:
        return [i for i, r in enumerate(group_rows) if r], np.arange(total, dtype=np.int64)
    target = min(total, oversample * int(count))
    rng = np.random.default_rng([seed, shard_index, 1])
    picked: list[int] = []
    acc = 0
    for g in rng.permutation(len(group_rows)):
        if group_rows[g] == 0:
            continue
        picked.append(int(g))
        acc += int(group_rows[g])
        if acc >= target:
            break
    picked.sort()
    rows = np.sort(rng.choice(acc, size=int(count), replace=False))
    return picked, rows


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of the rows (zero rows stay zero).

    One read pass for the squared norms (einsum, no n x d temporary) and one fused
    multiply into the output: about 3x faster than norm-then-divide on large shards.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.size == 0:
        return x.astype(np.float32, copy=True)
    sq = np.einsum("ij,ij->i", x, x)
    bad = ~np.isfinite(sq)
    if bad.any():  # float32 overflow of huge (finite) values: redo those rows in float64
        sq = sq.astype(np.float64)
        sq[bad] = np.einsum("ij,ij->i", x[bad].astype(np.float64), x[bad].astype(np.float64))
    norms = np.sqrt(sq)
    norms[norms == 0] = 1.0
    out = np.empty_like(x)
    np.multiply(x, (1.0 / norms).astype(np.float32)[:, None], out=out)
    return out


def fit_kmeans(
    x: np.ndarray, k: int, iters: int, metric: str, seed: int, use_gpu: bool = False
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """faiss k-means on the whole sample: exactly `iters` iterations, no silent subsampling.

    Returns (centroids float32 [k, d], final inertia, stats). For metric cosine the sample is
    normalised and spherical k-means keeps unit centroids.
    """
    from scoring.assign import has_faiss_gpu, torch_cuda

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k = {k} is larger than the {n} sampled rows")
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
    similarities (cosine).
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
        sums = torch.zeros_like(c)
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
            sums.index_add_(0, j, xb)
            counts += torch.bincount(j, minlength=k).float()
            if metric == "cosine":
                total += float(best.sum())
            else:
                total += float(((xb * xb).sum(1) - 2 * best).clamp_min(0).sum())
        obj.append(total)
        empty = torch.nonzero(counts == 0).flatten()
        c = sums / counts.clamp_min(1).unsqueeze(1)
        if empty.numel():
            pick = torch.randint(0, n, (int(empty.numel()),), generator=gen).to(device)
            c[empty] = xt[pick]
        if metric == "cosine":
            c = torch.nn.functional.normalize(c, dim=1)
    cent = np.ascontiguousarray(c.float().cpu().numpy(), dtype=np.float32)
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


def save_centroids(store: Store, centroids: np.ndarray, stats: dict[str, Any]) -> str:
    """Write centroids.npy, then the _COMMITTED.json marker naming its sha256."""
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32), allow_pickle=False)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(CENTROIDS_KEY, data)
    marker = dict(stats, sha256=sha, shape=list(centroids.shape))
    if not store.put_if_absent(COMMIT_KEY, json.dumps(marker, indent=1).encode()):
        log.warning("prototypes were committed by another attempt; its marker stands")
    return sha


def load_committed_marker(store: Store) -> dict[str, Any] | None:
    """The prototypes' commit marker (sha256, sample digests per shard), or None."""
    if not store.exists(COMMIT_KEY):
        return None
    return json.loads(store.get_bytes(COMMIT_KEY))


def sample_digest(x: np.ndarray) -> str:
    """sha256 of one shard's sample rows (float32, C order): the resume check of a changed
    input file compares it with the digest recorded when the prototypes were fitted."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def load_committed(store: Store) -> tuple[np.ndarray, str] | None:
    """The committed centroids and their sha256, or None when not committed (or torn)."""
    if not store.exists(COMMIT_KEY):
        return None
    marker = json.loads(store.get_bytes(COMMIT_KEY))
    data = store.get_bytes(CENTROIDS_KEY)
    sha = hashlib.sha256(data).hexdigest()
    if sha != marker.get("sha256"):
        log.warning("prototypes/centroids.npy does not match its marker; refitting")
        return None
    return np.load(io.BytesIO(data), allow_pickle=False), sha
