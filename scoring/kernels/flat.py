"""The faiss backend of the nearest-prototype search (`assign.NearestPrototype`): an exact
flat index over the centroids."""

from __future__ import annotations

import numpy as np


class FaissSearch:
    """A faiss flat index over the centroids: exact fp32 top-2."""

    def __init__(self, centroids: np.ndarray, metric: str, use_gpu: bool = False):
        import faiss

        self.metric = metric
        self.k, d = centroids.shape
        index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        if use_gpu:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, index)
            self._res = res
        index.add(centroids)
        self.index = index

    def search(
        self, x: np.ndarray, scale: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kk = min(2, self.k)
        sims, idx = self.index.search(x, kk)
        if self.metric == "cosine":
            if scale is not None:  # raw rows: cos = x·c / ‖x‖ (zero rows: cos 0)
                sims = sims / np.where(scale > 0, scale, np.float32(1.0))[:, None]
            dist = (1.0 - sims).astype(np.float32)
        else:
            dist = np.sqrt(np.maximum(sims, 0.0)).astype(np.float32)
        second = dist[:, 1] if kk == 2 else np.full(len(x), np.inf, np.float32)
        return idx[:, 0].astype(np.int32), dist[:, 0].copy(), second.copy()
