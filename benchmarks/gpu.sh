#!/usr/bin/env bash
# GPU benchmarks: SimCLR ResNet-50 @224 training (img/s, MFU) and adapted-model inference (batch 256, bf16).
#   benchmarks/gpu.sh [OUTPUT_JSON] [gpu_bench.py options, e.g. --batch 192 --steps 20]
# Needs python3 with torch (CUDA), timm, lightning; remedis is used from this checkout. On an offline
# GPU machine, pure-python packages it lacks (monai, pydicom) are installed from .whl/ if that folder holds
# wheels (made with `pip download --no-deps monai pydicom -d .whl`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${1:-benchmarks/results/gpu-latest.json}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/remedis-site .whl/*.whl
    export PYTHONPATH=/tmp/remedis-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv || true
$PY -c "import torch, timm, lightning, monai; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
$PY benchmarks/gpu_bench.py --output "$OUTPUT" "${@:2}"
