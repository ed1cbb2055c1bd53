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

A search backend hands over, per row, its best candidates and a level of certainty:

* 2, *certified*: the first two are the true two nearest, with a gap to every other prototype
  wider than its own error plus a float32 step (so no float32 tie can reorder them);
  `nearest` orders the two by D;
* 1, *closed*: the true two nearest are among the candidates (the second candidate beats every
  prototype outside the list by that gap), but the candidates may tie among themselves;
  `nearest` evaluates D for every candidate and takes the two smallest (D, index);
* 0: the row is searched again over every prototype in float64 (on the search's CUDA device
  when it has one: a float64 GEMM there, against minutes of CPU time at k = 50,000), and the
  exact decision is made among all prototypes within the float64 error window of its second.

A boolean array reads as levels 2 (True) and 0 (False).
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import numpy as np

from scoring.kernels.devices import count

U = 2.0**-53  # float64 unit roundoff
CHUNK = 256  # rows per float64 pass (float64 temporaries stay in the L2 cache)
CHUNK_VALUES = 1 << 16  # ... or more rows, up to this many float64 values (512 KB) a pass
DEVICE_CELLS = 1 << 27  # rows x prototypes per float64 pass on a CUDA device (1 GiB a matrix)
_PREC = 360  # decimal digits of the exact path: every float32 product and sum exactly


class Canonical:
    """The definition above for one set of prototypes (float32 [k, d])."""

    def __init__(self, centroids: np.ndarray, metric: str, device: str | None = None):
        """`device`: a torch device (the search's CUDA device) for the float64 full search of
        level-0 rows; None: numpy on the CPU. Every D is still evaluated and rounded on the
        CPU, by one code path."""
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
        self.stats = {"rows": 0, "closed": 0, "full": 0, "second_formula": 0, "exact": 0}
        self.device = device
        self._dev: tuple | None = None  # (c64, cn) on the device, made at the first use

    # -- distances --------------------------------------------------------------------------

    def distances(self, x: np.ndarray, rows: np.ndarray, js: np.ndarray) -> np.ndarray:
        """D(x[rows[i]], c[js[i, t]]) for every row i and column t (float32, js's shape; a 1-d
        js is one prototype per row). Each row is read and its norm taken once."""
        js = np.asarray(js)
        flat = js.ndim == 1
        js = js.reshape(len(rows), -1)
        out = np.empty(js.shape, np.float32)
        step = max(CHUNK, CHUNK_VALUES // max(1, self.d))  # fewer Python steps at small d
        for a in range(0, len(rows), step):
            xb = np.asarray(x[rows[a : a + step]], np.float64)
            nx = None
            if self.metric == "cosine":
                xx = np.einsum("ij,ij->i", xb, xb)
                nx = np.sqrt(xx)
            for t in range(js.shape[1]):
                out[a : a + step, t] = self._column(xb, nx, js[a : a + step, t])
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
            count(self.stats, second_formula=len(bad))
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
            count(self.stats, exact=1)
            out[i] = _exact(xb[i], self.c32[j[i]], self.metric)
        return out

    # -- the nearest two --------------------------------------------------------------------

    def nearest(
        self, x: np.ndarray, cand: np.ndarray, level: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster int32, distance float32, second-nearest distance float32) per row.

        `cand` [n, >= min(2, k)]: a backend's best candidates of each row, first two first;
        `level` [n]: 2 certified, 1 closed, 0 neither (see the module docstring; bool: 2/0).
        """
        x = np.asarray(x)
        n = len(x)
        count(self.stats, rows=n)
        cluster = np.zeros(n, np.int32)
        dist = np.empty(n, np.float32)
        second = np.full(n, np.inf, np.float32)
        if n == 0:
            return cluster, dist, second
        if self.k == 1:
            dist[:] = self.distances(x, np.arange(n), np.zeros(n, np.int64))
            return cluster, dist, second
        level = np.asarray(level)
        if level.dtype == bool:
            level = np.where(level, 2, 0)
        for rows, width in ((np.nonzero(level >= 2)[0], 2), (np.nonzero(level == 1)[0], None)):
            if not len(rows):
                continue
            js = cand[rows, :width].astype(np.int64)
            dd = self.distances(x, rows, js)
            order = np.lexsort((js, dd))  # per row: by distance, then prototype index
            j2 = np.take_along_axis(js, order[:, :2], 1)
            d2 = np.take_along_axis(dd, order[:, :2], 1)
            cluster[rows], dist[rows], second[rows] = j2[:, 0], d2[:, 0], d2[:, 1]
        count(self.stats, closed=int((level == 1).sum()))
        bad = np.nonzero(level <= 0)[0]
        count(self.stats, full=len(bad))
        step = CHUNK if self.device is None else max(CHUNK, DEVICE_CELLS // self.k)
        for a in range(0, len(bad), step):
            rows = bad[a : a + step]
            cl, d0, d1 = self._full(x, rows)
            cluster[rows], dist[rows], second[rows] = cl, d0, d1
        return cluster, dist, second

    def _full(self, x: np.ndarray, rows: np.ndarray):
        """Every prototype in float64 for some rows, then the exact choice inside the window
        of float64 error (and a float32 step) around each row's second-nearest value."""
        xb = np.asarray(x[rows], np.float64)
        if self.device is not None:
            rr, jj = self._window_device(xb)
        else:
            rr, jj = self._window(xb)
        dd = self.distances(xb, rr, jj)  # xb rows are float64 copies of float32: exact
        order = np.lexsort((jj, dd, rr))  # by row, then distance, then prototype index
        rr, jj, dd = rr[order], jj[order], dd[order]
        first = np.searchsorted(rr, np.arange(len(rows)))
        return jj[first].astype(np.int32), dd[first], dd[first + 1]

    def _window(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, prototype) pairs whose float64 D lies within the error window of the row's
        second-smallest float64 D (numpy, on the CPU)."""
        s = xb @ self.c64.T
        xx = np.einsum("ij,ij->i", xb, xb)
        nx = np.sqrt(xx)
        if self.metric == "cosine":
            with np.errstate(invalid="ignore", divide="ignore"):
                approx = 1.0 - s / (nx[:, None] * self.cn[None, :])
            approx = np.where(np.isfinite(approx), approx, 1.0)
            err = np.full(len(xb), (4 * self.d + 16) * U)
        else:
            approx = np.sqrt(np.maximum(xx[:, None] - 2 * s + (self.cn**2)[None, :], 0.0))
            err = np.sqrt(2 * (self.d + 4) * U * (nx + self.cmax) ** 2)
        a2 = np.partition(approx, 1, axis=1)[:, 1]
        return np.nonzero(approx <= _window_edge(a2, err)[:, None])

    def _window_device(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`_window` as a float64 GEMM on the CUDA device (IEEE float64 there too, so the same
        error bound holds); only the pairs come back."""
        import torch

        if self._dev is None:
            c64 = torch.from_numpy(self.c64).to(self.device)
            self._dev = (c64, torch.from_numpy(self.cn).to(self.device))
        c64, cn = self._dev
        xt = torch.from_numpy(xb).to(self.device)
        s = xt @ c64.T
        xx = (xt * xt).sum(1)
        nx = xx.sqrt()
        if self.metric == "cosine":
            approx = 1.0 - s / (nx[:, None] * cn[None, :])
            approx = torch.where(torch.isfinite(approx), approx, torch.ones_like(approx))
            err = np.full(len(xb), (4 * self.d + 16) * U)
        else:
            approx = (xx[:, None] - 2 * s + (cn * cn)[None, :]).clamp_min(0).sqrt()
            err = np.sqrt(2 * (self.d + 4) * U * (nx.cpu().numpy() + self.cmax) ** 2)
        del s
        a2 = approx.topk(2, dim=1, largest=False).values[:, 1].cpu().numpy()
        edge = torch.from_numpy(_window_edge(a2, err)).to(self.device)
        rr, jj = torch.nonzero(approx <= edge[:, None], as_tuple=True)
        return rr.cpu().numpy(), jj.cpu().numpy()


def _window_edge(a2: np.ndarray, err: np.ndarray) -> np.ndarray:
    """The largest float64 D that may still round to a row's second-nearest float32 value:
    its second-smallest float64 D plus twice the error bound and four float32 steps."""
    step = np.spacing(np.abs(a2).astype(np.float32)).astype(np.float64)
    return a2 + 2 * err + 4 * step + 1e-300


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
