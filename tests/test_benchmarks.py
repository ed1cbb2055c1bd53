"""Every benchmark script runs end to end at tiny sizes, so none of them rots between the
sessions that measure with them. Their numbers are not checked here (speed is never asserted
in tests); what is checked is what each script itself verifies (bench_reduce: exact against
its reference; gpu_check: the bf16 search equals fp64 brute force) and that it prints its
result lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "bench_e2e.py": (
        ["--rows", "20000", "--dim", "16", "--k", "20", "--sample", "2000", "--files", "2"],
        ["[local] protoprune (auto)", "[s3] protoprune (auto)", "| s3 | auto |"],
    ),
    "bench_throttle.py": (
        ["--quick", "--rows", "3000", "--k", "8"],
        ["throttled / clean:", "keep lists identical: True"],
    ),
    "bench_update.py": (
        ["--rows", "40000", "--files", "4", "--shard-rows", "5000", "--k", "20"],
        [
            "update / full rerun",
            "keep list of the update == fresh run with the same prototypes: True",
        ],
    ),
    "bench_reduce.py": (
        ["--rows", "200000", "--shards", "4", "--k", "50"],
        ["hard: ", "balanced: ", "exact on 20 clusters", "bare balanced"],
    ),
    "bench_scale_sim.py": (
        ["--shards", "300", "--k", "100", "--s3-markers", "20"],
        ["driver scheduling with Ray", "resume: list + read 300 markers", "S3 resume listing"],
    ),
    "bench_memory.py": (
        ["--rows", "20000,40000", "--dim", "8", "--k", "10", "--shard-rows", "10000"],
        ["growth 2x rows"],
    ),
    "bench_fit.py": (
        ["--rows", "6000", "--dim", "16", "--k", "20", "--iters", "4", "--seeds", "2"],
        ["| faiss fp32 |", "| torch bf16 |", "faiss seed spread", "fit speed-up torch bf16"],
    ),
    "bench_kmeans_sample.py": (
        ["--rows", "20000", "--dim", "8", "--k", "20", "--iters", "3"],
        ["| shuffled | row groups", "| sorted | uniform"],
    ),
    "resume_bench.py": (
        ["--rows", "4000", "--files", "2", "--shard-rows", "1000", "--k", "8"],
        ["resume (half)", "rerun of a committed run"],
    ),
    "bench_score.py": (
        ["--rows", "20000", "--dim", "16", "--k", "20", "--files", "2"],
        ["score stage, hard (scores)", "score stage, auto (scores + embeddings)", "ratio"],
    ),
    "quality.py": (
        [
            "--quick",
            "--pools",
            "digits",
            "--strategies",
            "auto,random",
            "--fractions",
            "0.2",
            "--seeds",
            "2",
            "--no-dedup",
        ],
        ["**digits-clean**", "| auto | ", "digits-redundant 20%: auto", "auto >= full pool"],
    ),  # fmt: skip
    "bench_select_apply.py": (
        ["--rows", "20000", "--files", "2", "--shard-rows", "5000", "--k", "20"],
        [
            "score stage:",
            "select hard 0.5, eps",
            "apply throughput / bare",
            "apply files == bare files: True",
        ],
    ),
    "gpu_check.py": (
        ["--cpu-smoke"],
        [
            "| bf16 GEMM peak",
            "| k-means",
            "same bytes in both fits",
            "re-checked in fp32",
            "0 wrong clusters",
            "differs from the CPU in 0 rows, from the float64 brute force in 0 rows",
            "| MiniLM-L6 embedding",
        ],
    ),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_at_tiny_size(script, tmp_path):
    args, expect = CASES[script]
    env = dict(
        os.environ,
        PP_BENCH_DIR=str(tmp_path),
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    for line in expect:
        assert line in out.stdout, (line, out.stdout[-3000:])
