#!/usr/bin/env bash
# Every CUDA check of the project in one go, for a machine with an NVIDIA GPU (docs/cost.md, "CUDA check"):
# the CUDA tests, the VOC and COCO paper configs' one-epoch rehearsals, and the default synthetic benchmark's
# whole DAG on the GPU (its metrics, to compare with the CPU run's committed ones).
# Usage: bash benchmarks/cuda_checks.sh [OUT_DIR]   (logs and tables in OUT_DIR, default cuda_checks/)
# Exits 2 with one line where there is no CUDA device, 1 when a check failed.
set -uo pipefail
out=${1:-cuda_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - start)) s"
    [ "$code" -eq 0 ] || status=1
}
python3 - <<'PY' || exit 2
import sys

sys.path.insert(0, "benchmarks")
from cuda_check import no_cuda_reason

if reason := no_cuda_reason():
    sys.exit(f"cuda_checks: no CUDA device: {reason}. Run it on a machine with an NVIDIA GPU.")
import torch

print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step cuda_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_par.py -k cuda
step voc_rehearsal 150 python3 benchmarks/cuda_check.py
step default_dag 420 python3 benchmarks/cuda_check.py --params params.yaml --as-is --metrics-json "$out/default_metrics.json"
step coco_rehearsal 150 python3 benchmarks/cuda_check.py --params configs/coco_paper.yaml
exit $status
