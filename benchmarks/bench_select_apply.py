"""After the run: the cost of `protoprune select` and `protoprune apply` next to the score
stage of the same data. One run over N rows with --dedup-eps (its score stage's time is the
baseline), then in the same invocation: (a) `select` of another strategy and fraction at the
run's eps, (b) `select` with a changed eps (rows near the new threshold re-decided from the
embeddings), (c) `apply` of the run (one task per input shard), and (d) a bare pyarrow
read-filter-write of the same input files by the keep ids held in one process (the
baseline of apply's throughput). Checks that apply's files equal the bare ones.

    python benchmarks/bench_select_apply.py                  # 10^7 rows, d = 64, k = 1000
    python benchmarks/bench_select_apply.py --rows 1000000

Ray start-up is excluded (one embedded Ray for all). Set PP_BENCH_DIR to put the data
elsewhere than the temp dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time

from _common import bench_dir, header, init_ray, loadavg, shutdown_ray, write_embeddings


def bare_apply(paths: list[str], keep_ids, out: str) -> float:
    """Read each input file, filter it by the keep ids (all in this process), write it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        t = pq.read_table(p)
        pq.write_table(t.filter(pc.is_in(t["id"], value_set=keep_ids)), f"{out}/{i:06d}.parquet")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    # the synthetic blobs hold no planted duplicates: a row's largest cosine to an earlier row
    # of its cluster is ~0.82-0.87, so these eps remove a few % and about a third of the rows
    ap.add_argument("--eps", type=float, default=0.12, help="the run's --dedup-eps")
    ap.add_argument("--new-eps", type=float, default=0.14, help="the changed eps of select (b)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    header(f"bench_select_apply: {args.rows:,} rows, d = {args.dim}, k = {args.k}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_jobs import prune
    from scoring.config import RunConfig
    from scoring.storage import Store

    base = bench_dir("select_apply")
    data = os.path.join(base, f"data-{args.rows}-{args.dim}-{args.files}")  # the input alone
    per = args.rows // args.files
    paths = write_embeddings(
        data, per * args.files, args.dim, files=args.files, row_group_rows=min(50_000, per)
    )
    runs, out, bare = (os.path.join(base, x) for x in ("runs", "pruned", "bare"))
    for p in (runs, out, bare):
        shutil.rmtree(p, ignore_errors=True)
    cfg = RunConfig(
        input=data, output=runs, run_id="r", k=args.k, shard_rows=args.shard_rows,
        strategy="hard", keep_fraction=0.5, dedup_eps=args.eps, quiet=True,
    )  # fmt: skip
    run_url = os.path.join(runs, "r")
    tmp = init_ray()
    try:
        t0 = time.perf_counter()
        doc = prune.run(cfg)
        t_run = time.perf_counter() - t0
        t0 = time.perf_counter()
        a = prune.select(run_url, "balanced-30", strategy="balanced", keep_fraction=0.3)
        t_sel = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = prune.select(run_url, "eps", strategy="hard", keep_fraction=0.5, dedup_eps=args.new_eps)
        t_eps = time.perf_counter() - t0
        t0 = time.perf_counter()
        applied = prune.apply(run_url, out)
        t_apply = time.perf_counter() - t0
    finally:
        shutdown_ray(tmp)
    st = Store(run_url)
    keep = pa.concat_arrays(
        [st.read_parquet(f["path"], ["id"])["id"].combine_chunks() for f in doc["files"]]
    )
    t_bare = bare_apply(paths, keep, bare)
    same = all(
        pq.read_table(os.path.join(out, f["path"])).equals(pq.read_table(f"{bare}/{i:06d}.parquet"))
        for i, f in enumerate(applied["files"])
    ) and len(applied["files"]) == len(paths)
    score = doc["timings_seconds"]["score"]
    print(f"run: {t_run:.1f}s {doc['timings_seconds']}; reduce passes {doc['reduce_seconds']}")
    print(f"score stage: {score:.1f}s ({args.rows:,} rows)")
    for what, t, sel in (
        ("balanced 0.3, the run's eps", t_sel, a),
        (f"hard 0.5, eps {args.eps} -> {args.new_eps}", t_eps, b),
    ):
        s = sel["timings_seconds"]["select"]
        print(
            f"select {what}: {s:.1f}s = {s / score:.2f}x the score stage ({t:.1f}s with its "
            f"report); passes {sel['reduce_seconds']}; removed {sel['dedup']['removed']:,}; "
            f"parts re-decided {sel.get('redecided_parts', 0)}"
        )
    print(
        f"apply: {t_apply:.1f}s, {args.rows / t_apply:,.0f} input rows/s "
        f"({applied['rows']:,} rows written) = {t_apply / score:.2f}x the score stage"
    )
    print(f"bare pyarrow read-filter-write: {t_bare:.1f}s, {args.rows / t_bare:,.0f} rows/s")
    print(f"apply throughput / bare: {t_bare / t_apply:.2f}")
    print(f"apply files == bare files: {same}")
    print(f"load average at end: {loadavg():.1f}")
    if not same:
        raise SystemExit("apply's files differ from the bare read-filter-write")


if __name__ == "__main__":
    main()
