"""benchmarks/gpu_check.py on the CPU at tiny sizes: the GPU check's code paths (bf16 search
with the fp32 re-check against fp64, torch k-means, MiniLM embedding) stay runnable and
correct between the sessions that have a GPU to run it on."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_smoke():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split("|")[1].strip() for line in table[1:]]
    assert any(c.startswith("bf16 GEMM peak") for c in checks)
    assert any(c.startswith("search N=") for c in checks)
    assert any(c.startswith("k-means") for c in checks)
    assert any(c.startswith("MiniLM-L6 embedding") for c in checks)
    search = next(line for line in table if "search N=" in line)
    assert "0 wrong clusters" in search  # bf16 + fp32 re-check equals fp64 brute force
