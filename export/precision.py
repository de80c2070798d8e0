"""Cast helpers of the half-precision variants: torch modules cast to fp16/bf16 with fp32 islands (the variants are
exported by export.onnx_export.export_half), and a count of the float casts an exported graph chains.

What stays fp32, and why (each measured: tests/export/test_precision.py and benchmarks/precision.py):
* Inputs and outputs of every graph: the engine's loop, the samplers and the VAE stay fp32, with no conversions.
* T5's feed-forward output projections (`wo`) and so its residual stream: T5's feed-forward activations overflow
  fp16 (transformers keeps `wo` in fp32 for that reason); with `wo` in fp32, each block's output is fp32 and the
  residual sum with it, while the attention and the gated feed-forward run in half precision.
* Index and embedding arithmetic: T5's relative-position buckets (computed from float32 in transformers), the
  transformer's sinusoidal timestep embedding (computed in fp32 by diffusers before its linear layers).
* The VAE decoder: the SDXL VAE produces NaNs in fp16 at large sizes; the variants use the fp32 decoder.

Exporting the cast torch modules (rather than converting the fp32 ONNX graphs) keeps these islands where the
modeling code puts them; ONNX Runtime's converter would also convert the bucket and timestep arithmetic.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
KEEP_FP32 = ("wo",)  # T5's feed-forward output projections
# Which precisions the text encoder is exported in: torch's TorchScript exporter fails on transformers' T5 in bf16
# ("ScalarType ComplexDouble is an unexpected tensor scalar type"), so the bf16 variant keeps the fp32 T5.
T5_HALF = ("fp16",)


def half_copy(module: nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """A copy of `module` in `dtype`; submodules named in `keep_fp32` (full dotted name, or its last part) stay fp32."""
    half = copy.deepcopy(module).to(dtype)
    for name, sub in half.named_modules():
        if name in keep_fp32 or name.rsplit(".", 1)[-1] in keep_fp32:
            sub.float()
    return half.eval()


FLOAT_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


def cast_pairs(model) -> int:
    """Float precision conversions straight into another one (fp32 -> fp16 -> fp32 and the like): rounding the
    graph should not carry. (Integer shape arithmetic has Cast(int64) pairs that ONNX Runtime folds; not counted.)"""
    from onnx import helper

    def target(node) -> int:
        return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "to")

    producers = {out: node for node in model.graph.node for out in node.output}
    pairs = 0
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if source is not None and source.op_type == "Cast" and target(node) in FLOAT_TYPES \
                and target(source) in FLOAT_TYPES:
            pairs += 1
    return pairs
