"""Graph variants made after export: ONNX Runtime's offline transformer fusions, and int8 weights.

Each variant is a separate graph set listed in the manifest, so the engine (and the benchmark) can pick any of them
and the plain fp32 graphs stay available for runtimes that lack ONNX Runtime's contrib operators.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
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


def quantize_int8(path: Path, out: Path) -> Path:
    """Dynamic int8 quantization of MatMul weights (activations stay fp32, quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.unlink(missing_ok=True)
    external = path.with_name(path.name + ".data").exists()
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, use_external_data_format=external)
    return out
