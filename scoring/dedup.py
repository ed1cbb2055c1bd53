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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32 (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return (x / np.where(norms > 0, norms, 1.0)[:, None].astype(np.float32)).astype(np.float32)


def max_earlier(q, q0: int, c, c0: int, block: int, dev) -> np.ndarray:
    """For each row i of q (global rank q0 + i): max cosine to the rows j of c (global rank
    c0 + j) with c0 + j < q0 + i; -inf when there is none. q, c: unit float32 torch tensors.
    Products are block x block."""
    import torch

    nq, nc = q.shape[0], c.shape[0]
    out = np.empty(nq, np.float64)
    with torch.no_grad():
        for b0 in range(0, nq, block):
            b1 = min(nq, b0 + block)
            m = torch.full((b1 - b0,), -float("inf"), device=dev)
            last = min(nc, q0 + b1 - 1 - c0)  # columns at or after the last row never count
            for a0 in range(0, max(last, 0), block):
                a1 = min(last, a0 + block)
                s = q[b0:b1] @ c[a0:a1].T
                if c0 + a1 > q0 + b0:  # some column is not earlier than some row: mask
                    ri = torch.arange(q0 + b0, q0 + b1, device=dev)[:, None]
                    cj = torch.arange(c0 + a0, c0 + a1, device=dev)[None, :]
                    s = s.masked_fill(cj >= ri, -float("inf"))
                m = torch.maximum(m, s.max(dim=1).values)
            out[b0:b1] = m.double().cpu().numpy()
    return out


def duplicate_flags(
    x: np.ndarray, eps: float, block: int = DEFAULT_BLOCK, device=None
) -> np.ndarray:
    """Duplicate flags of rows already in rank order (hardest first). x: float [n, d]."""
    import torch

    n = len(x)
    out = np.zeros(n, dtype=bool)
    if block < 1:
        raise ValueError(f"dedup block size must be >= 1 (got {block})")
    if n <= 1:
        return out
    x = np.asarray(x, np.float32)
    dev = device or _device()
    xt = torch.from_numpy(unit_rows(x)).to(dev)
    thr = 1.0 - float(eps)
    best = max_earlier(xt, 0, xt, 0, block, dev)
    out = best >= thr
    unsure = np.flatnonzero(np.abs(best - thr) <= rounding_bound(x.shape[1]))
    if len(unsure):
        x64 = exact_unit(x)
        for i in unsure:
            out[i] = bool(i > 0 and (x64[:i] @ x64[i]).max() >= thr)
    out[0] = False
    return out


def exact_unit(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    norms = np.linalg.norm(x64, axis=1)
    return x64 / np.where(norms > 0, norms, 1.0)[:, None]


def streamed_flags(n: int, load_chunk, chunk_rows: int, d: int, eps: float, block: int):
    """Duplicate flags of n rank-ordered rows that do not fit in memory together.

    `load_chunk(c)` returns the raw float32 embeddings of ranks [c*chunk_rows, (c+1)*chunk_rows).
    Each query chunk is compared with itself and every earlier chunk, loaded one at a time, so
    memory is two chunks plus one block x block product; rows within the rounding bound are
    re-decided in float64 by a second sweep over the earlier chunks.
    """
    import torch

    dev = _device()
    thr = 1.0 - float(eps)
    tol = rounding_bound(d)
    flags = np.zeros(n, dtype=bool)
    chunks = (n + chunk_rows - 1) // chunk_rows
    for qc in range(chunks):
        q_raw = load_chunk(qc)
        q0 = qc * chunk_rows
        q = torch.from_numpy(unit_rows(q_raw)).to(dev)
        best = np.full(len(q_raw), -np.inf)
        for cc in range(qc + 1):
            c = q if cc == qc else torch.from_numpy(unit_rows(load_chunk(cc))).to(dev)
            best = np.maximum(best, max_earlier(q, q0, c, cc * chunk_rows, block, dev))
        f = best >= thr
        unsure = np.flatnonzero(np.abs(best - thr) <= tol)
        if len(unsure):
            xq = exact_unit(q_raw[unsure])
            b64 = np.full(len(unsure), -np.inf)
            for cc in range(qc + 1):
                xc = exact_unit(q_raw if cc == qc else load_chunk(cc))
                s = xq @ xc.T
                rows = (q0 + unsure)[:, None]
                cols = (cc * chunk_rows + np.arange(len(xc)))[None, :]
                s[cols >= rows] = -np.inf
                b64 = np.maximum(b64, s.max(axis=1) if s.shape[1] else b64)
            f[unsure] = b64 >= thr
        flags[q0 : q0 + len(q_raw)] = f
    flags[:1] = False
    return flags


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
