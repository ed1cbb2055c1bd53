"""Resume cost against a full run, in one process on one local Ray.

    python benchmarks/resume_bench.py [--rows 40000] [--files 4] [--shard-rows 5000]

Writes a demo dataset to a temp folder, runs it fully (the baseline), then deletes the manifest
and the score markers of half the shards (as if the driver died there) and resumes. Prints both
times, the shards redone, and the ratio resume / full.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--shard-rows", type=int, default=5_000)
    ap.add_argument("--k", type=int, default=40)
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from ray_jobs.driver import run
    from scoring import layout
    from scoring.config import make_config
    from scoring.demo import make_demo

    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="pp-resume-")
    try:
        make_demo(f"{tmp}/in", rows=a.rows, dim=64, clusters=40, files=a.files, row_group_rows=1000)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")

        def cfg(run_id: str):
            return make_config(
                dict(
                    input=f"{tmp}/in",
                    output=f"{tmp}/out",
                    run_id=run_id,
                    k=a.k,
                    shard_rows=a.shard_rows,
                    strategy="balanced",
                    keep_fraction=0.3,
                    quiet=True,
                )
            )

        run(cfg("warmup"), quiet=True)  # imports, worker processes
        t0 = time.perf_counter()
        full = run(cfg("full"), quiet=True)
        t_full = time.perf_counter() - t0
        d = f"{tmp}/out/full"
        n = len(json.load(open(f"{d}/run.json"))["shards"])
        os.unlink(f"{d}/_MANIFEST.json")
        redo = list(range(0, n, 2))
        for i in redo:
            os.unlink(f"{d}/{layout.marker_key('scores', i)}")
        t0 = time.perf_counter()
        again = run(cfg("full"), quiet=True)
        t_resume = time.perf_counter() - t0
        assert again["rows_kept"] == full["rows_kept"]
        t0 = time.perf_counter()
        run(cfg("full"), quiet=True)
        t_done = time.perf_counter() - t0
        print(f"rows {a.rows}, shards {n}, redone {len(redo)}")
        print(f"full run       {t_full:7.2f} s")
        print(f"resume (half)  {t_resume:7.2f} s   ratio {t_resume / t_full:.2f}")
        print(f"rerun of a committed run {t_done:.2f} s   ratio {t_done / t_full:.3f}")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
