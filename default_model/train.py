"""Train the embedded default model on the procedural scenes of default_model.scenes and write it as a diffusers
checkpoint.

    python -m default_model.train [--out default_model/weights]

Four stages, all from one seed on the CPU (two threads by default; minutes per stage in training.json):
1. a T5 tokenizer trained on the default corpus plus scene captions, so that every word of the scene grammar is
   one piece (a colour split into sub-words must be reassembled by T5 before the transformer can use it);
2. the KL VAE on whole rendered 64² scenes (L1 + MSE weighted toward the objects, a small KL term), half of each
   batch decoded from extrapolated latents (below); its latent scale is then measured and written as
   `scaling_factor`, as Stable Diffusion's was;
3. the scenes of the transformer's data set are rendered at several 256-table aspect-ratio bins and encoded once
   (posterior means), so the denoiser never waits for the VAE;
4. the PixArt-Σ transformer and the T5 encoder together on those latents: DDPM loss on the linear-beta schedule
   of SCHEDULER_CONFIG with v-prediction targets, half of each batch at the noisiest timesteps, object pixels
   weighted, a fresh caption per example and step, 10% of captions dropped to the empty text (the unconditional
   branch of classifier-free guidance); the saved weights are the exponential moving average.

Why these choices (each measured here, see docs/trained-default.md):
- The encoder's log-variance starts at -8 (noise std 0.02): from the usual 0, the decoder sees latents drowned in
  unit noise and Adam lowers that bias by about lr per step, so for thousands of steps it learns only the mean colour.
- v-prediction, not epsilon (the checkpoint's scheduler says `prediction_type: v_prediction`; the engine's and
  diffusers' samplers read it): a sampler builds a picture's layout from the first steps' estimate of the clean
  latent, and the estimate implied by a predicted epsilon divides its error by sqrt(alpha_bar) (~0.02 at t=900).
  A tiny epsilon model therefore drew the same layout for every prompt of a seed; with v the estimate is
  well-conditioned at every noise level and the caption matters from the first few hundred steps.
- Half of each batch comes from the noisiest 40% of timesteps: the caption decides the picture only where the
  noisy latent does not show it yet. Object pixels count 5x (objects cover a few percent of a scene), and the
  text's path (T5, the caption projection, cross-attention) learns at 3x the rate (10x was measured worse: the
  caption's benefit at t=850 stalled and pictures stayed noise-like).
- T5 is trained with the transformer rather than frozen: a random 48-wide T5 mixes neighbouring words too weakly
  for "red circle on blue" and "blue circle on red" to come apart.
- The VAE learns to decode z + s (z - reference) as z, for s up to GUIDANCE_REACH and a reference that is a
  recoloured twin of the scene or the flat mean of z. Classifier-free guidance extrapolates in latent space
  (guidance 4.5 moves the estimate 3.5 times the distance from the unconditional estimate to the conditional one),
  and a VAE trained on reconstruction alone maps such latents to other colours: with the previous weights, an
  encoded orange star pushed 1.5x its distance from the flat mean decoded yellow, 3x white, and a blue square black
  then dark red (held-out object colours read back right: 92% reconstructed, 17% at reach 1, 14% at 3.5), which is
  why guidance made that model worse. Trained this way: 75%, 69%, 61%, at some cost to reconstruction.
The transformer keeps PixArt's learned-sigma layout (8 output channels). Neither sampler in the engine (nor diffusers'
PixArt-Σ pipeline) reads the variance half, so it is not trained: its output rows keep their initial values.
Training is never part of `make run`: the weights it writes are committed (default_model/weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from default_model import scenes
from default_model.config import SCHEDULER_CONFIG, SEED, T5_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, WEIGHTS

# (height, width) bins of the 256 table the transformer sees: square, and both ways round at 3:4-ish, 3:5 and 1:2,
# so that a portrait or landscape request is in distribution after binning
TRAIN_BINS = ((256, 256), (224, 288), (288, 224), (192, 320), (320, 192), (176, 352), (352, 176))
VAE_SIDE = 64  # the VAE trains on whole 64² pictures, a sixteenth of the cost of 256²
TEXT_TOKENS = 40  # longer than any caption of the grammar
NOISY_FRACTION = 0.4  # half of each batch is drawn from the noisiest 40% of timesteps
PROBE_T = 850  # where the latent alone barely shows the layout (alpha_bar 0.0007)
PREDICTION = "v_prediction"
GUIDANCE_REACH = 3.5  # the VAE decodes z + s (z - reference) as z for s up to this: guidance 4.5 is s = 3.5
TOKENIZER_CAPTIONS = 4000


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cosine(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pictures_to_tensor(images: list[np.ndarray]):
    """(H, W, 3) uint8 pictures -> a (B, 3, H, W) float batch in [-1, 1], as the VAE takes them."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_tokenizer(out_dir: Path, rng: np.random.Generator, seed: int) -> Path:
    """The default corpus plus captions of random scenes, so the grammar's words are whole pieces."""
    from export.tokenizer import DEFAULT_CORPUS, train_t5_tokenizer

    lines = DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines()
    lines += [scenes.caption(rng, scenes.random_scene(rng)) for _ in range(TOKENIZER_CAPTIONS)]
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train_t5_tokenizer(corpus, out_dir / "tokenizer", seed=seed)


def train_vae(vae, rng: np.random.Generator, steps: int, lr: float = 2e-3, batch: int = 16,
              extrapolation: float = GUIDANCE_REACH) -> None:
    import torch

    latent = vae.config.latent_channels
    with torch.no_grad():  # see the module docstring: start with little posterior noise
        vae.quant_conv.weight[latent:] *= 0.1
        vae.quant_conv.bias[latent:] = -8.0
    # Whole small pictures: the VAE is fully convolutional (no mid-block attention), so what it learns at 64²
    # decodes any size. A pool, because rendering costs as much as a step of this tiny VAE. Each scene comes with
    # a recoloured twin: the reference that half of each batch is extrapolated away from (module docstring).
    pool = []
    for _ in range(4000):
        scene = scenes.random_scene(rng)
        pool.append((scenes.render(scene, VAE_SIDE, VAE_SIDE), scenes.render(_recoloured(scene, rng), VAE_SIDE,
                                                                            VAE_SIDE)))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    half = batch // 2
    for step in range(steps):
        picked = [pool[int(i)] for i in rng.integers(len(pool), size=batch)]
        x = pictures_to_tensor([p for p, _ in picked])
        twin = pictures_to_tensor([t for _, t in picked[half:]])
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, lr, 50)
        posterior = vae.encode(torch.cat([x, twin])).latent_dist
        z = posterior.sample()
        z, z_twin = z[:batch], z[batch:]
        # the second half: z + s (z - reference), s up to `extrapolation`, must still decode to x; the reference
        # is the twin's latent or, for half of them, the flat mean of z (what an unconditional estimate is early on)
        reference = torch.where(torch.from_numpy(rng.random(batch - half) < 0.5).view(-1, 1, 1, 1),
                                z[half:].mean((2, 3), keepdim=True).expand_as(z_twin), z_twin)
        reach = torch.from_numpy(rng.uniform(0, extrapolation, batch - half).astype(np.float32)).view(-1, 1, 1, 1)
        z = torch.cat([z[:half], z[half:] + reach * (z[half:] - reference)])
        recon = vae.decode(z).sample
        rec = (_object_weight(x) * ((recon - x).abs() + (recon - x) ** 2)).mean()
        kl = posterior.kl()[:batch].mean() / x[0].numel()
        # enough KL to keep latents near unit scale without outliers, so one scaling_factor suits every picture
        loss = rec + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae {step}/{steps} rec {rec.item():.4f} kl/px {kl.item():.3f}")
    vae.eval()


def _recoloured(scene: scenes.Scene, rng: np.random.Generator) -> scenes.Scene:
    """The scene with every object in a random colour and, half the time, a random background."""
    names = list(scenes.COLOURS)
    things = tuple(dataclasses.replace(t, colour=scenes._pick(rng, names)) for t in scene.objects)
    background = scenes._pick(rng, names) if rng.random() < 0.5 else scene.background
    return dataclasses.replace(scene, objects=things, background=background)


def _object_weight(x, boost: float = 5.0):
    """Per-pixel loss weight of a batch of pictures in [-1, 1]: `boost` where the pixel differs from the top-left
    corner's colour (the background in most scenes), 1 elsewhere, normalised to mean 1 per picture. Objects cover a
    few percent of a scene; unweighted, a model learns backgrounds first and objects only much later."""
    weight = 1 + (boost - 1) * ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1).float()
    return weight / weight.mean((1, 2, 3), keepdim=True)


def encode_dataset(vae, rng: np.random.Generator, n: int) -> list[tuple[list[scenes.Scene], object, object]]:
    """n scenes rendered at the training bins, as (scenes, unscaled posterior means, latent-sized object weights)
    per bin."""
    import torch

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    per_bin = n // len(TRAIN_BINS)
    out = []
    with torch.no_grad():
        for h, w in TRAIN_BINS:
            bin_scenes = [scenes.random_scene(rng) for _ in range(per_bin)]
            means, weights = [], []
            for i in range(0, per_bin, 64):
                x = pictures_to_tensor([scenes.render(s, h, w) for s in bin_scenes[i : i + 64]])
                means.append(vae.encode(x).latent_dist.mean)
                weights.append(torch.nn.functional.avg_pool2d(_object_weight(x), factor))
            out.append((bin_scenes, torch.cat(means), torch.cat(weights)))
            _log(f"encoded {per_bin} scenes at {h}x{w}")
    return out


class _Batches:
    """Noisy training examples: latents of one bin, captions (or the empty one), timesteps and noise."""

    def __init__(self, tokenizer, data, scale: float, rng: np.random.Generator, seed: int):
        import torch

        from engine.text import preprocess

        self.tokenizer, self.data, self.scale, self.rng = tokenizer, data, scale, rng
        self.preprocess = preprocess
        betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"],
                               SCHEDULER_CONFIG["num_train_timesteps"], dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        self.generator = torch.Generator().manual_seed(seed)

    def timesteps(self, batch: int):
        """Half the batch uniform over all timesteps, half over the noisiest NOISY_FRACTION: the caption decides the
        picture only where the noisy latent does not show it yet, so that is where text conditioning is learnt."""
        import torch

        n = len(self.alphas_cumprod)
        t = torch.randint(0, n, (batch,), generator=self.generator)
        noisy = torch.randint(int(n * (1 - NOISY_FRACTION)), n, (batch,), generator=self.generator)
        return torch.where(torch.arange(batch) % 2 == 1, noisy, t)

    def tokens(self, texts: list[str]):
        return self.tokenizer([self.preprocess(t) for t in texts], padding="max_length", max_length=TEXT_TOKENS,
                              truncation=True, return_tensors="pt")

    def draw(self, batch: int, drop: float, t=None):
        import torch

        bin_scenes, latents, weights = self.data[int(self.rng.integers(len(self.data)))]
        idx = self.rng.integers(len(bin_scenes), size=batch)
        x0 = latents[torch.from_numpy(idx)] * self.scale
        weight = weights[torch.from_numpy(idx)]
        texts = ["" if self.rng.random() < drop else scenes.caption(self.rng, bin_scenes[i]) for i in idx]
        if t is None:
            t = self.timesteps(batch)
        noise = torch.randn(x0.shape, generator=self.generator)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # v, what PREDICTION names
        return xt, target, t, texts, weight


def _prediction_error(transformer, text_encoder, batches: _Batches, xt, target, t, texts) -> float:
    import torch

    with torch.no_grad():
        tok = batches.tokens(texts)
        context = text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        out = transformer(xt, encoder_hidden_states=context, encoder_attention_mask=tok.attention_mask, timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return float(((out[:, : target.shape[1]] - target) ** 2).mean())


def train_denoiser(transformer, text_encoder, batches: _Batches, steps: int, batch: int = 32, drop: float = 0.1,
                   lr: float = 1e-3, text_lr: float = 3e-3, save=None, save_every: int = 2500,
                   ema_decay: float = 0.999) -> dict[str, float]:
    """Train, leave the exponential moving average of the weights in the modules (what diffusion models sample
    with) and return the final probe: error at PROBE_T with the right captions, the empty one and shuffled
    ones. `save()` is called every `save_every` steps with the average in place, so a long run leaves results."""
    import torch

    # The text's path (T5, the caption projection, cross-attention) learns at a higher rate: at the same rate the
    # rest of the model learns to denoise from the picture alone long before the caption makes a difference.
    text = list(text_encoder.parameters()) + list(transformer.caption_projection.parameters())
    text += [p for name, p in transformer.named_parameters() if ".attn2." in name]
    text_ids = {id(p) for p in text}
    rest = [p for p in transformer.parameters() if id(p) not in text_ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr, "peak": lr}, {"params": text, "lr": text_lr, "peak": text_lr}],
                            weight_decay=0.0)
    params = rest + text
    average = [p.detach().clone() for p in params]

    def swap_average() -> None:
        for p, a in zip(params, average, strict=True):
            tmp = p.detach().clone()
            p.data.copy_(a)
            a.copy_(tmp)

    # a fixed probe batch: does the caption lower the error? (it must, or guidance has nothing to work with)
    probe = batches.draw(64, drop=0.0, t=torch.full((64,), PROBE_T))

    def probe_errors() -> dict[str, float]:
        transformer.eval()
        text_encoder.eval()
        xt, target, t, texts, _ = probe
        errors = {name: _prediction_error(transformer, text_encoder, batches, xt, target, t, captions)
                  for name, captions in (("right", texts), ("empty", [""] * len(texts)),
                                         ("wrong", texts[1:] + texts[:1]))}
        transformer.train()
        text_encoder.train()
        return errors

    transformer.train()
    text_encoder.train()
    ema = None
    for step in range(steps):
        xt, target, t, texts, object_weight = batches.draw(batch, drop)
        tok = batches.tokens(texts)
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, group["peak"], 100)
        context = text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        out = transformer(xt, encoder_hidden_states=context, encoder_attention_mask=tok.attention_mask,
                          timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = (object_weight * (out[:, : target.shape[1]] - target) ** 2).mean((1, 2, 3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(average, [p.detach() for p in params], 1 - ema_decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            _log(f"denoiser {step}/{steps} loss {ema:.4f}")
        if step % 500 == 0 or step == steps - 1:
            _log(f"probe at t={PROBE_T}: " + " ".join(f"{k} {v:.4f}" for k, v in probe_errors().items()))
        if save is not None and step % save_every == save_every - 1 and step != steps - 1:
            swap_average()
            save(step + 1)
            swap_average()
    swap_average()
    transformer.eval()
    text_encoder.eval()
    return probe_errors()


def train(out_dir: str | Path = WEIGHTS, seed: int = SEED, vae_steps: int = 3000, denoiser_steps: int = 12000,
          scenes_count: int = 8400, threads: int = 2, vae_from: str | None = None) -> Path:
    """Train all components from `seed` and write the checkpoint to `out_dir` (replaced). Returns it.

    `vae_from`: take the VAE (and its scaling_factor) of an earlier checkpoint instead of stage 2, for experiments on
    the denoiser; the stages draw from separate seeded generators, so a VAE from a run with the same seed and VAE
    settings gives the denoiser the very same start as a full run."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.set_num_threads(threads)
    stage_rng = [np.random.default_rng([seed, stage]) for stage in range(4)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pixart-train-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(train_tokenizer(Path(tmp), stage_rng[0], seed))
        torch.manual_seed(seed)
        if vae_from is None:
            vae = AutoencoderKL(**VAE_CONFIG)
            train_vae(vae, stage_rng[1], vae_steps)
        else:
            vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").eval()
        data = encode_dataset(vae, stage_rng[2], scenes_count)
        every = torch.cat([m.transpose(0, 1).flatten(1) for _, m, _ in data], 1)
        _log(f"latent channel means {every.mean(1).tolist()} stds {every.std(1).tolist()}")
        std = float(every.std())
        scale = round(1.0 / std, 5)
        vae.register_to_config(scaling_factor=scale)
        _log(f"latent std {std:.4f}: scaling_factor {scale}")

        torch.manual_seed(seed + 3)
        transformer = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
        text_encoder = T5EncoderModel(T5Config(**{**T5_CONFIG, "vocab_size": len(tokenizer)}))
        batches = _Batches(tokenizer, data, scale, stage_rng[3], seed)
        trained = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                                      vae=vae, scheduler=DPMSolverMultistepScheduler(
                                          **{**SCHEDULER_CONFIG, "prediction_type": PREDICTION}))
        out = Path(out_dir)

        def save(step: int) -> None:
            trained.save_pretrained(out.with_name(f"{out.name}-step{step}"), safe_serialization=True)
            _log(f"saved the average at step {step}")

        probe = train_denoiser(transformer, text_encoder, batches, denoiser_steps, save=save)
        shutil.rmtree(out, ignore_errors=True)
        trained.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps({
        "seed": seed, "vae_steps": vae_steps, "denoiser_steps": denoiser_steps,
        "scenes": scenes_count, "threads": threads, "vae_from": vae_from, "latent_std": round(std, 5),
        f"probe_error_t{PROBE_T}": {k: round(v, 5) for k, v in probe.items()},
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "torch": torch.__version__,
    }, indent=2) + "\n")
    _log(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    default = {name: param.default for name, param in inspect.signature(train).parameters.items()}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--vae-steps", type=int, default=default["vae_steps"], help="VAE steps on 64² pictures, batches "
                   "of 16")
    p.add_argument("--denoiser-steps", type=int, default=default["denoiser_steps"])
    p.add_argument("--scenes", type=int, default=default["scenes_count"], help="scenes encoded for the denoiser")
    p.add_argument("--threads", type=int, default=default["threads"])
    p.add_argument("--vae-from", default=None, help="reuse the VAE of this earlier checkpoint (experiments)")
    a = p.parse_args(argv)
    train(a.out, a.seed, a.vae_steps, a.denoiser_steps, a.scenes, a.threads, a.vae_from)


if __name__ == "__main__":
    main()
