"""Peak memory of the whole process tree (driver, Ray's GCS and raylet, every worker) for a
full run at 1M and 10M rows: it must not grow with N beyond the shard-sized working set
(target: 10M within 1.2x of 1M). d = 64 so that 10M rows (2.6 GB of float32) fit a 24 GiB
machine next to the bare baseline; the working set per worker is one 250,000-row shard.

Both RSS (counts Ray's shared object-store pages once per process that maps them) and PSS
(splits shared pages) are summed over the tree, sampled every 0.25 s. The bare baseline is the
smallest possible one-process job holding the whole input (N x d float32): what a design that
loads everything would need at the same N.

    python benchmarks/bench_memory.py                    # 1M and 10M rows
    python benchmarks/bench_memory.py --rows 1000000,4000000
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time

from _common import TreeMemory, bench_dir, gib, header, init_ray, loadavg, shutdown_ray
from _common import write_embeddings as write_data


def one(n: int, d: int, k: int, shard_rows: int) -> dict:
    from ray_jobs.driver import run
    from scoring.config import RunConfig

    data = bench_dir(f"mem-{n}-{d}")
    t0 = time.perf_counter()
    write_data(data, n, d, files=max(1, n // 500_000), row_group_rows=50_000)
    prep = time.perf_counter() - t0
    out = bench_dir("mem-runs")
    run_id = f"m{n}-{time.time_ns()}"
    with TreeMemory() as idle:
        tmp = init_ray()
        time.sleep(2)
    base_rss, base_pss = idle.sample()
    try:
        cfg = RunConfig(
            input=data,
            output=out,
            run_id=run_id,
            k=k,
            shard_rows=shard_rows,
            kmeans_iters=10,
            strategy="balanced",
            keep_fraction=0.3,
            quiet=True,
        )
        t0 = time.perf_counter()
        with TreeMemory() as mem:
            doc = run(cfg, quiet=True)
        secs = time.perf_counter() - t0
        assert doc["rows_in"] == n
    finally:
        shutdown_ray(tmp)
        shutil.rmtree(f"{out}/{run_id}", ignore_errors=True)
    return {
        "rows": n,
        "prep_s": prep,
        "run_s": secs,
        "peak_rss": mem.peak_rss,
        "peak_pss": mem.peak_pss,
        "idle_rss": base_rss,
        "idle_pss": base_pss,
        "procs": mem.peak_procs,
        "bare_bytes": n * d * 4,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--shard-rows", type=int, default=250_000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    header(f"bench_memory: d = {args.dim}, k = {args.k}, shards of {args.shard_rows:,} rows")
    res = []
    for n in [int(v) for v in args.rows.split(",")]:
        r = one(n, args.dim, args.k, args.shard_rows)
        res.append(r)
        print(
            f"N = {n:>11,}: run {r['run_s']:.0f}s, peak tree RSS {gib(r['peak_rss'])}, "
            f"PSS {gib(r['peak_pss'])} ({r['procs']} processes; idle Ray RSS "
            f"{gib(r['idle_rss'])}); bare in-memory input alone {gib(r['bare_bytes'])}",
            flush=True,
        )
    if len(res) >= 2:
        a, b = res[0], res[-1]
        print(
            f"growth {b['rows'] // a['rows']}x rows: peak RSS x{b['peak_rss'] / a['peak_rss']:.2f}, "
            f"PSS x{b['peak_pss'] / a['peak_pss']:.2f} (target <= 1.2); bare input "
            f"x{b['bare_bytes'] / a['bare_bytes']:.0f}"
        )
    print(f"load average at end: {loadavg():.1f}")


if __name__ == "__main__":
    main()
