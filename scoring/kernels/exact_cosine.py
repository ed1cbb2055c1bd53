"""Exact cosine decisions on stored float32 vectors, for rows near the dedup threshold.

A float32 value is an integer times a power of two, so a vector x is X * 2^e with X an integer
vector (one exponent per vector). For two vectors the exponents cancel in

    cos(x, y) = X.Y / sqrt((X.X)(Y.Y)),

and for a threshold t > 0 (a double, hence a rational N/D)

    cos(x, y) >= t   <=>   X.Y >= 0  and  (X.Y)^2 D^2 >= N^2 (X.X)(Y.Y),

which Python's integers decide without rounding. Bit-identical and parallel vectors come out
at exactly 1 (Cauchy-Schwarz with equality), so `--dedup-eps 0` removes every copy. A zero
vector has similarity 0 to everything.
"""

from __future__ import annotations

from decimal import Context

import numpy as np

_CTX = Context(prec=60)


def float64_bound(d: int) -> float:
    """A safe bound on |float64 cosine of float64-normalised rows - exact cosine|, width d
    (normalisation and dot product each within ~(d + 2) units of 2^-53; 16x margin)."""
    return 16.0 * (d + 4) * 2.0**-53


def integer_vector(x: np.ndarray) -> tuple[int, ...]:
    """The integers X of a float32 vector x = X * 2^e (e shared by the vector's entries)."""
    m, e = np.frexp(np.asarray(x, np.float32).astype(np.float64))
    mant = (m * 2.0**24).astype(np.int64)  # exact: float32 has 24 mantissa bits
    nz = mant != 0
    if not nz.any():
        return tuple(0 for _ in range(len(mant)))
    shift = e - int(e[nz].min())
    return tuple(int(a) << int(s) if a else 0 for a, s in zip(mant.tolist(), shift.tolist()))


def _dot(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum(p * q for p, q in zip(a, b))


def at_least(xy: int, xx: int, yy: int, t: float) -> bool:
    """cos >= t, exactly, from the integer dot product and squared norms (t > 0)."""
    assert t > 0, t
    if xx == 0 or yy == 0 or xy < 0:
        return False
    num, den = float(t).as_integer_ratio()
    return xy * xy * den * den >= num * num * xx * yy


def cosine_value(xy: int, xx: int, yy: int) -> float:
    """The exact cosine rounded to a double (1.0 exactly for parallel vectors)."""
    if xx == 0 or yy == 0:
        return 0.0
    if xy > 0 and xy * xy == xx * yy:
        return 1.0
    v = _CTX.divide(_CTX.create_decimal(xy), _CTX.sqrt(_CTX.create_decimal(xx * yy)))
    return float(v)


def decide_near(
    rows: np.ndarray, ranks: np.ndarray, cols: np.ndarray, c0: int, s64: np.ndarray, thr: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact duplicate flags, max similarities and arg ranks of rows against earlier columns.

    rows: raw float32 [n, d] (global ranks `ranks`); cols: raw float32 [m, d] (global ranks
    c0 + j); s64: the float64 cosines [n, m] with columns not earlier already -inf. Columns
    farther than the float64 bound from thr are decided by s64; the rest exactly. Of equal
    maxima the earliest column stands.
    """
    n = len(ranks)
    dup = np.zeros(n, bool)
    best = np.full(n, -np.inf)
    arg = np.full(n, -1, np.int64)
    if n == 0 or s64.shape[1] == 0:
        return dup, best, arg
    tol = float64_bound(rows.shape[1])
    ints: dict[int, tuple[tuple[int, ...], int]] = {}  # column -> (integers, squared norm)

    def col(j: int) -> tuple[tuple[int, ...], int]:
        v = ints.get(j)
        if v is None:
            y = integer_vector(cols[j])
            v = ints[j] = (y, _dot(y, y))
        return v

    for r in range(n):
        s = s64[r]
        j = int(s.argmax())
        best[r], arg[r] = s[j], (c0 + j if np.isfinite(s[j]) else -1)
        near = np.flatnonzero(np.abs(s - thr) <= tol)
        if s[j] > thr + tol or len(near) == 0:  # decided by float64 alone
            dup[r] = bool(s[j] >= thr)
            continue
        x = integer_vector(rows[r])
        xx = _dot(x, x)
        vals = []
        for c in near.tolist():
            y, yy = col(c)
            xy = _dot(x, y)
            v = cosine_value(xy, xx, yy)
            vals.append((v, c, at_least(xy, xx, yy, thr)))
            if v == 1.0:  # the largest possible, at the earliest near column: done
                break
        v, c, ok = max(vals, key=lambda t: (t[0], -t[1]))
        dup[r] = any(ok for _, _, ok in vals)
        best[r], arg[r] = v, c0 + c
    return dup, best, arg
