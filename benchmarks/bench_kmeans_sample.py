"""Quality of the k-means sample rule: inertia on all N rows of prototypes fitted on a sample
(uniform rows, and the row-group sample protoprune draws), against a fit on the full data.

The data are N clustered rows in shards of 100,000 rows with 10,000-row row groups, in two
layouts: shuffled (row order independent of cluster) and sorted by latent cluster (the worst
case for sampling whole row groups: each group holds few clusters). The row-group sample uses
the pipeline's own functions (sample_counts, sample_groups).

    python benchmarks/bench_kmeans_sample.py             # N = 1M, d = 64, k = 1000
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from _common import header, loadavg

from scoring.kernels.assign import FaissSearch
from scoring.kernels.devices import normalize
from scoring.kernels.kmeans import fit_kmeans
from scoring.kernels.sampling import sample_counts, sample_groups


def mean_distance(x: np.ndarray, c: np.ndarray) -> float:
    """Mean cosine distance of every row to its nearest prototype (the inertia we report)."""
    _, d, _ = FaissSearch(c, "cosine").search(x)
    return float(d.mean())


def rowgroup_sample(n: int, shard_rows: int, group_rows: int, size: int, seed: int):
    shards = [min(shard_rows, n - a) for a in range(0, n, shard_rows)]
    counts = sample_counts(shards, size)
    out = []
    groups_read = 0
    for i, (rows, cnt) in enumerate(zip(shards, counts)):
        g = [min(group_rows, rows - a) for a in range(0, rows, group_rows)]
        picked, pos = sample_groups(g, int(cnt), seed, i)
        groups_read += len(picked)
        starts = np.cumsum([0] + g)[:-1]
        glob = np.concatenate([np.arange(starts[p], starts[p] + g[p]) for p in picked])
        out.append(i * shard_rows + glob[pos])
    total_groups = sum((r + group_rows - 1) // group_rows for r in shards)
    return np.concatenate(out), groups_read / total_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--per-centroid", default="39,64,256", help="sample sizes as multiples of k")
    args = ap.parse_args()
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
                    idx, frac = rowgroup_sample(args.rows, 100_000, 10_000, size, 0)
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
