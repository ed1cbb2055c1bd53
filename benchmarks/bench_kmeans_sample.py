"""Quality of the k-means sample rule: inertia on all N rows of prototypes fitted on a sample
(uniform rows, and the row-group sample protoprune draws), against a fit on the full data.

The data are N clustered rows in 10,000-row row groups, in two layouts: shuffled (row order
independent of cluster) and sorted by latent cluster (the worst case for sampling whole row
groups: each group holds few clusters). The row-group sample uses the pipeline's own functions
(sample_plan, unit_rows); it depends on the row groups only, never on the shards.

    python benchmarks/bench_kmeans_sample.py             # N = 1M, d = 64, k = 1000
    python benchmarks/bench_kmeans_sample.py --quick     # N = 50,000, d = 32, k = 50
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from _common import header, loadavg

from scoring.kernels.assign import NearestPrototype
from scoring.kernels.devices import normalize
from scoring.kernels.kmeans import fit_kmeans
from scoring.kernels.sampling import sample_plan, unit_rows


def mean_distance(x: np.ndarray, c: np.ndarray) -> float:
    """Mean cosine distance of every row to its nearest prototype (the inertia we report)."""
    _, d, _ = NearestPrototype(c, "cosine").search(x)
    return float(d.mean())


def rowgroup_sample(n: int, group_rows: int, size: int, seed: int):
    """The rows protoprune's sample rule draws from N rows in row groups of `group_rows` (the
    rule never sees the shards), and the share of row groups it reads."""
    units = [min(group_rows, n - a) for a in range(0, n, group_rows)]
    counts = sample_plan(units, size, seed)
    picked = np.flatnonzero(counts)
    idx = np.concatenate(
        [u * group_rows + unit_rows(units[u], int(counts[u]), seed, int(u)) for u in picked]
    )
    return idx, len(picked) / len(units)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--per-centroid", default="39,64,256", help="sample sizes as multiples of k")
    ap.add_argument("--group-rows", type=int, default=10_000, help="rows per row group")
    ap.add_argument("--quick", action="store_true", help="small scale: 50,000 x 32, k = 50")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.dim, args.k, args.group_rows = 50_000, 32, 50, 1_000
    logging.basicConfig(level=logging.WARNING)
    header(f"bench_kmeans_sample: {args.rows:,} x {args.dim}, k = {args.k}")
    rng = np.random.default_rng(0)
    latent = 4 * args.k
    centers = rng.standard_normal((latent, args.dim), dtype=np.float32)
    lab = rng.integers(0, latent, args.rows)
    x = normalize(centers[lab] + 0.6 * rng.standard_normal((args.rows, args.dim), dtype=np.float32))
    t0 = time.perf_counter()
    c_full, _, _ = fit_kmeans(x, args.k, args.iters, "cosine", 0)
    full = mean_distance(x, c_full)
    print(f"full-data fit ({time.perf_counter() - t0:.0f}s): mean distance {full:.5f}")
    print("| layout | sample | rows/centroid | row groups read | mean distance | vs full fit |")
    print("|---|---|---|---|---|---|")
    for layout in ("shuffled", "sorted"):
        xl = x if layout == "shuffled" else x[np.argsort(lab, kind="stable")]
        for m in [int(v) for v in args.per_centroid.split(",")]:
            size = m * args.k
            for kind in ("uniform", "row groups"):
                if kind == "uniform":
                    idx = np.sort(rng.choice(args.rows, size=size, replace=False))
                    frac = 1.0
                else:
                    idx, frac = rowgroup_sample(args.rows, args.group_rows, size, 0)
                c, _, _ = fit_kmeans(xl[idx], args.k, args.iters, "cosine", 0)
                md = mean_distance(xl, c)
                print(
                    f"| {layout} | {kind} {size:,} | {m} | {frac:.0%} | {md:.5f} | "
                    f"{md / full - 1:+.2%} |",
                    flush=True,
                )
    print(f"load average at end: {loadavg():.1f}")


if __name__ == "__main__":
    main()
