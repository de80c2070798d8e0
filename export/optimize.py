"""Graph variants made after export: ONNX Runtime's offline transformer fusions, int8 weights with dynamically
quantized activations, and block-wise weight-only int8/int4 (MatMulNBits).

Each variant is a separate graph set listed in the manifest, so the engine (and the benchmark) can pick any of them
and the plain fp32 graphs stay available for runtimes that lack ONNX Runtime's contrib operators.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from export.onnx_io import save_model

log = logging.getLogger(__name__)

# Which optimizer pattern set fits which graph: the DiT blocks are BERT-like (LayerNorm, residual adds, tanh GELU),
# the text encoder is T5 (RMSNorm, gated GELU).
MODEL_TYPES = {"transformer": "bert", "text_encoder": "t5"}
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "FastGelu", "BiasGelu",
             "Gelu", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasAdd")


def op_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def fuse(path: Path, out: Path, component: str, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Apply ONNX Runtime's transformer fusions to one graph; return how many fused nodes of each kind landed."""
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(str(path), model_type=MODEL_TYPES[component], num_heads=num_heads,
                                   hidden_size=hidden_size, opt_level=0, use_gpu=False)
    external = path.with_name(path.name + ".data").exists()
    if not any(o.domain == "com.microsoft" for o in optimized.model.opset_import):
        # the fused nodes live in ONNX Runtime's contrib domain; declare it so other tools can read the graph
        optimized.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    save_model(optimized.model, out, external)
    counts = Counter(n.op_type for n in optimized.model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


@dataclass(frozen=True)
class WeightOnly:
    """Block-wise weight-only quantization of the MatMul weights (ONNX Runtime's MatMulNBits, CPU and CUDA).

    `accuracy_level` 4 lets the CPU kernel multiply in int8 (activations quantized per block on the fly): 3x faster
    int8 encodes on CPU for a small extra error (see benchmarks/quantization.py for the figures)."""

    bits: int
    block_size: int
    accuracy_level: int = 4

    @property
    def name(self) -> str:
        return f"int{self.bits}"


QUANTIZATIONS = {"int4": WeightOnly(4, 32), "int8": WeightOnly(8, 128)}


def weight_only(part: onnx.ModelProto, q: WeightOnly) -> onnx.ModelProto:
    """`part` with its constant-weight MatMuls replaced by MatMulNBits (in memory: give it one block of T5, or
    a graph under 2 GB)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per op
    config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=True,
                                          accuracy_level=q.accuracy_level, bits=q.bits)
    quantizer = MatMulNBitsQuantizer(part, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def quantize_weights(path: Path, out: Path, q: WeightOnly) -> Path:
    """Weight-only quantization of a whole graph file (under 2 GB: the transformer), activations untouched."""
    save_model(weight_only(onnx.load(str(path)), q), out, external=False)
    return out


def quantize_int8(path: Path, out: Path) -> Path:
    """Dynamic int8 quantization of MatMul weights (activations stay fp32, quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.unlink(missing_ok=True)
    external = path.with_name(path.name + ".data").exists()
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, use_external_data_format=external)
    return out
