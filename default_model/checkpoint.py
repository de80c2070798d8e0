"""Writing PixArt-Σ-architecture checkpoints in diffusers format: the embedded default (its committed trained
weights, `build_default_model`) and seeded random ones of any configs (`build_checkpoint`, for benchmarks and tests).

`build_checkpoint` draws every parameter from one seeded generator, including those diffusers initialises to zero
or one, so that no path is silently inert in a parity test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from default_model.config import SCHEDULER_CONFIG, SEED, WEIGHTS


def build_default_model(out_dir: str | Path) -> Path:
    """Write the embedded default checkpoint (the committed trained weights, diffusers layout) to `out_dir`."""
    out = Path(out_dir)
    if not (WEIGHTS / "model_index.json").is_file():
        raise FileNotFoundError(f"{WEIGHTS} holds no checkpoint: the embedded default's weights are missing from this "
                                "checkout (python -m default_model.train rebuilds them)")
    shutil.copytree(WEIGHTS, out, dirs_exist_ok=True)
    return out


def build_checkpoint(out_dir: str | Path, transformer_config: dict, t5_config: dict, vae_config: dict,
                     seed: int = SEED, *, seeded_text_encoder: bool = False) -> Path:
    """A seeded random PixArt-Σ-architecture checkpoint with these configs: the default's tokenizer (trained on
    the shipped corpus), PixArt's scheduler, and every weight drawn in one order from one generator.

    `seeded_text_encoder`: write T5 as its config and a seed that the exporter draws weights from block by block
    (export.graphs.text_encoder.SeededWeights), instead of weights: T5-XXL without 19 GB of random numbers on disk."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from export.graphs.text_encoder import write_seeded_text_encoder
    from export.seeded import randomize
    from export.tokenizer import DEFAULT_CORPUS, train_t5_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(train_t5_tokenizer(DEFAULT_CORPUS, out / "tokenizer", seed=seed))
    t5_config = dict(t5_config)
    # The embedding table may be wider than the tokenizer (the real one is 32128 rows for 32100 pieces).
    t5_config["vocab_size"] = max(int(t5_config.get("vocab_size", 0)), len(tokenizer))
    g = torch.Generator().manual_seed(seed)
    text_encoder = None
    if not seeded_text_encoder:
        text_encoder = T5EncoderModel(T5Config(**t5_config)).eval()
        randomize(text_encoder, g)
    transformer = PixArtTransformer2DModel(**transformer_config).eval()
    randomize(transformer, g)
    vae = AutoencoderKL(**vae_config).eval()
    randomize(vae, g)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if seeded_text_encoder:
        write_seeded_text_encoder(out / "text_encoder", t5_config, seed)
        index = json.loads((out / "model_index.json").read_text())
        index["text_encoder"] = ["transformers", "T5EncoderModel"]
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
