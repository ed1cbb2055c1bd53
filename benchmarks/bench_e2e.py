"""Score stage end to end (plan, sample + k-means, score, reduce to a keep list) on N x d
precomputed embeddings, from Parquet on local disk and from a local S3 server, against a bare
script doing the same work in one process: pyarrow read, faiss k-means on a sample of the same
size, IndexFlatIP search, argpartition. Prints throughputs, the ratio protoprune / bare, and the
search's effective GFLOP/s against the measured GEMM peaks.

    python benchmarks/bench_e2e.py                      # the headline, local + S3
    python benchmarks/bench_e2e.py --rows 200000 --where local

The headline (issue 16): 1M x 384 float32 rows in 8 Parquet files, k = 1000, a 256,000-row
k-means sample, 20 iterations, `hard`, keep 0.5; the bare script runs the same iterations on
the same sample size. protoprune's time is what a user waits for: `run()` starts its own
embedded Ray (overlapping the plan), counted in its total; `--ray-start excluded` joins a Ray
started beforehand instead (the older figures). The stage profile is the manifest's
timings_seconds. Set PP_BENCH_DIR to put the generated data elsewhere than the temp dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time

import numpy as np
from _common import (
    LocalS3,
    TreeMemory,
    bench_dir,
    blas_kernels,
    gemm_peak_fp32,
    gemm_peak_torch,
    header,
    init_ray,
    loadavg,
    shutdown_ray,
    write_embeddings,
)


def bare(paths: list[str], fs, k: int, sample: int, iters: int, keep: float, seed: int):
    """The baseline: everything in one process, no sharding, no commits."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = {}
    t0 = time.perf_counter()
    tables = [pq.read_table(p, filesystem=fs, columns=["id", "embedding"]) for p in paths]
    table = pa.concat_tables(tables)
    emb = table["embedding"].combine_chunks()
    d = emb.type.list_size
    x = emb.flatten().to_numpy().reshape(-1, d)
    ids = table["id"].to_numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = np.ascontiguousarray(x, np.float32)
    t["read"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    rng = np.random.default_rng(seed)
    s = x[np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))]
    km = faiss.Kmeans(
        d,
        k,
        niter=iters,
        seed=seed,
        spherical=True,
        max_points_per_centroid=(len(s) + k - 1) // k + 1,
        min_points_per_centroid=1,
        early_stop_threshold=-1.0,
    )
    km.train(s)
    t["kmeans"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    index = faiss.IndexFlatIP(d)
    index.add(km.centroids)
    sims, _ = index.search(x, 1)
    t["search"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    dist = 1.0 - sims[:, 0]
    n_keep = int(keep * len(x))
    kept = ids[np.argpartition(-dist, n_keep - 1)[:n_keep]]
    t["select"] = time.perf_counter() - t3
    t["total"] = time.perf_counter() - t0
    assert len(kept) == n_keep
    return t


def _bare_child(queue, *args) -> None:
    queue.put(bare(*args))


def bare_in_child(*args) -> dict[str, float]:
    """`bare(*args)` in a fresh process (spawned: none of this process's memory): so the
    bare script's peak memory is its own, and protoprune's, measured after it in this
    process, is not inflated by the bare script's freed-but-kept heap (~4 GiB here)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_bare_child, args=(queue, *args))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def protoprune(inp: str, out: str, k: int, sample: int, iters: int, keep: float, run_id: str):
    from ray_jobs.driver import run
    from scoring.config import RunConfig

    cfg = RunConfig(
        input=inp,
        output=out,
        run_id=run_id,
        k=k,
        sample_size=sample,
        kmeans_iters=iters,
        keep_fraction=keep,
        strategy="hard",
        quiet=True,
    )
    t0 = time.perf_counter()
    doc = run(cfg, quiet=True)
    total = time.perf_counter() - t0
    t = dict(doc["timings_seconds"])
    t["total"] = total
    assert doc["rows_kept"] == int(keep * doc["rows_in"])
    return t


def fmt(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "peak_pss_gib")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=256_000, help="k-means sample (both sides)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument(
        "--ray-start",
        choices=["counted", "excluded"],
        default="counted",
        help="counted: each protoprune run starts its own Ray, as the CLI does",
    )
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--where", choices=["local", "s3", "both"], default="both")
    ap.add_argument(
        "--backends",
        default="auto",
        help="comma list of search backends to run protoprune with (auto, faiss, torch)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    header(f"bench_e2e: {args.rows:,} x {args.dim}, k = {args.k}, sample {args.sample:,}")
    data = bench_dir(f"e2e-{args.rows}-{args.dim}")
    t0 = time.perf_counter()
    paths = write_embeddings(data, args.rows, args.dim, files=args.files)
    print(f"data: {data} ({time.perf_counter() - t0:.0f}s to prepare)")
    p32 = gemm_peak_fp32()
    pbf = gemm_peak_torch("bf16")
    print(f"GEMM peak: fp32 (numpy's BLAS) {p32:.0f} GFLOP/s, bf16 (torch) {pbf:.0f} GFLOP/s")
    print(f"OpenBLAS kernels (faiss's own included): {blas_kernels()}")
    flops = 2.0 * args.rows * args.k * args.dim
    counted = args.ray_start == "counted"
    tmp = None
    if not counted:
        t0 = time.perf_counter()
        tmp = init_ray()
        print(f"ray.init: {time.perf_counter() - t0:.1f}s (excluded below)")
    s3 = None
    rows = []
    try:
        wheres = ["local", "s3"] if args.where == "both" else [args.where]
        for where in wheres:
            if where == "local":
                inp, fs = data, None
                out = bench_dir("e2e-runs")
            else:
                if s3 is None:
                    if tmp:
                        shutdown_ray(tmp)  # workers must start after the S3 environment is set
                    s3 = LocalS3()
                    tmp = None if counted else init_ray()
                bucket = s3.new_bucket()
                inp = s3.upload(paths, bucket, "data")
                out = f"s3://{bucket}/runs"
                import s3fs

                fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
            bpaths = (
                paths if where == "local" else [f"{inp[5:]}/{os.path.basename(p)}" for p in paths]
            )
            with TreeMemory() as mb:
                tb = bare_in_child(bpaths, fs, args.k, args.sample, args.iters, args.keep, 0)
            tb["peak_pss_gib"] = mb.peak_pss / 2**30
            print(
                f"[{where}] bare:       total {tb['total']:.1f}s ({fmt(tb)}); "
                f"peak tree PSS {tb['peak_pss_gib']:.2f} GiB"
            )
            for backend in args.backends.split(","):
                os.environ["PROTOPRUNE_SEARCH_BACKEND"] = backend
                run_id = f"{where}-{backend}-{time.time_ns()}"
                with TreeMemory() as mp:
                    tp = protoprune(inp, out, args.k, args.sample, args.iters, args.keep, run_id)
                tp["peak_pss_gib"] = mp.peak_pss / 2**30
                if counted:
                    import ray

                    ray.shutdown()
                ratio = tb["total"] / tp["total"]
                print(
                    f"[{where}] protoprune ({backend}): total {tp['total']:.1f}s ({fmt(tp)}); "
                    f"throughput {args.rows / tp['total']:,.0f} rows/s vs bare "
                    f"{args.rows / tb['total']:,.0f} rows/s: ratio {ratio:.2f}x"
                )
                rows.append((where, backend, tb, tp, ratio))
                if where == "local":
                    shutil.rmtree(os.path.join(out, run_id), ignore_errors=True)
    finally:
        if tmp:
            shutdown_ray(tmp)
        os.environ.pop("PROTOPRUNE_SEARCH_BACKEND", None)
        if s3 is not None:
            s3.stop()
    print()
    print(
        "| input | search backend | bare s | protoprune s | ratio | score-stage GFLOP/s "
        "| peak tree PSS GiB, bare / protoprune |"
    )
    print("|---|---|---|---|---|---|---|")
    for where, backend, tb, tp, ratio in rows:
        print(
            f"| {where} | {backend} | {tb['total']:.1f} | {tp['total']:.1f} | {ratio:.2f}x | "
            f"{flops / tp['score'] / 1e9:.0f} | {tb['peak_pss_gib']:.2f} / "
            f"{tp['peak_pss_gib']:.2f} |"
        )
    if rows:
        tb, tp = rows[0][2], rows[0][3]
        fit = tp.get("fit")
        if fit:
            kf = 2.0 * args.sample * args.k * args.dim * args.iters
            print(
                f"k-means: protoprune fit {kf / fit / 1e9:.0f} GFLOP/s, bare faiss "
                f"{kf / tb['kmeans'] / 1e9:.0f} GFLOP/s (ratio {tb['kmeans'] / fit:.2f}x)"
            )
        print(
            f"bare IndexFlatIP search: {flops / tb['search'] / 1e9:.0f} GFLOP/s "
            f"({flops / tb['search'] / 1e9 / p32:.0%} of the fp32 peak); "
            f"score stage GFLOP/s counts the whole stage (read, normalise, search, write)"
        )
    print(f"load average at end: {loadavg():.1f}")


if __name__ == "__main__":
    main()
