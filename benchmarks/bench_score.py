"""Score-stage throughput: protoprune's Ray ShardWorker path against a bare faiss baseline.

    python benchmarks/bench_score.py                       # 1M x 384, k = 1000
    python benchmarks/bench_score.py --rows 100000 --dim 64 --k 100

Generates clustered float32 embeddings as Parquet on local disk, fits k prototypes with
scoring.kernels.kmeans.fit_kmeans, then in the same process and the same run measures
  (a) the baseline: pyarrow read + L2-normalise + faiss IndexFlatIP top-1 search, one process;
  (b) protoprune's score stage exactly as the driver runs it (ray_jobs.driver.Run.score:
      ShardWorker actors reading shards, searching, writing score files and markers),
and prints rows/s of both, their ratio and the effective GFLOP/s (2·N·k·d / seconds).

`--strategy` (repeatable; default: hard and auto) names the strategies whose score stage is
measured against the one baseline: `hard` is issue 16's configuration (the stage writes score
files only); `auto`, the default strategy, deduplicates, so its score stage also writes each
shard's cluster-sorted embeddings (what the dedup ranges read).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scoring.commit import save_centroids  # noqa: E402
from scoring.config import RunConfig  # noqa: E402
from scoring.inputs.parquet import embedding_matrix  # noqa: E402
from scoring.kernels.devices import normalize  # noqa: E402
from scoring.kernels.kmeans import fit_kmeans  # noqa: E402


def generate(data_dir: str, rows: int, dim: int, files: int, blobs: int, seed: int) -> None:
    """Clustered unit-ish vectors in `files` Parquet files (id int64, embedding fixed list)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(blobs, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    os.makedirs(data_dir, exist_ok=True)
    for f in range(files):
        a, b = int(bounds[f]), int(bounds[f + 1])
        lab = rng.integers(0, blobs, size=b - a)
        x = centers[lab] + rng.normal(scale=0.05, size=(b - a, dim)).astype(np.float32)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim)
        t = pa.table({"id": np.arange(a, b, dtype=np.int64), "embedding": emb})
        pq.write_table(t, os.path.join(data_dir, f"part-{f:05d}.parquet"), row_group_size=50_000)


def baseline(data_dir: str, centroids: np.ndarray) -> tuple[int, float]:
    """pyarrow read + normalise + faiss IndexFlatIP top-1 over all files, in this process."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    t0 = time.perf_counter()
    n = 0
    for name in sorted(os.listdir(data_dir)):
        t = pq.read_table(os.path.join(data_dir, name), columns=["id", "embedding"])
        x = normalize(embedding_matrix(t["embedding"], name, "embedding"))
        _, idx = index.search(x, 1)
        n += len(idx)
    return n, time.perf_counter() - t0


def protoprune_score(cfg: RunConfig, centroids: np.ndarray) -> tuple[int, float]:
    """The driver's score stage (Ray ShardWorker actors) on a fresh run folder."""
    from ray_jobs.driver import Run
    from ray_jobs.scheduler import ensure_ray

    r = Run(cfg, quiet=True)
    r.plan()
    import ray

    if not ray.is_initialized():  # a private temp dir: never share another process's Ray
        ray.init(
            include_dashboard=False,
            _temp_dir=tempfile.mkdtemp(prefix="pp-bench-ray-"),
            logging_level=logging.WARNING,
        )
    ensure_ray(None)
    sha = save_centroids(r.store, centroids, {"bench": True})
    t0 = time.perf_counter()
    r.score(centroids, sha)
    return r.n_rows, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--files", type=int, default=4, help="Parquet files (= shards)")
    p.add_argument("--sample-size", type=int, default=None, help="k-means sample (64 x k)")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--workers", type=int, default=None, help="score actors (one per CPU)")
    p.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed)")
    p.add_argument(
        "--strategy", action="append", default=None, help="strategies to measure (hard, auto)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    work = args.dir or tempfile.mkdtemp(prefix="pp-bench-")
    data_dir, out_dir = os.path.join(work, "data"), os.path.join(work, "runs")
    try:
        t0 = time.perf_counter()
        generate(data_dir, args.rows, args.dim, args.files, blobs=2 * args.k, seed=0)
        print(
            f"data: {args.rows} x {args.dim} float32 in {args.files} files "
            f"({time.perf_counter() - t0:.1f}s)"
        )

        sample = min(args.rows, args.sample_size or 64 * args.k)
        rng = np.random.default_rng(1)
        rows = np.sort(rng.choice(args.rows, size=sample, replace=False))
        full = pa.concat_tables(
            pq.read_table(os.path.join(data_dir, f)) for f in sorted(os.listdir(data_dir))
        )
        xs = embedding_matrix(full["embedding"].take(pa.array(rows)), "sample", "embedding")
        del full
        t0 = time.perf_counter()
        centroids, _, stats = fit_kmeans(xs, args.k, args.kmeans_iters, "cosine", 0)
        print(
            f"prototypes: k={args.k} on {sample} rows, {stats['iterations']} iterations "
            f"({time.perf_counter() - t0:.1f}s)"
        )

        flops = 2.0 * args.rows * args.k * args.dim
        n_b, s_b = baseline(data_dir, centroids)
        assert n_b == args.rows, (n_b, args.rows)
        rb = n_b / s_b
        print(
            f"baseline  (pyarrow + faiss IndexFlatIP top-1, 1 process): {rb:12,.0f} rows/s "
            f"{s_b:7.2f}s  {flops / s_b / 1e9:6.1f} GFLOP/s"
        )
        for strategy in args.strategy or ["hard", "auto"]:
            cfg = RunConfig(
                input=data_dir,
                output=out_dir,
                run_id=f"bench-{strategy}",
                k=args.k,
                shard_rows=max(1, args.rows // args.files),
                workers=args.workers,
                strategy=strategy,
                quiet=True,
            )
            n_p, s_p = protoprune_score(cfg, centroids)
            assert n_p == args.rows, (n_p, args.rows)
            rp = n_p / s_p
            saved = " + embeddings" if cfg.effective_dedup_eps is not None else ""
            label = f"protoprune score stage, {strategy} (scores{saved}):"
            print(
                f"{label:<58}{rp:12,.0f} rows/s "
                f"{s_p:7.2f}s  {flops / s_p / 1e9:6.1f} GFLOP/s   ratio {rp / rb:.2f}"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
