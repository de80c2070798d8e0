#!/usr/bin/env bash
# The GPU path's first contact, in one command on a bare GPU machine (benchmarks/gpu_first_run.py says what it
# measures): install the onnxruntime-gpu wheel that travelled in pieces, then run. About 6 minutes on an H100.
#
#   benchmarks/gpu_first_run.sh                  # on the GPU machine: DEVICE=cuda, the report in $OUT
#   DEVICE=cpu OUT=/tmp/first benchmarks/gpu_first_run.sh   # the same, proven on a CPU (smaller; CUDA parts skipped)
#
# Carrying the wheel (about 255 MB; one call carries 64 MiB): here, `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .ortgpu onnxruntime-gpu==1.31.1`,
# `split -b 55M` it into .ortgpu/part-*, and in back-to-back calls copy one part each to /opt/ortparts/ on the
# machine; the last call runs this script with the parts in place (ORTPARTS=/opt/ortparts). Nothing is downloaded
# there; CUDA 13 and cuDNN come from the machine's nvidia-* wheels, which the engine preloads in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}" OUT="${OUT:-benchmarks/results}" PY="${PYTHON:-python3}" PARTS="${ORTPARTS:-.ortgpu}"
if compgen -G "$PARTS/part-*" > /dev/null; then
  mkdir -p /tmp/ortgpu-wheel
  cat "$PARTS"/part-* > /tmp/ortgpu-wheel/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  "$PY" -m pip install -q --no-deps --target /opt/ortgpu /tmp/ortgpu-wheel/*.whl
  export PYTHONPATH="/opt/ortgpu${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".whl/*.whl" > /dev/null; then  # small wheels (diffusers) that travelled with the call
  "$PY" -m pip install -q --no-deps .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_first_run --device "$DEVICE" --out "$OUT"
