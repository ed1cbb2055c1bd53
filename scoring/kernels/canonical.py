"""The committed distance and cluster of a row: one definition, whichever backend searched.

Definition. For a stored float32 row x and a prototype c (float32):

* metric cosine: D(x, c) = 1 - x·c / (‖x‖ ‖c‖), and D = 1 for a zero row;
* metric l2: D(x, c) = ‖x - c‖;

each the exact real value of those float32 numbers, rounded to the nearest float32 (ties to
even). A row's cluster is the prototype of smallest D, ties to the lower index; its second
the next in that (D, index) order. So the committed `distance`, `margin` and `cluster` depend
only on the row's embedding and the prototypes: not on the backend (faiss, torch, bf16, a
GPU), the machine, the summation order, the worker count or the shard a row landed in, and
bit-identical rows get bit-identical results.

How. Each D is evaluated in float64 with a rigorous bound e on its error (any summation
order: the bound holds for all of them). When D - e and D + e round to the same float32, that
float32 is the exact answer. The few rows whose interval holds a rounding boundary are tried
again by a second formula (cosine: ½‖x/‖x‖ - c/‖c‖‖², whose error shrinks with D, for rows near
their prototype), and the rest in exact decimal arithmetic (`_exact`).

A search backend hands over, per row, its best candidates and whether the first two are
*certified*: the true two nearest, with a gap to every other prototype wider than its own
error plus a float32 step (so no float32 tie can reorder them). `nearest` orders the two by
D; an uncertified row is searched again over every prototype in float64, and the exact
decision is made among all prototypes within the float64 error window of its second.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import numpy as np

U = 2.0**-53  # float64 unit roundoff
CHUNK = 256  # rows per float64 pass (float64 temporaries stay in the L2 cache)
_PREC = 360  # decimal digits of the exact path: every float32 product and sum exactly


class Canonical:
    """The definition above for one set of prototypes (float32 [k, d])."""

    def __init__(self, centroids: np.ndarray, metric: str):
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        self.metric = metric
        self.c32 = np.ascontiguousarray(centroids, dtype=np.float32)
        self.k, self.d = self.c32.shape
        self.c64 = self.c32.astype(np.float64)
        self.cn = np.sqrt(np.einsum("ij,ij->i", self.c64, self.c64))
        with np.errstate(invalid="ignore", divide="ignore"):
            self.chat = np.where(self.cn[:, None] > 0, self.c64 / self.cn[:, None], 0.0)
        self.cmax = float(self.cn.max()) if self.k else 0.0
        self.stats = {"rows": 0, "full": 0, "second_formula": 0, "exact": 0}

    # -- distances --------------------------------------------------------------------------

    def distances(self, x: np.ndarray, rows: np.ndarray, js: np.ndarray) -> np.ndarray:
        """D(x[rows[i]], c[js[i, t]]) for every row i and column t (float32, js's shape; a 1-d
        js is one prototype per row). Each row is read and its norm taken once."""
        js = np.asarray(js)
        flat = js.ndim == 1
        js = js.reshape(len(rows), -1)
        out = np.empty(js.shape, np.float32)
        for a in range(0, len(rows), CHUNK):
            xb = np.asarray(x[rows[a : a + CHUNK]], np.float64)
            nx = None
            if self.metric == "cosine":
                xx = np.einsum("ij,ij->i", xb, xb)
                nx = np.sqrt(xx)
            for t in range(js.shape[1]):
                out[a : a + CHUNK, t] = self._column(xb, nx, js[a : a + CHUNK, t])
        return out[:, 0] if flat else out

    def _column(self, xb: np.ndarray, nx: np.ndarray | None, j: np.ndarray) -> np.ndarray:
        d = self.d
        if self.metric == "l2":
            diff = xb - self.c64[j]
            dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            return self._settle(dist, (2 * d + 12) * U * dist, xb, j, None)
        dot = np.einsum("ij,ij->i", xb, self.c64[j])
        zero = (nx == 0) | (self.cn[j] == 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            dist = np.where(zero, 1.0, 1.0 - dot / (nx * self.cn[j]))
        err = np.where(zero, 0.0, (4 * d + 16) * U)
        return self._settle(dist, err, xb, j, nx)

    def _settle(self, dist, err, xb, j, nx) -> np.ndarray:
        """Round each float64 value to float32 where its error interval allows, else retry."""
        lo = (dist - err).astype(np.float32)
        hi = (dist + err).astype(np.float32)
        out = hi
        bad = np.nonzero(lo != hi)[0]
        if len(bad) and nx is not None:  # cosine near its prototype: the half-chord formula
            self.stats["second_formula"] += len(bad)
            xh = xb[bad] / nx[bad, None]
            diff = xh - self.chat[j[bad]]
            q = np.einsum("ij,ij->i", diff, diff)
            e = (self.d + 8) * U
            err2 = 2 * ((np.sqrt(q) + e) * e + e * e / 2 + (self.d + 1) * U * q / 2)
            d2 = q / 2
            lo2 = (d2 - err2).astype(np.float32)
            hi2 = (d2 + err2).astype(np.float32)
            ok2 = lo2 == hi2
            out[bad[ok2]] = hi2[ok2]
            bad = bad[~ok2]
        for i in bad:  # the exact path: rare
            self.stats["exact"] += 1
            out[i] = _exact(xb[i], self.c32[j[i]], self.metric)
        return out

    # -- the nearest two --------------------------------------------------------------------

    def nearest(
        self, x: np.ndarray, cand: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster int32, distance float32, second-nearest distance float32) per row.

        `cand` [n, >= min(2, k)]: a backend's best candidates of each row; `ok` [n]: its first
        two are certified (see the module docstring). Other rows are searched again here.
        """
        x = np.asarray(x)
        n = len(x)
        self.stats["rows"] += n
        cluster = np.zeros(n, np.int32)
        dist = np.empty(n, np.float32)
        second = np.full(n, np.inf, np.float32)
        if n == 0:
            return cluster, dist, second
        if self.k == 1:
            dist[:] = self.distances(x, np.arange(n), np.zeros(n, np.int64))
            return cluster, dist, second
        good = np.nonzero(ok)[0]
        if len(good):
            c0 = cand[good, 0].astype(np.int64)
            c1 = cand[good, 1].astype(np.int64)
            dd = self.distances(x, good, np.stack([c0, c1], 1))
            d0, d1 = dd[:, 0], dd[:, 1]
            swap = (d1 < d0) | ((d1 == d0) & (c1 < c0))
            cluster[good] = np.where(swap, c1, c0)
            dist[good] = np.where(swap, d1, d0)
            second[good] = np.where(swap, d0, d1)
        bad = np.nonzero(~np.asarray(ok, bool))[0]
        self.stats["full"] += len(bad)
        for a in range(0, len(bad), CHUNK):
            rows = bad[a : a + CHUNK]
            cl, d0, d1 = self._full(x, rows)
            cluster[rows], dist[rows], second[rows] = cl, d0, d1
        return cluster, dist, second

    def _full(self, x: np.ndarray, rows: np.ndarray):
        """Every prototype in float64 for some rows, then the exact choice inside the window
        of float64 error (and a float32 step) around each row's second-nearest value."""
        xb = np.asarray(x[rows], np.float64)
        s = xb @ self.c64.T
        xx = np.einsum("ij,ij->i", xb, xb)
        if self.metric == "cosine":
            nx = np.sqrt(xx)
            with np.errstate(invalid="ignore", divide="ignore"):
                approx = 1.0 - s / (nx[:, None] * self.cn[None, :])
            approx = np.where(np.isfinite(approx), approx, 1.0)
            err = np.full(len(rows), (4 * self.d + 16) * U)
        else:
            q = np.maximum(xx[:, None] - 2 * s + (self.cn**2)[None, :], 0.0)
            approx = np.sqrt(q)
            nx = np.sqrt(xx)
            err = np.sqrt(2 * (self.d + 4) * U * (nx + self.cmax) ** 2)
        a2 = np.partition(approx, 1, axis=1)[:, 1]
        step = np.spacing(np.abs(a2).astype(np.float32)).astype(np.float64)
        window = a2 + 2 * err + 4 * step + 1e-300
        rr, jj = np.nonzero(approx <= window[:, None])
        dd = self.distances(xb, rr, jj)  # xb rows are float64 copies of float32: exact
        order = np.lexsort((jj, dd, rr))  # by row, then distance, then prototype index
        rr, jj, dd = rr[order], jj[order], dd[order]
        first = np.searchsorted(rr, np.arange(len(rows)))
        return jj[first].astype(np.int32), dd[first], dd[first + 1]


def _exact(xr: np.ndarray, cr: np.ndarray, metric: str) -> np.float32:
    """D of one pair in exact decimal arithmetic, correctly rounded to float32."""
    with localcontext() as ctx:
        ctx.prec = _PREC
        xs = [Decimal(float(v)) for v in xr]
        cs = [Decimal(float(v)) for v in cr]
        if metric == "l2":
            value = sum(((a - b) * (a - b) for a, b in zip(xs, cs)), Decimal(0)).sqrt()
        else:
            xx = sum((a * a for a in xs), Decimal(0))
            cc = sum((b * b for b in cs), Decimal(0))
            if xx == 0 or cc == 0:
                return np.float32(1.0)
            dot = sum((a * b for a, b in zip(xs, cs)), Decimal(0))
            value = 1 - dot / (xx * cc).sqrt()
        return _round_f32(value)


def _round_f32(value: Decimal) -> np.float32:
    """The float32 nearest to a decimal value (ties to the even significand)."""
    f = np.float32(float(value))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        err = abs(Decimal(float(c)) - value)
        even = int(np.array(c, np.float32).view(np.uint32)) % 2 == 0
        key = (err, not even)
        if best is None or key < best[0]:
            best = (key, c)
    return np.float32(best[1])
