"""SemDeDup within clusters (Abbas et al. 2023; DESIGN §5), exact and blocked.

Inside one cluster the rows are ranked hardest first (distance desc, id asc). Row i is a
duplicate when its cosine similarity to ANY earlier-ranked row j < i (duplicate or not, as in
the reference implementation) is >= 1 - eps.

The similarity matrix is never built: query blocks of `block` rows are multiplied (torch, on the
GPU when there is one) against the earlier rows in column blocks of `block` rows, keeping only
the running row maximum, so memory is O(block x block) for the products on top of the
cluster's embeddings. Results are exact: float32 products are used to decide every row whose
maximum lies farther than a rounding bound from the threshold; the few rows within the bound are
re-decided in float64 against all their earlier rows.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 4096


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def rounding_bound(d: int) -> float:
    """A safe bound on |float32 cosine - exact cosine| for unit float32 vectors of width d."""
    return max(1e-5, 4.0 * d * 2.0**-24)


def duplicate_flags(
    x: np.ndarray, eps: float, block: int = DEFAULT_BLOCK, device=None
) -> np.ndarray:
    """Duplicate flags of rows already in rank order (hardest first). x: float [n, d]."""
    import torch

    n = len(x)
    out = np.zeros(n, dtype=bool)
    if n <= 1:
        return out
    if block < 1:
        raise ValueError(f"dedup block size must be >= 1 (got {block})")
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = (x / safe[:, None].astype(np.float32)).astype(np.float32)
    dev = device or _device()
    xt = torch.from_numpy(unit).to(dev)
    thr = 1.0 - float(eps)
    best = np.empty(n, np.float64)
    with torch.no_grad():
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            q = xt[b0:b1]
            m = torch.full((b1 - b0,), -float("inf"), device=dev)
            for c0 in range(0, b1, block):
                c1 = min(b1, c0 + block)
                s = q @ xt[c0:c1].T
                if c1 > b0:  # the diagonal block: only earlier rows (j < i) count
                    ri = torch.arange(b0, b1, device=dev)[:, None]
                    cj = torch.arange(c0, c1, device=dev)[None, :]
                    s = s.masked_fill(cj >= ri, -float("inf"))
                m = torch.maximum(m, s.max(dim=1).values)
            best[b0:b1] = m.double().cpu().numpy()
    out = best >= thr
    tol = rounding_bound(x.shape[1])
    unsure = np.flatnonzero(np.abs(best - thr) <= tol)
    if len(unsure):
        x64 = x.astype(np.float64) / safe[:, None]
        for i in unsure:
            if i == 0:
                out[i] = False
                continue
            out[i] = bool((x64[:i] @ x64[i]).max() >= thr)
    out[0] = False
    return out


def dedup_sorted(
    cluster: np.ndarray, x: np.ndarray, eps: float, block: int = DEFAULT_BLOCK
) -> np.ndarray:
    """Duplicate flags for rows sorted by (cluster asc, distance desc, id asc)."""
    flags = np.zeros(len(cluster), dtype=bool)
    if len(cluster) == 0:
        return flags
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    ends = np.r_[starts[1:], len(cluster)]
    dev = _device()
    for a, b in zip(starts, ends):
        flags[a:b] = duplicate_flags(x[a:b], eps, block, dev)
    return flags


def reference_flags(x: np.ndarray, eps: float) -> np.ndarray:
    """Brute-force float64 reference (tests): the full similarity matrix, O(n^2) memory."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1)
    x = x / np.where(norms > 0, norms, 1.0)[:, None]
    s = x @ x.T
    n = len(x)
    out = np.zeros(n, dtype=bool)
    for i in range(1, n):
        out[i] = bool(s[i, :i].max() >= 1.0 - eps)
    return out
