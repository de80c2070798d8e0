"""Half-precision variants, proven on the CPU.

ONNX Runtime's CPU provider runs an fp16 graph by inserting casts to fp32 around nodes without fp16 kernels: fp16
storage, fp32 arithmetic. So these tests catch conversion mistakes, values that overflow or lose too much in fp16
storage, and misplaced fp32 islands, but not the rounding of fp16 accumulation on a GPU. bf16 has no CPU kernels:
its graph runs in onnx's reference evaluator (numpy, real bf16 rounding of every tensor), one step.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from default_model.config import TRANSFORMER_CONFIG
from engine import GenerationRequest
from engine.positions import sincos_pos_embed
from export.precision import cast_pairs, half_copy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
INNER_DIM = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]


@pytest.fixture(scope="module")
def half_export(default_checkpoint, tmp_path_factory):
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("half")
    export_model(default_checkpoint, out, precisions=("fp16", "bf16"), optimize=False, progress=False)
    return out


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def transformer_feeds(seed: int = 0, hw: tuple[int, int] = (32, 24)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = hw
    return {
        "latents": rng.standard_normal((2, 4, h, w), dtype=np.float32),
        "timestep": np.array([999.0, 250.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 32, 48), dtype=np.float32),
        "encoder_attention_mask": np.array([[1] * 9 + [0] * 23, [1] * 32], np.int64),
        "pos_embed": sincos_pos_embed(INNER_DIM, h // 2, w // 2, 16.0, 0.5),
    }


def test_variants_are_listed_with_what_stays_fp32(half_export):
    manifest = json.loads((half_export / "manifest.json").read_text())
    assert manifest["variants"]["fp16"] == {"text_encoder": "text_encoder.fp16.onnx",
                                            "transformer": "transformer.fp16.onnx"}
    assert manifest["variants"]["bf16"] == {"transformer": "transformer.bf16.onnx"}  # T5 stays fp32 (see export)
    assert manifest["precisions"]["fp16"]["vae_decoder"] == "fp32"
    for name in ("text_encoder.fp16.onnx", "transformer.fp16.onnx", "transformer.bf16.onnx"):
        model = onnx.load(str(half_export / name))
        assert cast_pairs(model) == 0, name
        for value in [*model.graph.input, *model.graph.output]:  # fp32 (or int64) in and out: no loop conversions
            assert value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64), name
        assert any(t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
                   for t in model.graph.initializer), name


def test_fp16_text_encoder_against_fp32_and_torch_fp16(half_export, default_checkpoint):
    from transformers import T5EncoderModel

    rng = np.random.default_rng(1)
    ids = rng.integers(2, 900, (2, 32), dtype=np.int64)
    mask = np.ones((2, 32), np.int64)
    mask[0, 12:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    fp32 = session(half_export / "text_encoder.onnx").run(None, feeds)[0]
    fp16 = session(half_export / "text_encoder.fp16.onnx").run(None, feeds)[0]
    keep = mask.astype(bool)
    a, b = fp32[keep], fp16[keep]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.isfinite(fp16).all() and cosine.min() > 0.9999
    t5 = T5EncoderModel.from_pretrained(default_checkpoint, subfolder="text_encoder").eval()
    t5_half = half_copy(t5, torch.float16, ("wo",))
    with torch.no_grad():
        ref = t5_half(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    ref = ref.float().numpy()[keep]
    assert np.abs(b - ref).max() < 0.02 * np.abs(ref).max()


def test_fp16_and_bf16_transformer_step(half_export, default_checkpoint):
    from diffusers import PixArtTransformer2DModel

    from export.graphs.transformer import TransformerGraph

    feeds = transformer_feeds()
    fp32 = session(half_export / "transformer.onnx").run(None, feeds)[0]
    fp16 = session(half_export / "transformer.fp16.onnx").run(None, feeds)[0]
    scale = np.abs(fp32).max()
    assert np.isfinite(fp16).all() and np.abs(fp16 - fp32).max() < 0.01 * scale
    from onnx.reference import ReferenceEvaluator

    bf16 = ReferenceEvaluator(str(half_export / "transformer.bf16.onnx")).run(None, feeds)[0]
    # bf16 keeps 8 significant bits: on the trained default 5.6% of the output's range at worst (cosine 0.9995;
    # `python -m benchmarks.precision --config tiny`), and as far from torch's own bf16 module
    assert np.isfinite(bf16).all() and np.abs(bf16 - fp32).max() < 0.08 * scale
    cosine = (bf16 * fp32).sum() / np.linalg.norm(bf16) / np.linalg.norm(fp32)
    assert cosine > 0.999
    # against diffusers' module in the same precision
    module = PixArtTransformer2DModel.from_pretrained(default_checkpoint, subfolder="transformer").eval()
    with torch.no_grad():
        torch_fp16 = TransformerGraph(half_copy(module, torch.float16))(
            *(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())).numpy()
    assert np.abs(fp16 - torch_fp16).max() < 0.01 * scale


def test_fp16_engine_images_match_fp32_at_two_bins(half_export):
    from engine import Engine

    fp32, fp16 = Engine.load(half_export, variant="fp32"), Engine.load(half_export, variant="fp16")
    for size in ((256, 256), (448, 256)):
        request = GenerationRequest(prompt="a red circle on a blue background", seed=1, num_inference_steps=10,
                                    image_size=size, num_images=2)
        a = np.stack([im.pixels for im in fp32.generate(request).images])
        b = np.stack([im.pixels for im in fp16.generate(request).images])
        assert psnr(a, b) > 50, size
