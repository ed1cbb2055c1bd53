"""The faiss backend of the nearest-prototype search (`assign.NearestPrototype`): an exact
flat fp32 index over the centroids, whose top three candidates certify the first two (the
committed distances are computed from the chosen prototypes by `kernels.canonical`)."""

from __future__ import annotations

import numpy as np

from scoring.kernels.devices import row_norms

CANDIDATES = 3


def gamma32(d: int) -> float:
    """Bound on an fp32 dot product's relative error (any summation order), d terms."""
    return d * 2.0**-24 / (1 - d * 2.0**-24)


def centroid_norms(centroids: np.ndarray) -> np.ndarray:
    """‖c‖ of each prototype, in float64."""
    return np.sqrt(np.einsum("ij,ij->i", centroids.astype(np.float64), centroids))


def cosine_slack(centroids: np.ndarray, cn: np.ndarray | None = None) -> float:
    """Per-unit-‖x‖ error of ranking by x·c instead of by cosine: fp32 accumulation plus how
    far the float32 prototypes' norms `cn` are from 1, plus two float32 steps of a distance."""
    cn = centroid_norms(centroids) if cn is None else cn
    cmax = float(cn.max()) if len(cn) else 0.0
    dev = float(np.abs(cn - 1.0).max()) if len(cn) else 0.0
    return 2 * (gamma32(centroids.shape[1] + 2) * cmax + dev) * 1.01 + 2.0**-22


class FaissSearch:
    """A faiss flat index over the centroids: fp32 top three, and which rows' top two are
    certified (the gap to the third exceeds every rounding error and a float32 step)."""

    def __init__(self, centroids: np.ndarray, metric: str, use_gpu: bool = False):
        import faiss

        self.metric = metric
        self.k, d = centroids.shape
        self.d = d
        index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        if use_gpu:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, index)
            self._res = res
        index.add(centroids)
        self.index = index
        cn = centroid_norms(centroids)
        self.slack = cosine_slack(centroids, cn)
        self.cmax = float(cn.max()) if self.k else 0.0

    def candidates(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(candidate prototypes [n, min(3, k)], certified bool [n]) of rows x (any norm)."""
        kk = min(CANDIDATES, self.k)
        s, idx = self.index.search(x, kk)
        if kk < 3:
            return idx, np.ones(len(x), bool)
        s = s.astype(np.float64)
        nx = row_norms(x).astype(np.float64) * (1 + 2 * gamma32(self.d))
        if self.metric == "cosine":  # similarities: larger is nearer
            ok = s[:, 1] - s[:, 2] > nx * self.slack
        else:  # squared distances: smaller is nearer
            err = gamma32(self.d + 2) * (nx + self.cmax) ** 2 * 1.01
            ok = s[:, 2] - s[:, 1] > 2 * err + 2.0**-20 * s[:, 2] + 1e-30
        return idx, ok
