"""The embedded default model's configs: a tiny PixArt-Σ-architecture checkpoint in diffusers format, trained here
on simple procedural scenes (default_model/train.py) and committed in default_model/weights (a few MB).

Widths are tiny so that everything runs on a laptop CPU in seconds, but the layout is the real one where it changes
behaviour: `sample_size` 32 with `interpolation_scale` 0.5, the layout of PixArt-Σ's 256 checkpoint (so the 256 bin
table and the stretched positional embedding apply, and a 1024² request computes at 256² and is resized back),
learned sigma (8 output channels), four VAE blocks (scale factor 8), a gated-GELU T5 with relative attention
buckets, and PixArt's scheduler config. One departure: the VAE has no mid-block attention, so that it could be
trained on small whole pictures and still decode any size (tests export an attention VAE separately).
A real checkpoint goes through the same export and engine.
"""

from __future__ import annotations

from pathlib import Path

SEED = 20240401
WEIGHTS = Path(__file__).resolve().parent / "weights"  # the committed trained checkpoint

TRANSFORMER_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=4,
    cross_attention_dim=64,
    attention_bias=True,
    sample_size=32,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=0.5,
    use_additional_conditions=False,
    caption_channels=48,
)
T5_CONFIG = dict(
    d_model=48,
    d_kv=12,
    d_ff=96,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=1024,
    scaling_factor=0.13025,  # training measures the trained VAE's own
    force_upcast=False,
    mid_block_add_attention=False,
)
# PixArt-Σ's published scheduler_config.json (docs/pixart-sigma.md §1.5), with the defaults it relies on spelled out.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_lu_lambdas=False,
    lambda_min_clipped=-float("inf"),
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    timestep_spacing="linspace",
    steps_offset=0,
    variance_type=None,
    final_sigmas_type="zero",
)
