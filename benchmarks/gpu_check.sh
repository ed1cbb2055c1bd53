#!/usr/bin/env bash
# GPU check on one H100/H200-class GPU, measuring what production runs: bf16 GEMM peak, GPU
# k-means 5e5 x 768 / k = 50,000 fitted twice (same bytes), NearestPrototype(use_gpu=True) on
# 2e6 host rows with default chunking (share re-checked in fp32), GPU dedup against the CPU on
# 20,000 rows, TorchEmbedder under autocast (MiniLM-L6-shaped BERT, random weights).
# Nothing is downloaded: torch, numpy, pyarrow and transformers of the machine; faiss-gpu only
# when it is installed; no Ray. Under 8 minutes.
#   bash benchmarks/gpu_check.sh            # full sizes
#   bash benchmarks/gpu_check.sh --quick    # 10x smaller (smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
