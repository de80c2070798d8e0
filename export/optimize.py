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
    """Dynamic int8 quantization of MatMul weights (activations stay fp32, quantized per call).

    Weights use 7 of their 8 bits (`reduce_range`): on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
    ONNX Runtime's u8 x s8 kernel sums pairs of products in 16 bits and saturates; measured on the default model's
    transformer on an AVX2-only EPYC, cosine to fp32 0.967 with 8-bit weights and 0.995 with 7."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.unlink(missing_ok=True)
    external = path.with_name(path.name + ".data").exists()
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, reduce_range=True, use_external_data_format=external)
    return out


def fuse_attention_file(path: Path, out: Path, num_heads: int) -> int:
    """Write `path` with its self-attention fused (fuse_self_attention) to `out`, which may be `path`; return how
    many. Only nodes change: a graph whose weights live in a side file keeps reading that file, so the 2.4 GB
    transformer of the real model costs no copy."""
    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_self_attention(model, num_heads)
    out.write_bytes(model.SerializeToString())
    return fused


def _attribute(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def fuse_self_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Replace each unmasked scaled-dot-product attention (the DiT's self-attention, as torch exports SDPA) by one
    com.microsoft.MultiHeadAttention node; return how many. ONNX Runtime's own optimizer does not match this
    pattern, and unfused, every block materialises (rows, heads, tokens, tokens) fp32 scores: 1 GB per row at
    1024², where the fused kernel (flash attention on CPU and CUDA) keeps tiles.

        q_in -> Reshape -> Transpose(0,2,1,3) -> Mul(s) --+
                                                          MatMul -> Softmax -> MatMul -> Transpose(0,2,1,3)
        k_in -> Reshape -> Transpose(0,2,3,1) -> Mul(s) --+                     |         -> Reshape -> out
        v_in -> Reshape -> Transpose(0,2,1,3) -------------------------------------+

    becomes MultiHeadAttention(q_in, k_in, v_in) -> out, its scale 1/sqrt(head size) = s*s (SDPA's default).
    Masked attention (the cross-attention: an Add before the Softmax) is left as it is: its scores are
    tokens x text, small."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(name: str, op: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def head_input(name: str, perm: list[int], scaled: bool) -> str | None:
        """The (B, N, C) tensor a head-split branch starts from, when the branch has the expected shape."""
        if scaled:
            mul = made_by(name, "Mul")
            if mul is None:
                return None
            name = mul.input[0]
        transpose = made_by(name, "Transpose")
        if transpose is None or list(_attribute(transpose, "perm") or []) != perm:
            return None
        reshape = made_by(transpose.input[0], "Reshape")
        return reshape.input[0] if reshape is not None else None

    fused = []
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        scores = made_by(softmax.input[0], "MatMul")
        weighted = only_consumer(softmax.output[0], "MatMul")
        if scores is None or weighted is None or weighted.input[0] != softmax.output[0]:
            continue
        q = head_input(scores.input[0], [0, 2, 1, 3], scaled=True)
        k = head_input(scores.input[1], [0, 2, 3, 1], scaled=True)
        v = head_input(weighted.input[1], [0, 2, 1, 3], scaled=False)
        merge = only_consumer(weighted.output[0], "Transpose")
        out = only_consumer(merge.output[0], "Reshape") if merge is not None else None
        if None in (q, k, v, out) or list(_attribute(merge, "perm") or []) != [0, 2, 1, 3]:
            continue
        fused.append(onnx.helper.make_node("MultiHeadAttention", [q, k, v], [out.output[0]],
                                           name=softmax.name.replace("Softmax", "MultiHeadAttention"),
                                           domain="com.microsoft", num_heads=num_heads))
        out.output[0] = out.output[0] + "/unfused"  # its old producer is now dead code
    if fused:
        graph.node.extend(fused)
        _sort_and_prune(model)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def _sort_and_prune(model: onnx.ModelProto) -> None:
    """Drop nodes nothing reads (the unfused attention) and put the rest in topological order (appended nodes
    come after their consumers)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    live: dict[int, onnx.NodeProto] = {}
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in live:
            live[id(node)] = node
            stack.extend(i for i in node.input if i)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered: list[onnx.NodeProto] = []
    pending = [n for n in graph.node if id(n) in live]
    while pending:
        waiting = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError("a node's input has no producer after fusing attention")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
