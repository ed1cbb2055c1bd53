"""SemDeDup within clusters (Abbas et al. 2023; DESIGN §5), exact and blocked.

Inside one cluster the rows are ranked hardest first (distance desc, id asc). Row i is a
duplicate when its cosine similarity to ANY earlier-ranked row j < i (duplicate or not, as in
the reference implementation) is >= 1 - eps.

The similarity matrix is never built: query blocks of `block` rows are multiplied (torch, on the
GPU when there is one) against the earlier rows in column blocks of `block` rows, keeping only
the running row maximum, so memory is O(block x block) for the products on top of the
cluster's embeddings. Results are exact: float32 products are used to decide every row whose
maximum lies farther than a rounding bound from the threshold; the few rows within the bound are
re-decided in float64 against all their earlier rows, and the columns within the float64 bound
exactly, in integer arithmetic on the stored float32 values (kernels.exact_cosine): identical
and parallel vectors have similarity exactly 1, so eps 0 removes every copy. The threshold is
the double 1 - eps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from scoring.kernels.devices import torch_device
from scoring.kernels.exact_cosine import decide_near

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 4096


def rounding_bound(d: int) -> float:
    """A safe bound on |float32 cosine - exact cosine| for unit float32 vectors of width d."""
    return max(1e-5, 4.0 * d * 2.0**-24)


# the eps grid of the manifest's removal curve: log-spaced from 0.001 to 0.3
EPS_GRID = tuple(float(f"{e:.4g}") for e in np.geomspace(1e-3, 0.3, 25))


def stored_bound(d: int) -> float:
    """A safe bound on |stored max_similarity - exact cosine|: the float32 products'
    `rounding_bound` plus the float32 rounding of the stored value (|v| <= 1)."""
    return rounding_bound(d) + 2.0**-23


def removal_curve(max_similarity: np.ndarray, grid=EPS_GRID) -> np.ndarray:
    """int64 [len(grid)]: rows whose stored similarity is >= 1 - eps, per eps of the grid
    (nulls as NaN count for none)."""
    s = np.sort(np.asarray(max_similarity, np.float64))
    s = s[np.isfinite(s)]
    thr = 1.0 - np.asarray(grid, np.float64)
    return (len(s) - np.searchsorted(s, thr, side="left")).astype(np.int64)


def exact_flags(x: np.ndarray, rows: np.ndarray, eps: float) -> np.ndarray:
    """Duplicate flags at `eps` of the rank-ordered rows `rows` of x (one cluster's stored
    float32 embeddings, in rank order) against all their earlier rows, decided exactly as the
    range pass decides the rows near its threshold: the re-decision of a changed eps."""
    x = np.asarray(x, np.float32)
    rows = np.asarray(rows, np.int64)
    dup, _, _ = _exact_earlier(x[rows], rows, x, 0, 1.0 - float(eps))
    return dup & (rows > 0)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32 (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return (x / np.where(norms > 0, norms, 1.0)[:, None].astype(np.float32)).astype(np.float32)


@dataclass
class Evidence:
    """Per row (in rank order): duplicate flag, the largest cosine to an earlier-ranked row of
    its cluster (-inf when there is none) and that row's rank position (-1 when none)."""

    duplicate: np.ndarray  # bool
    max_similarity: np.ndarray  # float64
    earlier: np.ndarray  # int64

    @staticmethod
    def empty(n: int) -> Evidence:
        return Evidence(np.zeros(n, bool), np.full(n, -np.inf), np.full(n, -1, np.int64))


def max_earlier(q, q0: int, c, c0: int, block: int, dev) -> tuple[np.ndarray, np.ndarray]:
    """For each row i of q (global rank q0 + i): the max cosine to the rows j of c (global rank
    c0 + j) with c0 + j < q0 + i, and that j's global rank; (-inf, -1) when there is none.
    q, c: unit float32 torch tensors. Products are block x block."""
    import torch

    nq, nc = q.shape[0], c.shape[0]
    out = np.empty(nq, np.float64)
    arg = np.empty(nq, np.int64)
    with torch.no_grad():
        for b0 in range(0, nq, block):
            b1 = min(nq, b0 + block)
            m = torch.full((b1 - b0,), -float("inf"), device=dev)
            mi = torch.full((b1 - b0,), -1, dtype=torch.int64, device=dev)
            last = min(nc, q0 + b1 - 1 - c0)  # columns at or after the last row never count
            for a0 in range(0, max(last, 0), block):
                a1 = min(last, a0 + block)
                s = q[b0:b1] @ c[a0:a1].T
                if c0 + a1 > q0 + b0:  # some column is not earlier than some row: mask
                    ri = torch.arange(q0 + b0, q0 + b1, device=dev)[:, None]
                    cj = torch.arange(c0 + a0, c0 + a1, device=dev)[None, :]
                    s = s.masked_fill(cj >= ri, -float("inf"))
                v, j = s.max(dim=1)
                better = v > m  # strictly: of equal maxima the earliest column stands
                m = torch.where(better, v, m)
                mi = torch.where(better, j + (c0 + a0), mi)
            out[b0:b1] = m.double().cpu().numpy()
            arg[b0:b1] = mi.cpu().numpy()
    return out, arg


def _exact_earlier(rows: np.ndarray, ranks: np.ndarray, cols: np.ndarray, c0: int, thr: float):
    """Exact duplicate flags, max cosines and their columns' global ranks of raw float32 rows
    (global ranks `ranks`) against the earlier columns [c0, c0 + len(cols)): float64 products
    first, then the columns within the float64 bound of thr decided exactly on the stored
    float32 values (kernels.exact_cosine). Rows go in blocks of at most ~64 MiB of products."""
    n = len(ranks)
    dup = np.zeros(n, bool)
    best = np.full(n, -np.inf)
    arg = np.full(n, -1, np.int64)
    if n == 0 or len(cols) == 0:
        return dup, best, arg
    x64_rows, x64_cols = exact_unit(rows), exact_unit(cols)
    step = max(1, (64 << 20) // (8 * len(cols)))
    col_ranks = (c0 + np.arange(len(cols)))[None, :]
    for a in range(0, n, step):
        sl = slice(a, a + step)
        s = x64_rows[sl] @ x64_cols.T
        s[col_ranks >= ranks[sl, None]] = -np.inf
        dup[sl], best[sl], arg[sl] = decide_near(rows[sl], ranks[sl], cols, c0, s, thr)
    return dup, best, arg


def dedup_evidence(x: np.ndarray, eps: float, block: int = DEFAULT_BLOCK, device=None) -> Evidence:
    """Duplicate evidence of rows already in rank order (hardest first). x: float [n, d]."""
    import torch

    n = len(x)
    if block < 1:
        raise ValueError(f"dedup block size must be >= 1 (got {block})")
    if n <= 1:
        return Evidence.empty(n)
    x = np.asarray(x, np.float32)
    dev = device or torch_device()
    xt = torch.from_numpy(unit_rows(x)).to(dev)
    thr = 1.0 - float(eps)
    best, arg = max_earlier(xt, 0, xt, 0, block, dev)
    out = best >= thr
    unsure = np.flatnonzero(np.abs(best - thr) <= rounding_bound(x.shape[1]))
    if len(unsure):
        out[unsure], best[unsure], arg[unsure] = _exact_earlier(x[unsure], unsure, x, 0, thr)
    out[0] = False
    return Evidence(out, best, arg)


def duplicate_flags(
    x: np.ndarray, eps: float, block: int = DEFAULT_BLOCK, device=None
) -> np.ndarray:
    """Duplicate flags of rows already in rank order (hardest first). x: float [n, d]."""
    return dedup_evidence(x, eps, block, device).duplicate


def exact_unit(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    norms = np.linalg.norm(x64, axis=1)
    return x64 / np.where(norms > 0, norms, 1.0)[:, None]


def streamed_evidence(
    n: int, load_chunk, chunk_rows: int, d: int, eps: float, block: int
) -> Evidence:
    """Duplicate evidence of n rank-ordered rows that do not fit in memory together.

    `load_chunk(c)` returns the raw float32 embeddings of ranks [c*chunk_rows, (c+1)*chunk_rows).
    Each query chunk is compared with itself and every earlier chunk, loaded one at a time, so
    memory is two chunks plus one block x block product; rows within the rounding bound are
    re-decided in float64 by a second sweep over the earlier chunks.
    """
    import torch

    dev = torch_device()
    thr = 1.0 - float(eps)
    tol = rounding_bound(d)
    ev = Evidence.empty(n)
    chunks = (n + chunk_rows - 1) // chunk_rows
    for qc in range(chunks):
        q_raw = load_chunk(qc)
        q0 = qc * chunk_rows
        q = torch.from_numpy(unit_rows(q_raw)).to(dev)
        best = np.full(len(q_raw), -np.inf)
        arg = np.full(len(q_raw), -1, np.int64)
        for cc in range(qc + 1):
            c = q if cc == qc else torch.from_numpy(unit_rows(load_chunk(cc))).to(dev)
            b, a = max_earlier(q, q0, c, cc * chunk_rows, block, dev)
            better = b > best
            best, arg = np.where(better, b, best), np.where(better, a, arg)
        dup = best >= thr
        unsure = np.flatnonzero(np.abs(best - thr) <= tol)
        if len(unsure):
            xq = np.asarray(q_raw[unsure], np.float32)
            d64 = np.zeros(len(unsure), bool)
            b64 = np.full(len(unsure), -np.inf)
            a64 = np.full(len(unsure), -1, np.int64)
            for cc in range(qc + 1):
                xc = np.asarray(q_raw if cc == qc else load_chunk(cc), np.float32)
                d, b, a = _exact_earlier(xq, q0 + unsure, xc, cc * chunk_rows, thr)
                better = b > b64
                d64 |= d
                b64, a64 = np.where(better, b, b64), np.where(better, a, a64)
            dup[unsure], best[unsure], arg[unsure] = d64, b64, a64
        sl = slice(q0, q0 + len(q_raw))
        ev.duplicate[sl], ev.max_similarity[sl], ev.earlier[sl] = dup, best, arg
    ev.duplicate[:1] = False
    return ev


def dedup_sorted(
    cluster: np.ndarray, x: np.ndarray, eps: float, block: int = DEFAULT_BLOCK
) -> Evidence:
    """Duplicate evidence for rows sorted by (cluster asc, distance desc, id asc); `earlier`
    holds row positions in the whole sorted input."""
    ev = Evidence.empty(len(cluster))
    if len(cluster) == 0:
        return ev
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    ends = np.r_[starts[1:], len(cluster)]
    dev = torch_device()
    for a, b in zip(starts, ends):
        e = dedup_evidence(x[a:b], eps, block, dev)
        ev.duplicate[a:b], ev.max_similarity[a:b] = e.duplicate, e.max_similarity
        ev.earlier[a:b] = np.where(e.earlier >= 0, e.earlier + a, -1)
    return ev


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
