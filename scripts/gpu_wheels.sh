#!/bin/bash
# Wheels the lent GPU machine lacks, for scripts/gpu_check.sh, into .whl/ (git-ignored; the device tool carries it).
# Run here (the package registry is reachable from this machine, not from the GPU machine):
#     bash scripts/gpu_wheels.sh
# The GPU machine (seen 2026-11-28, ../shared/PLATFORM.md) has Python 3.12, a CUDA torch, numpy, scipy, pandas,
# scikit-learn, scikit-image, matplotlib, onnx, onnxruntime, safetensors, tqdm, numba; not what is listed here
# (the versions this project's environment resolved; ~4 MB in all). lime is an sdist: built here into a wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    opacus==1.6.0 opt-einsum==3.4.0 shap==0.51.0 slicer==0.0.8 cloudpickle==3.1.3 fairlearn==0.15.0 narwhals==2.29.0 \
    dp-accounting==0.6.0 absl-py==2.5.1 attrs==23.2.0 dm-tree==0.1.10 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 tomli-w==1.2.0 \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
python3 -m pip wheel -q --no-deps lime==0.2.0.1 -w .whl
ls .whl
