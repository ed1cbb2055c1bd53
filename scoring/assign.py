"""Nearest-prototype search: cluster index and distance for every row.

Metric cosine: rows and centroids are unit vectors, distance = 1 - cos. Metric l2: Euclidean
distance. The search keeps the two nearest prototypes so that the margin (second - first) is
available as an extra score column.
"""

from __future__ import annotations

import numpy as np


class NearestPrototype:
    """Holds a faiss flat index over the centroids; `search` is exact."""

    def __init__(self, centroids: np.ndarray, metric: str, use_gpu: bool = False):
        import faiss

        self.metric = metric
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        k, d = self.centroids.shape
        self.k, self.d = k, d
        index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        if use_gpu:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, index)
            self._res = res
        index.add(self.centroids)
        self.index = index

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster int32, distance float32, second-nearest distance float32) per row.

        For cosine, x must already be L2-normalised.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1] != self.d:
            raise ValueError(
                f"embedding width {x.shape[1]} does not match the prototypes' {self.d}"
            )
        kk = min(2, self.k)
        sims, idx = self.index.search(x, kk)
        if self.metric == "cosine":
            dist = (1.0 - sims).astype(np.float32)
        else:
            dist = np.sqrt(np.maximum(sims, 0.0)).astype(np.float32)
        second = dist[:, 1] if kk == 2 else np.full(len(x), np.inf, np.float32)
        return idx[:, 0].astype(np.int32), dist[:, 0].copy(), second.copy()


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
