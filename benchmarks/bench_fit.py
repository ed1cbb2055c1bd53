"""The k-means fit alone: faiss fp32 against the torch bf16 Lloyd iterations, same sample, same
iterations (no early stop), in one process.

Prints, for each backend, the fit time over `--seeds` seeds, the objective each fit reports
and the objective of its final centroids evaluated here independently (cosine: the sum over the
sample of the largest similarity to a centroid, exact fp32 search; higher is better), the
effective GFLOP/s of the assignment products (2·n·k·d per iteration), and the ratios against
faiss (the baseline, run first in the same invocation). faiss's spread over seeds is the yard
stick for the objective: the torch fit should be within it.

    python benchmarks/bench_fit.py                    # 256,000 x 384, k = 1000, 20 iterations
    python benchmarks/bench_fit.py --rows 20000 --dim 32 --k 50 --iters 5 --seeds 2
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from _common import clustered_chunk, gemm_peak_fp32, gemm_peak_torch, header, loadavg

from scoring.kernels.devices import normalize
from scoring.kernels.kmeans import choose_backend, fit_kmeans


def objective(x: np.ndarray, c: np.ndarray, chunk: int = 16384) -> float:
    """Sum over the rows of the largest similarity to a centroid (fp32 products, float64 sum):
    the spherical k-means objective of the centroids, whichever backend fitted them."""
    total = 0.0
    for a in range(0, len(x), chunk):
        total += float((x[a : a + chunk] @ c.T).max(1).astype(np.float64).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=4, help="fits per backend (seeds 0..S-1)")
    ap.add_argument("--clusters", type=int, default=2000, help="latent clusters of the data")
    ap.add_argument("--noise", type=float, default=0.6)
    ap.add_argument(
        "--torch-fp32",
        action="store_true",
        help="also the torch Lloyd iterations with fp32 products (what a CPU without AMX runs)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import faiss
    import torch

    header(
        f"bench_fit: {args.rows:,} x {args.dim}, k = {args.k}, {args.iters} iterations, "
        f"cosine, {args.seeds} seeds"
    )
    print(
        f"# threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}; "
        f"auto here = {choose_backend('auto')}"
    )
    print(
        f"# GEMM peaks here now: fp32 (numpy) {gemm_peak_fp32():.0f}, torch fp32 "
        f"{gemm_peak_torch('fp32'):.0f}, torch bf16 {gemm_peak_torch('bf16'):.0f} GFLOP/s"
    )
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    x = normalize(clustered_chunk(rng, centers, args.rows, args.noise))
    flop = 2.0 * args.rows * args.k * args.dim * args.iters
    res: dict[str, list[tuple[float, float, float, int]]] = {}
    # the torch products forced to bf16 (CUDA and AMX CPUs) and, on request, fp32 (other
    # CPUs: what `auto` runs on them, devices.product_precision)
    runs = ["faiss", "torch"] + (["torch-fp32"] if args.torch_fp32 else [])
    for be in runs:  # faiss first: the baseline
        res[be] = []
        precision = {"torch": "bf16", "torch-fp32": "fp32"}.get(be)
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            c, reported, st = fit_kmeans(
                x, args.k, args.iters, "cosine", seed, backend=be.split("-")[0],
                precision=precision,
            )  # fmt: skip
            secs = time.perf_counter() - t0
            assert st["backend"] == be.split("-")[0] and st["iterations"] == args.iters, st
            res[be].append((secs, reported, objective(x, c), st["iterations"]))
            print(
                f"{be:5s} seed {seed}: {secs:7.2f} s ({flop / secs / 1e9:5.0f} GFLOP/s), "
                f"objective reported {reported:,.1f}, evaluated {res[be][-1][2]:,.1f} "
                f"[{st['precision']}, load {loadavg():.1f}]",
                flush=True,
            )
    f_t = np.array([r[0] for r in res["faiss"]])
    t_t = np.array([r[0] for r in res["torch"]])
    f_o = np.array([r[2] for r in res["faiss"]])
    t_o = np.array([r[2] for r in res["torch"]])
    print()
    print("| backend | median fit s | GFLOP/s | objective min..max (evaluated) | mean |")
    print("|---|---|---|---|---|")
    rows = [("faiss fp32", f_t, f_o), ("torch bf16", t_t, t_o)]
    if args.torch_fp32:
        rows.append(
            (
                "torch fp32",
                np.array([r[0] for r in res["torch-fp32"]]),
                np.array([r[2] for r in res["torch-fp32"]]),
            )
        )
    for name, tt, oo in rows:
        med = float(np.median(tt))
        print(
            f"| {name} | {med:.2f} | {flop / med / 1e9:.0f} | "
            f"{oo.min():,.1f}..{oo.max():,.1f} | {oo.mean():,.1f} |"
        )
    spread = f_o.max() - f_o.min()
    print(f"faiss seed spread: {spread:,.1f} ({spread / f_o.mean():.3%} of its mean)")
    print(
        f"torch mean - faiss mean: {t_o.mean() - f_o.mean():+,.1f} "
        f"({(t_o.mean() - f_o.mean()) / f_o.mean():+.3%}; higher is better); "
        f"torch min >= faiss min - spread: {bool(t_o.min() >= f_o.min() - spread)}"
    )
    for name, tt, _ in rows[1:]:
        print(f"fit speed-up {name} / faiss fp32 (median): {np.median(f_t) / np.median(tt):.2f}x")
    print(f"# load average at end {loadavg():.1f}")


if __name__ == "__main__":
    main()
