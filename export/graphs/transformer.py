"""The PixArt-Σ transformer as one ONNX graph, and as three (head, body, tail) for the step cache's blocks mechanism.

Design of the positional embedding (docs/pixart-sigma.md §5): it is a graph *input* of the transformer, computed on
the host by `engine.positions.sincos_pos_embed` in float64 exactly as diffusers does, once per size bin. Tracing
diffusers' PatchEmbed at one size bakes that size's embedding into the graph; an input keeps one graph right at
every bin, keeps float64 trigonometry out of the graph (TensorRT has none), and costs one cached array per bin.

The transformer's forward is re-stated here over diffusers' own submodules (patch projection, AdaLayerNormSingle,
caption projection, the blocks, the final modulation) so that the graph has no Python branches resolved at trace
time: the mask stays rank 2 and becomes the −10000 bias inside the graph, and unpatchify is a plain permute (no
`squeeze(1)`, which TorchScript turns into a shape-disagreeing `If` at the real width).

Attention is exported with its scale as a constant (`explicit_attention_scale`): diffusers calls
`F.scaled_dot_product_attention` without one, and TorchScript's export then computes 1/sqrt(head size) from the
query's shape at run time (Shape -> Slice -> Cast -> Sqrt -> Div -> Sqrt -> Mul, per attention). ONNX Runtime places
that integer arithmetic on the CPU and copies its result to the GPU at every step, and CUDA graph capture refuses a
session with such copies.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.positions import sincos_pos_embed
from export.onnx_io import export_graph


class TransformerGraph(nn.Module):
    """PixArtTransformer2DModel.forward with the positional embedding as an input (see module docstring), in three
    stages that the transformer's parts (TransformerHead, TransformerBody, TransformerTail) export one by one."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.t = transformer

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              encoder_attention_mask: torch.Tensor, pos_embed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tokens (B, N, D), the blocks' timestep modulation (B, 6D), the final layer's embedded timestep (B, D),
        the projected caption (B, L, D) and the mask as an additive bias (B, 1, L)."""
        t = self.t
        dtype, conv_dtype = t.proj_out.weight.dtype, t.pos_embed.proj.weight.dtype
        if dtype != torch.float32:  # fp32 inputs and output; inside, the weights' precision (see export.precision)
            latents = latents.to(conv_dtype)
            encoder_hidden_states, pos_embed = encoder_hidden_states.to(dtype), pos_embed.to(dtype)
        x = t.pos_embed.proj(latents).flatten(2).transpose(1, 2).to(dtype) + pos_embed
        bias = ((1 - encoder_attention_mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        t6, embedded_t = t.adaln_single(
            timestep, {"resolution": None, "aspect_ratio": None}, batch_size=latents.shape[0], hidden_dtype=x.dtype
        )
        return x, t6, embedded_t, t.caption_projection(encoder_hidden_states), bias

    def blocks(self, x: torch.Tensor, t6: torch.Tensor, context: torch.Tensor, bias: torch.Tensor,
               start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in self.t.transformer_blocks[start:stop]:
            x = block(x, encoder_hidden_states=context, encoder_attention_mask=bias, timestep=t6)
        return x

    def unpatchify(self, x: torch.Tensor, embedded_t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The final modulation and projection, back to (B, out_channels, h, w) at the latents' size."""
        t, p = self.t, self.t.config.patch_size
        b, h, w = latents.shape[0], latents.shape[2] // p, latents.shape[3] // p
        shift, scale = (t.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        x = t.proj_out(t.norm_out(x) * (1 + scale) + shift)
        x = x.reshape(b, h, w, p, p, t.out_channels).permute(0, 5, 1, 3, 2, 4)
        x = x.reshape(b, t.out_channels, h * p, w * p)
        return x if x.dtype == torch.float32 else x.float()

    def forward(
        self,
        latents: torch.Tensor,  # (B, 4, h, w)
        timestep: torch.Tensor,  # (B,) float
        encoder_hidden_states: torch.Tensor,  # (B, L, caption_channels)
        encoder_attention_mask: torch.Tensor,  # (B, L) int64, 1 = keep
        pos_embed: torch.Tensor,  # (1, h/p * w/p, inner_dim)
    ) -> torch.Tensor:
        x, t6, embedded_t, context, bias = self.embed(latents, timestep, encoder_hidden_states,
                                                      encoder_attention_mask, pos_embed)
        return self.unpatchify(self.blocks(x, t6, context, bias), embedded_t, latents)


class TransformerHead(TransformerGraph):
    """The first `head_blocks` blocks and what every block needs: the part that runs for every row when the body's
    work may be cached (engine.transformer_parts). Also returns the head's residual, the signal its decision reads."""

    def __init__(self, transformer: nn.Module, head_blocks: int):
        super().__init__(transformer)
        self.head_blocks = head_blocks

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor, pos_embed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, t6, embedded_t, context, bias = self.embed(latents, timestep, encoder_hidden_states,
                                                      encoder_attention_mask, pos_embed)
        hidden = self.blocks(x, t6, context, bias, 0, self.head_blocks)
        return hidden, hidden - x, t6, embedded_t, context, bias


class TransformerBody(TransformerGraph):
    """The blocks after the head's."""

    def __init__(self, transformer: nn.Module, head_blocks: int):
        super().__init__(transformer)
        self.head_blocks = head_blocks

    def forward(self, hidden: torch.Tensor, t6: torch.Tensor, context: torch.Tensor, bias: torch.Tensor
                ) -> torch.Tensor:
        return self.blocks(hidden, t6, context, bias, self.head_blocks)


class TransformerTail(TransformerGraph):
    """The final norm, modulation and projection; `latents` only gives the output's size."""

    def forward(self, hidden: torch.Tensor, embedded_timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.unpatchify(hidden, embedded_timestep, latents)


def export_transformer(transformer: nn.Module, path: Path, latent_hw: tuple[int, int] = (16, 24)) -> Path:
    cfg = transformer.config
    h, w = latent_hw
    p = cfg.patch_size
    pos = sincos_pos_embed(transformer.inner_dim, h // p, w // p, *pos_embed_geometry(transformer))
    args = (
        torch.randn(2, cfg.in_channels, h, w),
        torch.tensor([999.0, 500.0]),
        torch.randn(2, 7, cfg.caption_channels),
        torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.int64),
        torch.from_numpy(pos.copy()),  # the cached array is read-only
    )
    with explicit_attention_scale():
        return export_graph(
            TransformerGraph(transformer),
            args,
            path,
            inputs=["latents", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pos_embed"],
            outputs=["noise_pred"],
            dynamic={
                "latents": {0: "batch", 2: "height", 3: "width"},
                "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "text_len"},
                "encoder_attention_mask": {0: "batch", 1: "text_len"},
                "pos_embed": {1: "tokens"},
                "noise_pred": {0: "batch", 2: "height", 3: "width"},
            },
        )


def export_transformer_parts(transformer: nn.Module, folder: Path, head_blocks: int = 1,
                             latent_hw: tuple[int, int] = (16, 24)) -> dict[str, Path]:
    """The transformer as head, body and tail graphs (engine.manifest.TRANSFORMER_PARTS), for first-block-residual
    caching (engine.transformer_parts): `transformer_<part>.onnx` in `folder`. Together they compute what the one
    graph computes."""
    if not 0 < head_blocks < len(transformer.transformer_blocks):
        raise ValueError(f"head_blocks: between 1 and {len(transformer.transformer_blocks) - 1}, not {head_blocks}")
    cfg, d = transformer.config, transformer.inner_dim
    h, w = latent_hw
    p = cfg.patch_size
    pos = sincos_pos_embed(d, h // p, w // p, *pos_embed_geometry(transformer))
    latents = torch.randn(2, cfg.in_channels, h, w)
    head_args = (latents, torch.tensor([999.0, 500.0]), torch.randn(2, 7, cfg.caption_channels),
                 torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.int64), torch.from_numpy(pos.copy()))
    head = TransformerHead(transformer, head_blocks)
    with torch.no_grad():
        hidden, _, t6, embedded_t, context, bias = head(*head_args)
    rows = {0: "batch"}
    tokens, text = {0: "batch", 1: "tokens"}, {0: "batch", 1: "text_len"}
    graphs = {
        "transformer_head": (head, head_args,
                             ["latents", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pos_embed"],
                             ["hidden", "head_residual", "t6", "embedded_timestep", "context", "bias"],
                             {"latents": {0: "batch", 2: "height", 3: "width"}, "timestep": rows,
                              "encoder_hidden_states": text, "encoder_attention_mask": text,
                              "pos_embed": {1: "tokens"}, "hidden": tokens, "head_residual": tokens, "t6": rows,
                              "embedded_timestep": rows, "context": text, "bias": {0: "batch", 2: "text_len"}}),
        "transformer_body": (TransformerBody(transformer, head_blocks), (hidden, t6, context, bias),
                             ["hidden", "t6", "context", "bias"], ["hidden_out"],
                             {"hidden": tokens, "t6": rows, "context": text, "bias": {0: "batch", 2: "text_len"},
                              "hidden_out": tokens}),
        "transformer_tail": (TransformerTail(transformer), (hidden, embedded_t, latents),
                             ["hidden", "embedded_timestep", "latents"], ["noise_pred"],
                             {"hidden": tokens, "embedded_timestep": rows,
                              "latents": {0: "batch", 2: "height", 3: "width"},
                              "noise_pred": {0: "batch", 2: "height", 3: "width"}}),
    }
    files = {}
    with explicit_attention_scale():
        for name, (module, args, inputs, outputs, dynamic) in graphs.items():
            files[name] = export_graph(module, args, folder / f"{name}.onnx", inputs=inputs, outputs=outputs,
                                       dynamic=dynamic)
    return files


@contextlib.contextmanager
def explicit_attention_scale() -> Iterator[None]:
    """While tracing: scaled_dot_product_attention gets scale = 1/sqrt(head size) as a number (its default value),
    so the exported graph holds a constant instead of computing it from tensor shapes."""
    sdpa = F.scaled_dot_product_attention

    def with_scale(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, *args, scale: float | None = None, **kwargs
                   ) -> torch.Tensor:
        if scale is None:
            scale = 1.0 / math.sqrt(int(query.shape[-1]))
        if query.dtype == torch.bfloat16:  # TorchScript's SDPA symbolic fails on a number scale with bf16 tensors
            return spelled_out_attention(query, key, value, attn_mask, scale, *args, **kwargs)
        return sdpa(query, key, value, attn_mask, *args, scale=scale, **kwargs)

    F.scaled_dot_product_attention = with_scale
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def spelled_out_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None, scale: float, dropout_p: float = 0.0,
                          is_causal: bool = False) -> torch.Tensor:
    """The ops torch's SDPA symbolic emits for an additive mask (q and k each scaled by sqrt(scale), as torch does
    for stability), written in torch so that they trace in any dtype."""
    if dropout_p or is_causal or (attn_mask is not None and attn_mask.dtype == torch.bool):
        raise NotImplementedError("export: attention with dropout, a causal or a boolean mask")
    root = math.sqrt(scale)
    scores = (query * root) @ (key * root).transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


def pos_embed_geometry(transformer: nn.Module) -> tuple[float, float]:
    """(base_size, interpolation_scale) of diffusers' PatchEmbed, read from the built module itself."""
    pe = transformer.pos_embed
    return float(pe.base_size), float(pe.interpolation_scale)
