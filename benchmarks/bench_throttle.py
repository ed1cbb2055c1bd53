"""The same small job on a local S3 server (moto), clean and with a share of its requests
answered 503 SlowDown by the tests' fault proxy (tests/s3proxy.py), in one invocation.
Prints both wall times, their ratio, and whether the keep lists are identical.

    python benchmarks/bench_throttle.py                 # 60,000 rows x 64, 20% throttled
    python benchmarks/bench_throttle.py --quick         # 12,000 rows

Both runs go through the proxy (the clean one with share 0), so the proxy's own cost is in
both; a warm-up run (not timed) starts Ray's workers first. Ray start-up is excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from _common import LocalS3, header, init_ray, loadavg, shutdown_ray, write_embeddings
from s3proxy import FaultProxy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="default 60,000 (--quick: 12,000)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--shard-rows", type=int, default=None, help="default 5,000 (--quick: 1,000)")
    ap.add_argument("--share", type=float, default=0.2, help="share of requests answered 503")
    ap.add_argument("--quick", action="store_true", help="12,000 rows (a loaded machine)")
    a = ap.parse_args()
    a.rows = a.rows or (12_000 if a.quick else 60_000)
    a.shard_rows = a.shard_rows or (1_000 if a.quick else 5_000)
    logging.basicConfig(level=logging.ERROR)
    from ray_jobs.driver import run
    from scoring.config import make_config
    from scoring.storage import Store

    header(f"throttling: {a.rows:,} rows x {a.dim}, k={a.k}, {a.share:.0%} of requests 503")
    base = os.environ.get("PP_BENCH_DIR") or "/tmp/pp-bench"
    paths = write_embeddings(
        os.path.join(base, f"throttle-{a.rows}-{a.dim}"), a.rows, a.dim, files=4,
        row_group_rows=a.shard_rows, clusters=a.k,
    )  # fmt: skip
    s3 = LocalS3()
    tmp = init_ray(2)
    try:
        bucket = s3.new_bucket()
        inp = s3.upload(paths, bucket, "in")

        def job(run_id: str, share: float) -> tuple[float, list, FaultProxy]:
            proxy = FaultProxy(s3.endpoint, share=share, max_faults=10**9, seed=1, lifetime=3600)
            opts = {"endpoint_url": proxy.endpoint}
            cfg = make_config(
                dict(
                    input=inp, output=f"s3://{bucket}/out", run_id=run_id, k=a.k,
                    shard_rows=a.shard_rows, strategy="balanced", keep_fraction=0.5,
                    quiet=True, storage_options=opts,
                )
            )  # fmt: skip
            try:
                t0 = time.perf_counter()
                doc = run(cfg, quiet=True)
                secs = time.perf_counter() - t0
            finally:
                proxy.stop()
            st = Store(f"s3://{bucket}/out/{run_id}")
            man = json.loads(st.get_bytes("_MANIFEST.json"))
            assert man["rows_kept"] == doc["rows_kept"]
            ids = sorted(
                i for f in man["files"] for i in st.read_parquet(f["path"])["id"].to_pylist()
            )
            return secs, ids, proxy

        job("warmup", 0.0)
        clean, ids_clean, p0 = job("clean", 0.0)
        slow, ids_slow, p1 = job("throttled", a.share)
        print(f"clean run:     {clean:7.2f} s  ({p0.requests} requests)")
        print(
            f"throttled run: {slow:7.2f} s  ({p1.requests} requests, {p1.faults} answered 503 "
            f"SlowDown)"
        )
        print(f"throttled / clean: {slow / clean:.2f}x")
        print(f"keep lists identical: {ids_clean == ids_slow}")
        print(f"# load average {loadavg():.1f} at the end")
    finally:
        shutdown_ray(tmp)
        s3.stop()


if __name__ == "__main__":
    main()
