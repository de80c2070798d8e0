"""Each exported graph matches its torch module in fp32, at several batch sizes, text lengths and sizes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from default_model.config import TRANSFORMER_CONFIG
from engine.positions import sincos_pos_embed

INNER_DIM = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]

CPU = ["CPUExecutionProvider"]


def _session(path):
    return ort.InferenceSession(str(path), providers=CPU)


@pytest.fixture(scope="module")
def components(default_checkpoint):
    from export.onnx_export import load_components

    return load_components(default_checkpoint)


@pytest.mark.parametrize("batch,length", [(1, 300), (2, 17), (3, 1)])
def test_text_encoder_matches_t5(default_export, components, batch, length):
    """The graph is stitched block by block (export.graphs.text_encoder); transformers' whole encoder is the
    reference."""
    from transformers import T5EncoderModel

    te = T5EncoderModel.from_pretrained(components["text_encoder"], torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(2, te.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, max(1, length // 3) :] = 0  # padding must be masked inside T5 too
    with torch.no_grad():
        ref = te(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    out = _session(default_export / "text_encoder.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


# (latent height, latent width): the 256x256, 192x336, 128x512 and 336x192 bins of the default's table, and a
# 1024x1024 latent (the graph takes any size; only the host's positional embedding knows the table)
@pytest.mark.parametrize(
    "batch,latent_hw,length",
    [(1, (32, 32), 300), (2, (24, 42), 20), (4, (16, 64), 5), (2, (42, 24), 300), (1, (128, 128), 40)],
)
def test_transformer_matches_diffusers_at_every_bin_shape(default_export, components, batch, latent_hw, length):
    """Non-base sizes prove the positional embedding follows the bin (a base-size trace would bake 64x64 in)."""
    from export.graphs.transformer import pos_embed_geometry

    tr = components["transformer"]
    g = torch.Generator().manual_seed(batch + length)
    h, w = latent_hw
    latents = torch.randn(batch, 4, h, w, generator=g)
    timestep = torch.tensor([999, 500, 20, 0][:batch], dtype=torch.int64)
    context = torch.randn(batch, length, tr.config.caption_channels, generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[-1, max(1, length // 2) :] = 0
    with torch.no_grad():
        ref = tr(latents, encoder_hidden_states=context, timestep=timestep, encoder_attention_mask=mask,
                 return_dict=False)[0].numpy()
    pos = sincos_pos_embed(tr.inner_dim, h // 2, w // 2, *pos_embed_geometry(tr))
    out = _session(default_export / "transformer.onnx").run(None, {
        "latents": latents.numpy(), "timestep": timestep.numpy().astype(np.float32),
        "encoder_hidden_states": context.numpy(), "encoder_attention_mask": mask.numpy(), "pos_embed": pos,
    })[0]
    assert out.shape == ref.shape == (batch, 8, h, w)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("batch,latent_hw", [(1, (64, 64)), (2, (24, 40))])
def test_vae_decoder_matches_diffusers(default_export, components, batch, latent_hw):
    vae = components["vae"]
    latents = torch.randn(batch, 4, *latent_hw, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ref = vae.decode(latents, return_dict=False)[0].numpy()
    out = _session(default_export / "vae_decoder.onnx").run(None, {"latents": latents.numpy()})[0]
    assert out.shape == (batch, 3, latent_hw[0] * 8, latent_hw[1] * 8)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_vae_decoder_with_mid_block_attention_matches_diffusers(tmp_path):
    # The default's VAE has no mid-block attention (docs/trained-default.md); SDXL's has, so its export is checked
    # here on a random VAE of the same tiny widths with the attention put back.
    from diffusers import AutoencoderKL

    from default_model.config import VAE_CONFIG
    from export.graphs.vae import export_vae_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(**{**VAE_CONFIG, "mid_block_add_attention": True}).eval()
    path = export_vae_decoder(vae, tmp_path / "vae_decoder.onnx")
    latents = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(latents, return_dict=False)[0].numpy()
    out = _session(path).run(None, {"latents": latents.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_host_position_embedding_equals_diffusers_for_every_bin(components, default_export):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    manifest = json.loads((default_export / "manifest.json").read_text())
    geometry = manifest["transformer"]["pos_embed"]
    base, scale = geometry["base_size"], geometry["interpolation_scale"]
    assert (base, scale) == (16.0, 0.5)  # sample_size 32 / patch 2, PixArt-Σ 256's stretch
    dim = 64  # the formula does not depend on width; small keeps this fast
    for h_px, w_px in manifest["aspect_ratio_bins"].values():
        rows, cols = h_px // 16, w_px // 16
        ref = get_2d_sincos_pos_embed(dim, (rows, cols), base_size=16, interpolation_scale=0.5, output_type="pt")
        np.testing.assert_allclose(sincos_pos_embed(dim, rows, cols, base, scale)[0], ref.float().numpy(), atol=2e-6)


def test_manifest_holds_what_the_runtime_needs(default_export, default_checkpoint):
    manifest = json.loads((default_export / "manifest.json").read_text())
    assert manifest["precision"] == "fp32"
    vae_config = json.loads((default_checkpoint / "vae" / "config.json").read_text())
    assert manifest["vae"]["scaling_factor"] == pytest.approx(vae_config["scaling_factor"])
    assert manifest["vae"]["scale_factor"] == 8
    assert manifest["scheduler"]["config"]["algorithm_type"] == "dpmsolver++"
    assert manifest["text_encoder"]["max_sequence_length"] == 300
    assert len(manifest["aspect_ratio_bins"]) == 33 and manifest["aspect_ratio_bins"]["1.0"] == [256, 256]
    assert {"torch", "diffusers", "transformers", "onnx"} <= set(manifest["versions"])
    listed = set(manifest["files"].values()) | {f for v in manifest["variants"].values() for f in v.values()}
    assert listed <= set(manifest["hashes"])
    for file_name, meta in manifest["hashes"].items():
        data = (default_export / file_name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], file_name
    assert (default_export / manifest["files"]["tokenizer"]).exists()


@pytest.mark.slow
def test_export_at_real_dimensions(tmp_path, monkeypatch):
    """A 1152-wide transformer with 16 heads of 72 and a 4096-wide T5 (one layer each, random weights) export,
    load and match torch; the T5 graph's weights stream to its `.data` file."""
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    import export.graphs.transformer as ox
    import export.onnx_io
    from export.graphs.text_encoder import export_text_encoder

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, num_layers=1, caption_channels=4096, sample_size=128,
        interpolation_scale=2, use_additional_conditions=False, cross_attention_dim=1152, out_channels=8,
    ).eval()
    te = T5EncoderModel(T5Config(vocab_size=512, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=1,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    # T5 (~0.9 GB) goes external, the transformer does not
    monkeypatch.setattr(export.onnx_io, "EXTERNAL_DATA_THRESHOLD", 500_000_000)
    ox.export_transformer(tr, tmp_path / "transformer.onnx")
    te.save_pretrained(tmp_path / "t5")
    export_text_encoder(tmp_path / "t5", tmp_path / "text_encoder.onnx")
    shutil.rmtree(tmp_path / "t5")
    assert (tmp_path / "text_encoder.onnx.data").stat().st_size > 500_000_000
    assert (tmp_path / "text_encoder.onnx").stat().st_size < 10_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_encoder.onnx", "text_encoder.onnx.data",
                                                          "transformer.onnx"]

    ids = torch.randint(2, 512, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.int64)
    mask[1, 10:] = 0
    with torch.no_grad():
        ref_text = te(input_ids=ids, attention_mask=mask).last_hidden_state
    out_text = _session(tmp_path / "text_encoder.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(out_text, ref_text.numpy(), atol=2e-4 * ref_text.abs().max().item())

    latents = torch.randn(2, 4, 48, 80)  # not the 64x64 base grid: 24x40 tokens
    timestep = torch.tensor([999, 10])
    with torch.no_grad():
        ref = tr(latents, encoder_hidden_states=ref_text, timestep=timestep, encoder_attention_mask=mask,
                 return_dict=False)[0].numpy()
    pos = sincos_pos_embed(1152, 24, 40, *ox.pos_embed_geometry(tr))
    out = _session(tmp_path / "transformer.onnx").run(None, {
        "latents": latents.numpy(), "timestep": timestep.numpy().astype(np.float32),
        "encoder_hidden_states": ref_text.numpy(), "encoder_attention_mask": mask.numpy(), "pos_embed": pos,
    })[0]
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_fused_graphs_match_the_plain_ones_and_fusions_landed(default_export, component):
    from export.optimize import op_counts

    manifest = json.loads((default_export / "manifest.json").read_text())
    fused_path = default_export / manifest["variants"]["optimized"][component]
    landed = manifest["fusions"][component]
    assert landed and all(n > 0 for n in landed.values())
    counts = op_counts(fused_path)
    assert all(counts[op] == n for op, n in landed.items())
    rng = np.random.default_rng(0)
    if component == "text_encoder":
        feeds = {"input_ids": rng.integers(2, 1000, (2, 32)), "attention_mask": np.ones((2, 32), np.int64)}
        feeds["attention_mask"][1, 5:] = 0
    else:
        feeds = {"latents": rng.standard_normal((2, 4, 96, 168), np.float32),
                 "timestep": np.array([999.0, 3.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 32, 48), np.float32),
                 "encoder_attention_mask": np.ones((2, 32), np.int64),
                 "pos_embed": sincos_pos_embed(INNER_DIM, 48, 84, 64.0, 2.0)}
    plain = _session(default_export / manifest["files"][component]).run(None, feeds)[0]
    fused = _session(fused_path).run(None, feeds)[0]
    np.testing.assert_allclose(fused, plain, atol=1e-5 * np.abs(plain).max())


def test_int8_transformer_runs_close_to_fp32(default_export, tmp_path):
    """int8 weights cost some accuracy (measured in the benchmark); here: the conversion runs and stays close."""
    from export.optimize import op_counts, quantize_int8

    q = quantize_int8(default_export / "transformer.onnx", tmp_path / "transformer.int8.onnx")
    assert op_counts(q)["DynamicQuantizeLinear"] > 0
    rng = np.random.default_rng(1)
    feeds = {"latents": rng.standard_normal((1, 4, 64, 64), np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 32, 48), np.float32),
             "encoder_attention_mask": np.ones((1, 32), np.int64),
             "pos_embed": sincos_pos_embed(INNER_DIM, 32, 32, 64.0, 2.0)}
    ref = _session(default_export / "transformer.onnx").run(None, feeds)[0]
    out = _session(q).run(None, feeds)[0]
    cosine = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cosine > 0.99 and not np.array_equal(out, ref)


def test_text_encoder_exports_from_a_sharded_checkpoint(default_checkpoint, default_export, tmp_path):
    """Real T5 checkpoints come in shards with an index: read tensor by tensor, the same graph comes out."""
    from transformers import T5EncoderModel

    from export.graphs.text_encoder import export_text_encoder

    t5 = T5EncoderModel.from_pretrained(default_checkpoint / "text_encoder", torch_dtype=torch.float32)
    t5.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    graph = export_text_encoder(tmp_path / "sharded", tmp_path / "text_encoder.onnx")
    feeds = {"input_ids": np.arange(2, 26, dtype=np.int64).reshape(2, 12), "attention_mask": np.ones((2, 12), np.int64)}
    feeds["attention_mask"][1, 7:] = 0
    out = _session(graph).run(None, feeds)[0]
    np.testing.assert_array_equal(out, _session(default_export / "text_encoder.onnx").run(None, feeds)[0])


def test_self_attention_is_fused_and_cross_attention_is_not(default_export):
    """The optimized transformer runs each block's self-attention as one MultiHeadAttention node (no token x token
    scores held); the masked cross-attention stays unfused (its scores are tokens x text). Numbers: the fused-graph
    test above and the parity tests run this graph."""
    import onnx

    from export.optimize import op_counts

    manifest = json.loads((default_export / "manifest.json").read_text())
    layers = manifest["transformer"]["config"]["num_layers"]
    counts = op_counts(default_export / manifest["variants"]["optimized"]["transformer"])
    assert counts["MultiHeadAttention"] == layers and counts["Softmax"] == layers
    assert op_counts(default_export / manifest["files"]["transformer"])["Softmax"] == 2 * layers  # plain: unfused
    model = onnx.load(str(default_export / manifest["variants"]["optimized"]["transformer"]))
    onnx.checker.check_model(model)  # topologically sorted, every input produced


def test_an_older_export_gains_fused_attention_in_place(default_checkpoint, tmp_path):
    from export.onnx_export import add_variants, export_model
    from export.optimize import op_counts

    export_model(default_checkpoint, tmp_path, optimize=False, precisions=["fp16"], progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    fp16 = tmp_path / manifest["variants"]["fp16"]["transformer"]
    layers = TRANSFORMER_CONFIG["num_layers"]
    assert op_counts(fp16)["MultiHeadAttention"] == layers  # new exports fuse the fp16 graph already
    assert add_variants(tmp_path, quantize_transformer=True) == {"transformer.opt.onnx": f"{layers} attentions fused",
                                                                 "transformer.fp16-int8.onnx": "int8 weights"}
    assert add_variants(tmp_path, quantize_transformer=True) == {}  # idempotent
    from engine import Engine, GenerationRequest

    request = GenerationRequest(prompt="a fox", seed=2, num_inference_steps=3, image_size=(256, 256))
    plain, fused = (Engine.load(tmp_path, ["CPUExecutionProvider"], variant=v).generate(request).images[0].pixels
                    for v in ("fp32", "optimized"))
    assert np.abs(plain.astype(int) - fused.astype(int)).max() <= 1


def shape_derived_floats(path) -> list[str]:
    """Nodes that make a floating-point value out of integers computed from a tensor's shape (Shape -> ... -> Cast
    to float, say): ONNX Runtime runs such integer arithmetic on the CPU, so on a GPU each one is a host-device copy
    at every run, and CUDA graph capture refuses the session. Nodes that only take a shape operand (Reshape's target,
    Expand's, Slice's bounds...) do not count."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    graph = model.graph
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    shape_operands = {"Reshape", "Expand", "Slice", "Tile", "ConstantOfShape", "Resize", "Pad", "Unsqueeze",
                      "Squeeze", "Gather", "Split", "Range"}
    seen: dict[str, bool] = {}

    def from_shape(name: str) -> bool:  # an integer value computed from a Shape
        if name not in seen:
            seen[name] = False
            node = producer.get(name)
            seen[name] = node is not None and types.get(name) not in floats and (
                node.op_type == "Shape" or any(from_shape(i) for i in node.input if i))
        return seen[name]

    return [n.name for n in graph.node if n.op_type not in shape_operands
            and any(types.get(o) in floats for o in n.output) and any(from_shape(i) for i in n.input if i)]


def test_no_float_of_the_transformer_depends_on_a_shape(default_export, components, tmp_path):
    """The attention scale is a constant in every transformer graph (plain, fused, fp16), and ONNX Runtime's basic
    rewrites bring no shape arithmetic back: a GPU session needs no copy for it, and CUDA graphs can capture."""
    from export.graphs import transformer as graph_module

    manifest = json.loads((default_export / "manifest.json").read_text())
    graphs = {default_export / files["transformer"] for files in [manifest["files"], *manifest["variants"].values()]}
    assert len(graphs) >= 2  # the plain graph and the fused one, at least
    options = ort.SessionOptions()  # the provider-independent rewrites (constant folding): the CPU's own are not
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # what a GPU session gets
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(default_export / manifest["files"]["transformer"]), options, providers=CPU)
    for graph in [*graphs, tmp_path / "optimized.onnx"]:
        assert shape_derived_floats(graph) == [], graph.name
    # what the check catches: the scale computed from the query's shape, as torch exports SDPA given none
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_module, "explicit_attention_scale", contextlib.nullcontext)
        computed = graph_module.export_transformer(components["transformer"], tmp_path / "computed_scale.onnx")
    assert len(shape_derived_floats(computed)) == 2 * TRANSFORMER_CONFIG["num_layers"]  # self- and cross-attention


def test_quantized_t5_for_cuda_keeps_fp16_activations(default_checkpoint, tmp_path):
    """The int8-fp16 T5: MatMulNBits weights with fp16 activations (CUDA's fast path; with fp32 activations it
    dequantizes and multiplies), the feed-forward output projections still fp32, close to the fp16 T5."""
    import onnx

    from export.graphs.text_encoder import export_text_encoder
    from export.onnx_export import check_options, quantized_text_encoder
    from export.optimize import QUANTIZATIONS

    check_options(quantize_text_encoder=["int4", "int8-fp16"])
    with pytest.raises(ValueError, match="int16"):
        check_options(quantize_text_encoder=["int16"])
    q, activations = quantized_text_encoder("int8-fp16")
    assert (q.bits, activations) == (8, "fp16") and quantized_text_encoder("int4") == (QUANTIZATIONS["int4"], "fp32")
    source = default_checkpoint / "text_encoder"
    half = export_text_encoder(source, tmp_path / "fp16.onnx", precision="fp16")
    quantized = export_text_encoder(source, tmp_path / "int8-fp16.onnx", precision=activations, quantization=q)
    model = onnx.load(str(quantized))
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    scales = [initializers[n.input[2]] for n in model.graph.node if n.op_type == "MatMulNBits"]
    layers = json.loads((source / "config.json").read_text())["num_layers"]
    assert scales.count(onnx.TensorProto.FLOAT16) > 0 and scales.count(onnx.TensorProto.FLOAT) == layers  # wo
    ids = np.array([[5, 7, 9, 11, 1]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    a, b = (_session(path).run(None, feeds)[0] for path in (half, quantized))
    assert np.isfinite(b).all() and float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
