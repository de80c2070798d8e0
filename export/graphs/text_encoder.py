"""T5's encoder to one ONNX graph, one block at a time, so that T5-XXL exports in a few GB of memory.

Tracing the whole encoder holds its weights twice (the module and the traced graph: 38 GB for T5-XXL in fp32), and
ONNX Runtime's quantizer holds about 1.75x a graph's weights. Here the encoder is cut where its blocks meet, and each
part is traced, optionally quantized, and appended to the output graph on its own, its weights written to the
`.data` file as it goes: memory peaks at one block (0.8 GB for T5-XXL in fp32), whatever the depth.

    head   (input_ids, attention_mask) -> hidden_0, attention_bias     token embedding; the relative position bias
                                                                         of block 0 plus the padding mask, once
    block i (hidden_i, attention_bias) -> hidden_{i+1}                  transformers' own T5Block
    tail   (hidden_N)                  -> last_hidden_state (fp32)      the final RMS norm

Adding the padding mask to the position bias once (instead of in every block) changes no kept score: the mask is 0
there, and masked scores stay at the dtype's minimum, which softmax sends to 0 either way.

Weights come from a checkpoint folder tensor by tensor (safetensors, memory-mapped), or, for the real-dimension
benchmark model that cannot be downloaded here, are drawn per block from a seed (`SeededWeights`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import torch
from onnx import TensorProto
from torch import nn

from export import onnx_io
from export.onnx_io import OPSET
from export.optimize import WeightOnly, weight_only

log = logging.getLogger(__name__)

# How an exported text encoder holds its weights: the modules' precision, and the MatMul weights' format.
PRECISIONS = ("fp32", "fp16")
# A seeded stand-in checkpoint: text_encoder/ holds config.json and this file instead of weights.
SEEDED_WEIGHTS_FILE = "seeded_weights.json"
INLINE_BYTES = 1024  # tensors up to this size stay inside the graph file
# What the installed ONNX Runtime reads (onnx writes newer IR versions by default than ORT 1.2x loads).
IR_VERSION = 10


# ---- where the weights come from ----------------------------------------------------------------------------------

class CheckpointWeights:
    """A transformers T5 checkpoint folder, read tensor by tensor (single or sharded safetensors)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        from transformers import T5Config

        self.config = T5Config.from_pretrained(folder)
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        if not all((folder / f).exists() for f in files):
            raise FileNotFoundError(f"{folder}: no safetensors weights (model.safetensors or a sharded index)")
        self._handles = [safe_open(str(folder / f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def tensor(self, name: str) -> torch.Tensor:
        if name == "shared.weight" and name not in self._where:
            name = "encoder.embed_tokens.weight"
        return self._where[name].get_tensor(name)

    def load(self, module: nn.Module, prefix: str) -> nn.Module:
        module.load_state_dict({k: self.tensor(prefix + k) for k in module.state_dict()}, assign=True)
        return module


class SeededWeights:
    """Random weights drawn block by block from a seed: the real-dimension stand-in for benchmarks (each part has
    its own generator, so no part needs another in memory). Scales as export.seeded.randomize."""

    def __init__(self, folder: Path):
        from transformers import T5Config

        self.config = T5Config.from_pretrained(folder)
        self.seed = int(json.loads((folder / SEEDED_WEIGHTS_FILE).read_text())["seed"])

    def load(self, module: nn.Module, prefix: str) -> nn.Module:
        from export.seeded import randomize

        module.to_empty(device="cpu")
        part = int.from_bytes(hashlib.sha256(f"{self.seed}/{prefix}".encode()).digest()[:7], "big")
        randomize(module, torch.Generator().manual_seed(part))
        return module


def open_weights(folder: str | Path) -> CheckpointWeights | SeededWeights:
    folder = Path(folder)
    return SeededWeights(folder) if (folder / SEEDED_WEIGHTS_FILE).exists() else CheckpointWeights(folder)


def write_seeded_text_encoder(folder: Path, config: dict, seed: int) -> Path:
    """A text_encoder/ folder whose weights SeededWeights draws at export: T5-XXL without 19 GB on disk."""
    from transformers import T5Config

    folder.mkdir(parents=True, exist_ok=True)
    T5Config(**config).save_pretrained(folder)
    (folder / SEEDED_WEIGHTS_FILE).write_text(json.dumps({"seed": seed}))
    return folder


# ---- the parts ---------------------------------------------------------------------------------------------------

class Head(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.models.t5.modeling_t5 import T5Attention

        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.attention = T5Attention(config, has_relative_attention_bias=True)
        for unused in ("q", "k", "v", "o"):  # only the relative position bias table is needed here
            setattr(self.attention, unused, nn.Identity())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed_tokens(input_ids)
        length = input_ids.shape[1]
        bias = self.attention.compute_bias(length, length)  # (1, heads, L, L) in the table's dtype
        padding = (1.0 - attention_mask[:, None, None, :].to(bias.dtype)) * torch.finfo(bias.dtype).min
        return hidden, bias + padding


class Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        return self.block(hidden, attention_mask=None, position_bias=attention_bias)[0]


class Tail(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden).float()  # fp32 out whatever the weights: the engine's loop stays in fp32


def _parts(weights, precision: str) -> Iterator[tuple[str, Callable[[], nn.Module]]]:
    """(name, build) per part, in order; `build` makes that part alone, weights loaded, in its precision."""
    from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm

    from export.precision import KEEP_FP32, half_copy

    config = weights.config
    config._attn_implementation = "eager"  # explicit ops: ONNX Runtime fuses them its own way
    half = precision == "fp16"

    def in_precision(module: nn.Module) -> nn.Module:
        return half_copy(module, torch.float16, KEEP_FP32) if half else module.eval()

    def head() -> nn.Module:
        with torch.device("meta"):  # no initialisation: the weights are loaded right after
            h = Head(config)
        weights.load(h.embed_tokens, "shared.")
        weights.load(h.attention.relative_attention_bias,
                     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.")
        return in_precision(h)

    yield "head", head
    for i in range(config.num_layers):
        def block(i: int = i) -> nn.Module:
            with torch.device("meta"):
                b = T5Block(config, has_relative_attention_bias=False, layer_idx=i)
            return in_precision(Block(weights.load(b, f"encoder.block.{i}.")))

        yield f"block{i}", block

    def tail() -> nn.Module:
        with torch.device("meta"):
            norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        return in_precision(Tail(weights.load(norm, "encoder.final_layer_norm.")))

    yield "tail", tail


# ---- tracing a part and appending it to the output graph ---------------------------------------------------------

def _trace(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic: dict) -> onnx.ModelProto:
    import warnings

    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's frozen-branch warnings; parity is tested against torch
        path = Path(scratch) / "part.onnx"
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
        return onnx.load(str(path))


class _GraphWriter:
    """Appends traced parts to one graph, renaming their inner names and streaming their weights to `.data`."""

    def __init__(self, path: Path):
        self.path, self.data_path = path, path.with_name(path.name + ".data")
        self.data = open(self.data_path, "wb")  # noqa: SIM115 (closed in finish)
        self.graph = onnx.GraphProto(name="text_encoder")
        self.opsets: dict[str, int] = {"": OPSET}
        self.producer = ("", "")

    def append(self, name: str, part: onnx.ModelProto, rename: dict[str, str]) -> None:
        def new(value: str) -> str:
            return value if not value else rename.get(value, f"{name}/{value}")

        self.producer = self.producer[0] or part.producer_name, self.producer[1] or part.producer_version
        for opset in part.opset_import:
            self.opsets[opset.domain] = max(self.opsets.get(opset.domain, 0), opset.version)
        for tensor in part.graph.initializer:
            tensor.name = new(tensor.name)
            self._externalize(tensor)
            self.graph.initializer.append(tensor)
        for node in part.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"{name}: a control-flow node ({node.op_type}) cannot be stitched")
            node.name = f"{name}/{node.name}"
            node.input[:] = [new(v) for v in node.input]
            node.output[:] = [new(v) for v in node.output]
            self.graph.node.append(node)

    def _externalize(self, tensor: TensorProto) -> None:
        if not tensor.HasField("raw_data"):  # typed fields: small constants, or re-encode as raw bytes
            array = onnx.numpy_helper.to_array(tensor)
            if array.nbytes <= INLINE_BYTES:
                return
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
        length = len(tensor.raw_data)
        if length <= INLINE_BYTES:
            return
        offset = self.data.tell()
        self.data.write(tensor.raw_data)
        self.data.write(b"\0" * (-length % 64))  # aligned, so ONNX Runtime can map tensors in place
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def finish(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> Path:
        self.data.close()
        self.graph.input.extend(inputs)
        self.graph.output.extend(outputs)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        # the parts' producer (torch's exporter): ONNX Runtime's optimizer picks its fusions by it
        model = onnx.helper.make_model(self.graph, opset_imports=opsets, ir_version=IR_VERSION,
                                       producer_name=self.producer[0], producer_version=self.producer[1])
        if self.data_path.stat().st_size <= onnx_io.EXTERNAL_DATA_THRESHOLD:  # one file is simpler where it fits
            onnx.load_external_data_for_model(model, str(self.path.parent))
            self.data_path.unlink()
            for tensor in model.graph.initializer:
                tensor.data_location = TensorProto.DEFAULT
                del tensor.external_data[:]
        self.path.write_bytes(model.SerializeToString())
        return self.path


def export_text_encoder(weights_folder: str | Path, path: Path, *, precision: str = "fp32",
                        quantization: WeightOnly | None = None, seq_len: int = 16) -> Path:
    """Export the T5 encoder of `weights_folder` (a checkpoint's text_encoder/) to `path` (+ `path.data`), its
    blocks in `precision` and, with `quantization`, their MatMul weights quantized block by block (the activations
    keep `precision`: fp16 ones are what CUDA's MatMulNBits runs fast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: one of {PRECISIONS}, not {precision!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = open_weights(weights_folder)
    writer = _GraphWriter(path)
    ids = torch.ones(2, seq_len, dtype=torch.int64)
    mask = torch.ones(2, seq_len, dtype=torch.int64)
    mask[1, seq_len // 2:] = 0
    batch_len = {0: "batch", 1: "text_len"}
    hidden = bias = None
    last = "hidden_0"
    with torch.no_grad():
        for name, build in _parts(weights, precision):
            module = build()
            if name == "head":
                part = _trace(module, (ids, mask), ["input_ids", "attention_mask"], ["hidden", "attention_bias"],
                              {"input_ids": batch_len, "attention_mask": batch_len, "hidden": batch_len,
                               "attention_bias": {0: "batch", 2: "text_len", 3: "text_len"}})
                hidden, bias = module(ids, mask)
                rename = {"input_ids": "input_ids", "attention_mask": "attention_mask", "hidden": last,
                          "attention_bias": "attention_bias"}
                inputs = [onnx.helper.make_tensor_value_info(v.name, TensorProto.INT64, ["batch", "text_len"])
                          for v in part.graph.input]
            elif name == "tail":
                part = _trace(module, (hidden,), ["hidden"], ["last_hidden_state"],
                              {"hidden": batch_len, "last_hidden_state": batch_len})
                rename = {"hidden": last, "last_hidden_state": "last_hidden_state"}
                outputs = [onnx.helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                              ["batch", "text_len", weights.config.d_model])]
            else:
                part = _trace(module, (hidden, bias), ["hidden", "attention_bias"], ["hidden_out"],
                              {"hidden": batch_len, "attention_bias": {0: "batch", 2: "text_len", 3: "text_len"},
                               "hidden_out": batch_len})
                hidden = module(hidden, bias)
                following = f"hidden_{int(name[5:]) + 1}"
                rename = {"hidden": last, "attention_bias": "attention_bias", "hidden_out": following}
                last = following
                if quantization is not None:
                    part = weight_only(part, quantization)
            del module
            writer.append(name, part, rename)
            del part
    return writer.finish(inputs, outputs)
