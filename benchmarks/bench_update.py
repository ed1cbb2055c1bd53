"""Cost of updating a growing dataset: a run over N rows, then 10% new rows arrive. Measures,
in one invocation over the same N × 1.1 rows: (a) a full rerun (new prototypes, every shard
rescored: what a user did before --prototypes-from) and (b) the update with
`--prototypes-from` and `--reuse-scores-from` the first run (only the new shards scored, the
reduce over all). Prints both times and the ratio update / full (target <= 0.25 at 10^7 rows);
checks that the update's keep list equals a fresh run over all files with the same prototypes.

    python benchmarks/bench_update.py                    # 10^7 + 10^6 rows, d = 64, k = 1000
    python benchmarks/bench_update.py --rows 1000000

Ray start-up is excluded (one embedded Ray for all runs). Set PP_BENCH_DIR to put the data
elsewhere than the temp dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time

from _common import bench_dir, header, init_ray, loadavg, shutdown_ray, write_embeddings


def timed(cfg) -> tuple[float, dict]:
    from ray_jobs.driver import run

    t0 = time.perf_counter()
    doc = run(cfg, quiet=True)
    return time.perf_counter() - t0, doc


def keep_ids(run_dir: str) -> list:
    from scoring import layout
    from scoring.storage import Store

    st = Store(run_dir)
    return sorted(
        i
        for k in st.list(layout.KEEP, suffix=".parquet")
        for i in st.read_parquet(k)["id"].to_pylist()
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the first run")
    ap.add_argument("--new", type=float, default=0.1, help="new rows, as a share of --rows")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--files", type=int, default=10, help="files of the first run")
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--strategy", default="balanced")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    header(f"bench_update: {args.rows:,} rows + {args.new:.0%} new, d = {args.dim}, k = {args.k}")
    from scoring.config import RunConfig

    per = args.rows // args.files
    n_new_files = max(1, round(args.new * args.files))
    base = bench_dir("update")
    src = os.path.join(base, "all")
    paths = write_embeddings(
        src, per * (args.files + n_new_files), args.dim, files=args.files + n_new_files,
        row_group_rows=min(50_000, per),
    )  # fmt: skip
    data, runs = os.path.join(base, "data"), os.path.join(base, "runs")
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(runs, ignore_errors=True)
    os.makedirs(data)
    for p in paths[: args.files]:
        os.link(p, os.path.join(data, os.path.basename(p)))

    def cfg(run_id: str, **kw) -> RunConfig:
        return RunConfig(
            input=data, output=runs, run_id=run_id, k=args.k, shard_rows=args.shard_rows,
            strategy=args.strategy, keep_fraction=0.5, quiet=True, **kw,
        )  # fmt: skip

    tmp = init_ray()
    try:
        t_first, _ = timed(cfg("first"))
        for p in paths[args.files :]:  # the new rows arrive
            os.link(p, os.path.join(data, os.path.basename(p)))
        first = os.path.join(runs, "first")
        t_full, full = timed(cfg("full"))
        t_upd, upd = timed(cfg("update", prototypes_from=first, reuse_scores_from=first))
        t_ref, _ = timed(cfg("fresh-same-prototypes", prototypes_from=first))
    finally:
        shutdown_ray(tmp)
    same = keep_ids(os.path.join(runs, "update")) == keep_ids(
        os.path.join(runs, "fresh-same-prototypes")
    )
    r = upd["reuse"]
    print(f"first run ({args.rows:,} rows): {t_first:.1f}s")
    print(f"full rerun over {full['rows_in']:,} rows: {t_full:.1f}s {full['timings_seconds']}")
    print(f"  reduce passes: {full['reduce_seconds']}")
    print(
        f"update: {t_upd:.1f}s {upd['timings_seconds']}; shards reused {r['shards_reused']}, "
        f"scored {r['shards_scored']}; drift ratio {r['drift_ratio']:.3f}"
    )
    print(f"  reduce passes: {upd['reduce_seconds']}")
    print(f"fresh run with the first run's prototypes: {t_ref:.1f}s")
    print(f"keep list of the update == fresh run with the same prototypes: {same}")
    print(f"ratio update / full rerun: {t_upd / t_full:.3f} (target <= 0.25)")
    print(f"load average at end: {loadavg():.1f}")
    if not same:
        raise SystemExit("the update's keep list differs from the fresh run's")


if __name__ == "__main__":
    main()
