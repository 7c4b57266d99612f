#!/usr/bin/env bash
# The GPU device check (issue 16): one command, a few minutes on one GPU, no network. Run it from a
# plain checkout on a machine with torch, timm, peft, onnx and onnxruntime installed:
#   bash benchmarks/gpu_check.sh [OUT]            (default OUT: /tmp/gpu_check)
#   bash benchmarks/gpu_check.sh OUT --quick      (a CPU dry run with a tiny model)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu_check}
shift || true
PYTHONPATH=. PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" "$@"
