#!/bin/bash
# The checks of a session that is lent a GPU (issue #21 item 5), in one command that fits the device time:
#     bash scripts/gpu_wheels.sh                                   # here, once: .whl/
#     device run: bash scripts/gpu_check.sh   (carry [".whl"], timeout_s 560)
# Writes under $OUT (the device tool's folder; ./gpu_out elsewhere), most important first, each part with a time
# limit so that the rest still runs: the machine; the CUDA-only tests (DP's secret generators on CUDA); training
# samples/s at batch 1,024 on 60,000 28x28 images, non-DP and DP (targets 500k and 300k); scripts/bench_gpu.py
# --quick (the default pipeline's stages on CUDA vs the CPU, DP engines). It asserts nothing: the figures go to
# docs/gpu.md with the card's name and the date. On a machine without CUDA every part runs and says so.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MPLBACKEND=Agg PYTHONPATH="/tmp/gpu_site:$PWD"
if ! $PY -c "import opacus, shap, lime, fairlearn, dp_accounting, jsonschema, tomli_w, pytest" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/gpu_site .whl/*.whl > "$OUT/install.txt" 2>&1
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    $PY -c "import opacus, shap, lime, fairlearn, dp_accounting, jsonschema; print('imports ok')" 2>&1 | tail -1
    nproc
} > "$OUT/machine.txt" 2>&1
timeout 120 $PY -m pytest -q -p no:cacheprovider -rs tests/core/test_training.py \
    tests/core/test_dp_secrets.py::test_secret_cuda_generator_takes_key_and_offset \
    tests/core/test_privacy.py::test_dp_training_runs_on_cuda > "$OUT/cuda_tests.txt" 2>&1
echo "exit $?" >> "$OUT/cuda_tests.txt"
timeout 150 $PY scripts/bench_scale.py --processes 1 --batch 1024 --epochs 3 > "$OUT/bench_scale_1024.txt" 2>&1
echo "exit $?" >> "$OUT/bench_scale_1024.txt"
timeout 280 $PY scripts/bench_gpu.py --quick > "$OUT/bench_gpu.txt" 2>&1
echo "exit $?" >> "$OUT/bench_gpu.txt"
