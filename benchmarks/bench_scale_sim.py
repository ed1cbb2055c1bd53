"""Scale simulation: the driver planning and scheduling 100,000 shards (10^9 rows of 10,000-row
shards) from synthetic footers, with score workers that return at once (each writes its
commit marker, nothing else). Prints the driver's time per shard (wall and driver-process
CPU), run.json and manifest sizes, and the time to list the markers on resume, against a bare
baseline: a Python loop doing the same marker writes and listing without Ray.

    python benchmarks/bench_scale_sim.py                 # 100,000 shards
    python benchmarks/bench_scale_sim.py --shards 20000 --s3-markers 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

import numpy as np
from _common import LocalS3, bench_dir, header, init_ray, loadavg, shutdown_ray

from scoring import commit
from scoring.inputs.parquet import plan_from_row_groups
from scoring.stages.score import ShardSummary


class InstantWorker:
    """Stands in for ShardWorker: commits the shard's marker and returns at once."""

    def __init__(self, cfg, in_store, run_store, centroids, prototypes_sha, use_gpu=False):
        self.run_store = run_store
        self.sha = prototypes_sha

    def pid(self) -> int:
        return os.getpid()

    def score(self, shard, cached=None, prototypes=None) -> ShardSummary:
        if prototypes is not None:  # [ObjectRef of the centroids, their sha256]
            self.sha = prototypes[1]
        commit.write_marker(
            self.run_store,
            "scores",
            shard.index,
            {"rows": shard.rows, "sha256": "0" * 64, "prototypes_sha256": self.sha},
        )
        return ShardSummary(shard.index, shard.rows, 0.0, "0" * 64)


def synthetic_manifest(n_shards: int, k: int) -> dict:
    """A _MANIFEST.json shaped like the reducer's for a global rule: one keep part per shard."""
    return {
        "format_version": commit.FORMAT_VERSION,
        "strategy": "hard",
        "k": k,
        "rows_in": n_shards * 10_000,
        "clusters": {
            "rows": [20_000] * k,
            "kept": [10_000] * k,
            "mean_distance": [0.123456] * k,
        },
        "files": [
            {
                "path": f"keep/part-{i:06d}.parquet",
                "rows": 5000,
                "bytes": 60_000,
                "sha256": "f" * 64,
            }
            for i in range(n_shards)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=50_000, help="k for the manifest size")
    ap.add_argument("--s3-markers", type=int, default=2000, help="markers listed on local S3")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    header(f"bench_scale_sim: {args.shards:,} shards of {args.shard_rows:,} rows")
    from ray_jobs import driver, workers
    from scoring.config import RunConfig
    from scoring.plan import RunPlan

    # 1. plan from synthetic footers: one file per shard, 4 row groups each
    rg = [args.shard_rows // 4] * 4
    footers = [(f"part-{i:06d}.parquet", rg) for i in range(args.shards)]
    t0 = time.perf_counter()
    shards = plan_from_row_groups(footers, args.shard_rows)
    t_plan = time.perf_counter() - t0
    assert len(shards) == args.shards
    base = bench_dir("scale-sim")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    cfg = RunConfig(input=os.path.join(base, "in"), output=base, run_id="sim", k=1000, quiet=True)
    run = driver.Run(cfg, quiet=True)
    fingerprint = [
        {"path": k, "size": 123_456_789, "version": "0123456789abcdef0123456789abcdef"}
        for k, _ in footers
    ]
    run.plan_ = RunPlan(shards, fingerprint, sum(s.rows for s in shards), None, [])
    t0 = time.perf_counter()
    run.open_run_folder()
    t_runjson = time.perf_counter() - t0
    runjson_bytes = os.path.getsize(os.path.join(base, "sim", "run.json"))
    t0 = time.perf_counter()
    run.open_run_folder()  # resume: read and compare
    t_runjson_check = time.perf_counter() - t0
    man_bytes = len(json.dumps(synthetic_manifest(args.shards, args.k), indent=1).encode())
    print(f"plan {args.shards:,} shards from footers: {t_plan:.2f}s", flush=True)
    print(
        f"run.json: {runjson_bytes / 2**20:.1f} MiB, write {t_runjson:.2f}s, resume check "
        f"{t_runjson_check:.2f}s"
    )
    print(f"_MANIFEST.json (global rule, k = {args.k:,}): {man_bytes / 2**20:.1f} MiB", flush=True)

    # 2. bare baseline: the same marker writes in one process, no Ray
    bare_store = run.store.child("bare")
    t0 = time.perf_counter()
    w = InstantWorker(cfg, None, bare_store, None, "p" * 64)
    for s in shards:
        w.score(s)
    t_bare = time.perf_counter() - t0
    n = args.shards
    print(
        f"bare loop (marker writes only): {t_bare:.1f}s = {1e3 * t_bare / n:.2f} ms/shard",
        flush=True,
    )

    # 3. the real driver loop with instant workers
    tmp = init_ray()
    workers.ShardWorker = InstantWorker  # Run.score imports it at call time
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        run.score(np.zeros((1, 4), np.float32), "p" * 64)
        t_sched = time.perf_counter() - t0
        cpu = time.process_time() - c0
        # 4. resume: list the markers once, schedule nothing
        t0 = time.perf_counter()
        done = commit.committed(run.store, "scores")
        t_list = time.perf_counter() - t0
        assert len(done) == args.shards, len(done)
        t0 = time.perf_counter()
        run.score(np.zeros((1, 4), np.float32), "p" * 64)
        t_resume = time.perf_counter() - t0
    finally:
        shutdown_ray(tmp)
    n = args.shards
    print(
        f"driver scheduling with Ray: wall {t_sched:.1f}s = {1e3 * t_sched / n:.2f} ms/shard "
        f"(driver CPU {1e3 * cpu / n:.2f} ms/shard; target <= 20 ms); ratio bare/driver "
        f"{t_bare / t_sched:.2f}x"
    )
    print(
        f"resume: list + read {n:,} markers {t_list:.1f}s; full resumed score stage {t_resume:.1f}s"
    )

    # 5. marker listing on S3 (moto on loopback): per-marker cost, extrapolated
    if args.s3_markers:
        s3 = LocalS3()
        try:
            from scoring.storage import Store

            st = Store(f"s3://{s3.new_bucket()}/sim")
            for i in range(args.s3_markers):
                commit.write_marker(st, "scores", i, {"rows": 1, "prototypes_sha256": "p"})
            t0 = time.perf_counter()
            got = commit.committed(st, "scores")
            t_s3 = time.perf_counter() - t0
            assert len(got) == args.s3_markers
            print(
                f"S3 resume listing: {args.s3_markers:,} markers in {t_s3:.1f}s "
                f"({1e3 * t_s3 / args.s3_markers:.2f} ms/marker -> "
                f"{t_s3 / args.s3_markers * n:.0f}s for {n:,})"
            )
        finally:
            s3.stop()
    print(f"load average at end: {loadavg():.1f}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
