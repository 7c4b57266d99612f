#!/usr/bin/env bash
# The GPU device check (issues 16, 22): one command, a few minutes on one GPU, no network. Run it from a
# plain checkout on a machine with torch, timm, peft, onnx and onnxruntime installed:
#   bash benchmarks/gpu_check.sh [OUT]            (default OUT: /tmp/gpu_check)
#   bash benchmarks/gpu_check.sh OUT --quick      (a CPU dry run with a tiny model; the gpu tests skip)
# First the `gpu`-marked tests (tests/gpu: the CUDA code paths no CPU test reaches; ~2 min, most of it one
# torch.compile), then benchmarks/gpu_check.py, whose goals print met / NOT met. Exits non-zero when a test
# fails or a goal is not met; both parts always run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu_check}
shift || true
py=${PYTHON:-python3}
status=0
PYTHONPATH=. timeout 600 "$py" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider || status=$?
check=--check
for arg in "$@"; do [[ $arg == --quick ]] && check=; done  # a CPU dry run measures no GPU goal: no verdict
PYTHONPATH=. PYTHONUNBUFFERED=1 "$py" benchmarks/gpu_check.py --out "$out" $check "$@" || status=$?
exit $status
