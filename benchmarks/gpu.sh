#!/usr/bin/env bash
# The engine against eager diffusers on a GPU machine, end to end: install what travelled with the call, build the
# `small` model (real widths, 4 layers), export it (fp32 + fp16), check the engine's images against eager diffusers,
# then time eager and the engine on the CUDA provider, with IO binding, with CUDA graphs, with step caching (the
# trained default's decisions replayed, benchmarks/step_cache_replay.py), and on TensorRT where its
# libraries are present, at 1024², 20 steps, guidance 4.5, batch 1 and 4. JSON, Markdown and a plot go to $OUT;
# the table is printed last. Run benchmarks/gpu_first_run.sh first: it checks the GPU path at the real dimensions
# in the time a first lease has.
#
#   benchmarks/gpu.sh                                  # on the GPU machine (DEVICE=cuda CONFIG=small SIZE=1024)
#   DEVICE=cpu CONFIG=small SIZE=256 STEPS=2 benchmarks/gpu.sh   # the same script, proven on a CPU
#
# CONFIG=full (28 layers, T5-XXL) does not fit a first lease: T5-XXL's export alone takes about 30 minutes, and its
# weights are drawn from a seed at export, so the eager side has no torch T5 to run.
#
# What travels: onnxruntime-gpu is larger than one call may carry, so it comes split in .ortgpu/part-* (joined and
# installed here into a folder put first on PYTHONPATH, shadowing the CPU build); small wheels (diffusers, ...) in
# .whl/. Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}" CONFIG="${CONFIG:-small}" SIZE="${SIZE:-1024}" STEPS="${STEPS:-20}"
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
if compgen -G ".ortgpu/part-*" > /dev/null; then
  mkdir -p /tmp/ortgpu-wheel
  cat .ortgpu/part-* > /tmp/ortgpu-wheel/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  "$PY" -m pip install -q --no-deps --target /opt/ortgpu /tmp/ortgpu-wheel/*.whl
  export PYTHONPATH="/opt/ortgpu${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-deps .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# CUDA and cuDNN of the nvidia-* packages are preloaded by the engine itself, in each process, before its first GPU
# session (engine/gpu_libraries.py): a preload here, in a separate process, would not reach the benchmark workers.
exec "$PY" -m benchmarks.bench --device "$DEVICE" --config "$CONFIG" --sizes "$SIZE" --steps "$STEPS" \
  --batches 1,4 --repeats "${REPEATS:-3}" --warmup 1 --only "${ONLY:-text,step,decode,e2e,throughput}" \
  --export-options '{"optimize": false, "precisions": ["fp16"]}' --variants benchmarks/gpu-variants.json \
  --out-dir "$OUT" --tag "gpu-$DEVICE" --no-progress
