#!/usr/bin/env bash
# Wheels that bench/gpu_check.py needs on the device image (torch, transformers, nvcc there; no network):
# pdserve's own small dependencies, and FlashInfer with its TVM FFI. About 24 MB for CPython 3.12 (flashinfer-python
# 0.6.18 is 18 MB), under the device tool's 64 MiB carry limit; nixl-cu13 (59 MB) goes in a run of its own.
#   bench/gpu_wheels.sh 3.12 wheels/     # the device's `python -V`, then carry wheels/ and on the device:
#   pip install --no-deps --no-index wheels/*.whl
set -euo pipefail
py=${1:?python version of the device, e.g. 3.12}
out=${2:-wheels}
pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" \
  "flashinfer-python>=0.6,<0.7" apache-tvm-ffi einops tabulate nvidia-ml-py \
  msgspec pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
du -sh "$out"
