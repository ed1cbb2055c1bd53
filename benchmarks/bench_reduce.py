"""The reducer on 10^8 synthetic (id, cluster, distance) rows in 100 score shards: time and
peak memory of the process tree, exact against a reference on a subsample of clusters.

Score files are written exactly as the score stage writes them (sorted by cluster, 65,536-row
row groups). Distances are rounded to 1e-4 so that many rows tie and the id tie-break is
exercised. Rules: `hard` (distributed radix select) and `balanced` (per-cluster ranges). The
bare baseline is numpy in one process holding every row: argpartition for hard, lexsort for
balanced (its memory is what the reducer avoids).

    python benchmarks/bench_reduce.py                        # 1e8 rows, 100 shards
    python benchmarks/bench_reduce.py --rows 10000000 --shards 20
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from multiprocessing import Pool

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from _common import TreeMemory, bench_dir, gib, header, init_ray, loadavg, shutdown_ray

from scoring.inputs.parquet import Shard
from scoring.layout import ROW_GROUP, score_key
from scoring.stages.score import scores_table, write_id_hashes
from scoring.storage import Store


def cluster_of(rng, n: int, k: int) -> np.ndarray:
    """Skewed cluster sizes (a few large clusters, many small), like real k-means."""
    w = 1.0 / np.arange(1, k + 1) ** 0.7
    return rng.choice(k, size=n, p=w / w.sum()).astype(np.int32)


def write_shard(args) -> None:
    root, i, rows, k = args
    st = Store(root)
    if st.exists(f"_commits/bench-ids/{i}"):
        return
    rng = np.random.default_rng(1000 + i)
    ids = pa.array(rng.permutation(rows).astype(np.int64) + i * rows)
    cl = cluster_of(rng, rows, k)
    dist = np.round(rng.gamma(4.0, 0.05, size=rows), 4).astype(np.float32)
    t = scores_table(ids, cl, dist, dist + np.float32(0.01))
    st.write_parquet(score_key(i), t, row_group_size=ROW_GROUP)
    write_id_hashes(st, i, ids)  # the reduce's duplicate-id check reads these
    st.put_bytes(f"_commits/bench-ids/{i}", b"")


def reference_check(st: Store, n_shards: int, strategy: str, n_keep: int, k: int, seed: int):
    """Independent check on 20 random clusters: the kept rows of those clusters equal what a
    single process picks from all N rows."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(k, size=20, replace=False))
    sel = pa.array(sample.astype(np.int32))
    counts = np.zeros(k, np.int64)
    parts, dists, ids_all = [], [], []
    for i in range(n_shards):
        cols = ["cluster", "distance", "id"] if strategy == "hard" else ["cluster", "distance"]
        t = st.read_parquet(score_key(i), cols)
        counts += np.bincount(t["cluster"].to_numpy(), minlength=k)
        if strategy == "hard":
            dists.append(t["distance"].to_numpy())
            ids_all.append(t["id"].to_numpy())
        full = st.read_parquet(score_key(i), ["id", "cluster", "distance"])
        parts.append(full.filter(pc.is_in(full["cluster"], sel)))
    rows = pa.concat_tables(parts)
    cl = rows["cluster"].to_numpy()
    d = rows["distance"].to_numpy()
    ids = rows["id"].to_numpy()
    expected = set()
    if strategy == "hard":
        dd = np.concatenate(dists)
        ii = np.concatenate(ids_all)
        v = -np.partition(-dd, n_keep - 1)[n_keep - 1]  # n_keep-th largest distance
        above = int((dd > v).sum())
        tied = np.sort(ii[dd == v])[: n_keep - above]
        id_max = tied[-1] if len(tied) else None
        del dd, ii
        m = (d > v) | ((d == v) & (id_max is not None) & (ids <= (id_max if id_max else 0)))
        expected = set(ids[m].tolist())
    else:
        m_tot = int(counts.sum())
        q = [n_keep * int(c) // m_tot for c in counts]
        rem = [n_keep * int(c) % m_tot for c in counts]
        for j in sorted(range(k), key=lambda j: (-rem[j], j))[: n_keep - sum(q)]:
            q[j] += 1
        for j in sample:
            idx = np.nonzero(cl == j)[0]
            order = np.lexsort((ids[idx], -d[idx]))
            expected |= set(ids[idx[order[: q[j]]]].tolist())
    got = set()
    for key in st.list("keep/", suffix=".parquet"):
        t = st.read_parquet(key, ["id", "cluster"])
        got |= set(t.filter(pc.is_in(t["cluster"], sel))["id"].to_numpy().tolist())
    return got == expected, len(expected)


def bare(st: Store, n_shards: int, strategy: str, n_keep: int) -> tuple[float, int]:
    """One process, all rows in memory: the simplest exact implementation."""
    t0 = time.perf_counter()
    tabs = [st.read_parquet(score_key(i), ["id", "cluster", "distance"]) for i in range(n_shards)]
    t = pa.concat_tables(tabs)
    d = t["distance"].to_numpy()
    ids = t["id"].to_numpy()
    if strategy == "hard":
        # exact with the id tie-break: partition, then sort only the boundary value's ties
        v = -np.partition(-d, n_keep - 1)[n_keep - 1]
        keep = np.nonzero(d > v)[0]
        tied = np.nonzero(d == v)[0]
        tied = tied[np.argsort(ids[tied], kind="stable")][: n_keep - len(keep)]
        kept = len(keep) + len(tied)
    else:
        cl = t["cluster"].to_numpy()
        order = np.lexsort((ids, -d, cl))
        kept = len(order)  # the per-cluster cut is a cheap scan after this sort
    return time.perf_counter() - t0, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--strategies", default="hard,balanced")
    ap.add_argument("--no-bare", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    header(f"bench_reduce: {args.rows:,} rows in {args.shards} score shards, k = {args.k:,}")
    per = args.rows // args.shards
    root = bench_dir(f"reduce-{args.rows}-{args.shards}-{args.k}")
    t0 = time.perf_counter()
    with Pool(min(2, os.cpu_count() or 1)) as pool:
        pool.map(write_shard, [(root, i, per, args.k) for i in range(args.shards)])
    print(f"score files: {root} ({time.perf_counter() - t0:.0f}s to prepare)", flush=True)
    from ray_jobs.driver import Run
    from ray_jobs.reduce import reduce
    from scoring.config import RunConfig
    from scoring.plan import RunPlan

    n = per * args.shards
    n_keep = int(args.keep * n)
    tmp = init_ray()
    results = []
    try:
        for strategy in args.strategies.split(","):
            cfg = RunConfig(
                input=root,
                output=os.path.dirname(root),
                run_id=os.path.basename(root),
                k=args.k,
                strategy=strategy,
                keep_fraction=args.keep,
                quiet=True,
            )
            r = Run(cfg, quiet=True)
            shards = [Shard(i, "x", (0,), per, i * per) for i in range(args.shards)]
            r.plan_ = RunPlan(shards, [], n, None, [])  # no sample: no row groups needed
            r.store.delete("keep")
            t0 = time.perf_counter()
            with TreeMemory() as mem:
                doc = reduce(r, np.zeros((args.k, 1), np.float32), "bench")  # centroids: dbp only
            secs = time.perf_counter() - t0
            assert doc["rows_kept"] == n_keep
            ok, checked = reference_check(r.store, args.shards, strategy, n_keep, args.k, 7)
            print(
                f"{strategy}: {secs:.0f}s = {n / secs:,.0f} rows/s; peak tree RSS "
                f"{gib(mem.peak_rss)}, PSS {gib(mem.peak_pss)}; exact on 20 clusters "
                f"({checked:,} kept rows): {ok}",
                flush=True,
            )
            results.append((strategy, secs, mem.peak_pss, ok))
            if not ok:
                raise SystemExit("reducer result differs from the reference")
    finally:
        shutdown_ray(tmp)
    if not args.no_bare:
        st = Store(root)
        for strategy, secs, pss, _ in results:
            with TreeMemory() as mem:
                tb, _ = bare(st, args.shards, strategy, n_keep)
            print(
                f"bare {strategy} (all rows in one process): {tb:.0f}s, peak RSS "
                f"{gib(mem.peak_rss)}; reducer/bare time ratio {tb / secs:.2f}x, memory "
                f"{pss / max(mem.peak_pss, 1):.2f}x",
                flush=True,
            )
    print(f"load average at end: {loadavg():.1f}")
    shutil.rmtree(os.path.join(root, "keep"), ignore_errors=True)


if __name__ == "__main__":
    main()
