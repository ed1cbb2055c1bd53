"""Prototype fitting: a seeded uniform sample across all shards, then faiss k-means.

The sample rule is deterministic and distributable: shard i contributes a number of rows
proportional to its size (largest remainder, ties to the lower shard index), and the rows inside
a shard are drawn by a generator seeded with (seed, shard index). Any worker can compute its
shard's sample rows without talking to the others.
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


def sample_rows(shard_index: int, rows: int, count: int, seed: int) -> np.ndarray:
    """Sorted row positions inside a shard for its share of the prototype sample."""
    if count >= rows:
        return np.arange(rows, dtype=np.int64)
    rng = np.random.default_rng([seed, shard_index])
    return np.sort(rng.choice(rows, size=count, replace=False))


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in place-safe fashion (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (x / norms).astype(np.float32, copy=False)


def fit_kmeans(
    x: np.ndarray, k: int, iters: int, metric: str, seed: int, use_gpu: bool = False
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """faiss k-means on the whole sample: exactly `iters` iterations, no silent subsampling.

    Returns (centroids float32 [k, d], final inertia, stats). For metric cosine the sample is
    normalised and spherical k-means keeps unit centroids.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k = {k} is larger than the {n} sampled rows")
    if metric == "cosine":
        x = normalize(x)
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
        gpu=bool(use_gpu),
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
        "gpu": bool(use_gpu),
    }
    return c, inertia, stats


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
