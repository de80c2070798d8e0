"""The engine: an export folder in, images out. No torch, no diffusers: ONNX Runtime, numpy and tokenizers.

`generate_batch` reads like the reference loop (spec §8): bin the size, encode prompt and negative prompt, draw
latents, run the DPM-Solver++/SA-Solver loop with classifier-free guidance and the learned-sigma split, decode,
resize and crop back, encode the images.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from engine.positions import sincos_pos_embed
from engine.request import Cancelled, GeneratedImage, GenerationRequest, GenerationResult, InvalidRequest
from engine.resolution import classify_bin, resize_and_crop, to_uint8
from engine.runtime import create_session
from engine.safety import SafetyChecker
from engine.schedulers import make_scheduler
from engine.text import T5Tokenizer, apply_style, preprocess

log = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Text is encoded and cross-attended only up to the batch's longest prompt, rounded up to this many tokens.
# Padding is masked out (T5: -inf bias, transformer: -10000 bias, both exp() to 0), so trimming changes
# nothing but the work; the rounding keeps the padded length, and so the arithmetic, the same for a request
# whether it runs alone or in a batch (the bucket is part of the batch key).
TEXT_BUCKET = 32
PIL_FORMATS = {
    "png": ("PNG", {"compress_level": 4}),
    "jpeg": ("JPEG", {"quality": 95}),
    "webp": ("WEBP", {"quality": 95}),
}


@dataclass
class _Job:
    """One request inside a batch: its rows of the latent batch, its seed stream and its scheduler."""

    request: GenerationRequest
    seed: int
    rng: np.random.Generator
    scheduler: object
    latents: np.ndarray
    cond: np.ndarray
    cond_mask: np.ndarray
    uncond: np.ndarray | None
    uncond_mask: np.ndarray | None


class Engine:
    """Loads an export folder; `variant` picks a graph set from the manifest: "fp32" (plain), "optimized" (fused,
    the default when exported) or "int8"."""

    def __init__(
        self,
        export_dir: str | Path,
        providers: list[str] | tuple[str, ...] | None = None,
        *,
        variant: str | None = None,
        intra_op_threads: int = 0,
        trim_text: bool = True,
        text_cache_mb: float = 256,
        guidance_in_one_batch: bool = True,
        flagged_images: str = "black",
    ):
        if flagged_images not in ("black", "blur"):
            raise ValueError(f"flagged_images: 'black' or 'blur', not {flagged_images!r}")
        self.path = Path(export_dir)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        variants = self.manifest.get("variants", {})
        variant = variant or ("optimized" if "optimized" in variants else "fp32")
        if variant != "fp32" and variant not in variants:
            raise ValueError(f"variant: this export has {['fp32', *variants]}, not {variant!r}")
        files = {**self.manifest["files"], **variants.get(variant, {})}
        self.variant = variant
        self.text_encoder = create_session(self.path / files["text_encoder"], providers, intra_op_threads)
        self.transformer = create_session(self.path / files["transformer"], providers, intra_op_threads)
        # The VAE's mid-block attention peaks at gigabytes per image at 1024²; an arena would keep that peak
        # resident between requests, so this session allocates and frees per run.
        self.vae_decoder = create_session(self.path / files["vae_decoder"], providers, intra_op_threads,
                                          memory_arena=False)
        self.trim_text = trim_text
        self.guidance_in_one_batch = guidance_in_one_batch
        self.text_cache = EmbeddingCache(int(text_cache_mb * 2**20))
        self.tokenizer = T5Tokenizer.from_file(self.path / files["tokenizer"])
        tr = self.manifest["transformer"]
        self.patch_size = int(tr["config"]["patch_size"])
        self.latent_channels = int(tr["config"]["in_channels"])
        self.inner_dim = int(tr["inner_dim"])
        self.pos_geometry = (float(tr["pos_embed"]["base_size"]), float(tr["pos_embed"]["interpolation_scale"]))
        self.vae_scale = int(self.manifest["vae"]["scale_factor"])
        self.vae_scaling_factor = float(self.manifest["vae"]["scaling_factor"])
        self.max_sequence_length = int(self.manifest["text_encoder"]["max_sequence_length"])
        self.scheduler_config = self.manifest["scheduler"]["config"]
        self.bins = self.manifest["aspect_ratio_bins"]
        checker = self.manifest.get("safety_checker")
        self.safety_checker = (
            SafetyChecker.from_manifest(self.path, checker, providers, intra_op_threads) if checker else None
        )
        self.flagged_images = flagged_images

    @classmethod
    def load(cls, export_dir: str | Path, providers: list[str] | tuple[str, ...] | None = None, **options) -> Engine:
        return cls(export_dir, providers, **options)

    @property
    def has_safety_checker(self) -> bool:
        return self.safety_checker is not None

    @property
    def providers(self) -> list[str]:
        return self.transformer.get_providers()

    # ---- requests -------------------------------------------------------------------------------------------

    def violations(self, request: GenerationRequest) -> list[tuple[str, str]]:
        """Every bad field as (field, rule), the engine's own rules included, whatever else is wrong."""
        violations = request.violations()
        if request.enable_safety_checker is True and not self.has_safety_checker:
            violations.append(("enable_safety_checker", "this engine was exported without a safety checker"))
        if request.latents is not None and not violations:
            h, w = self.binned_size(request)
            want = (request.num_images, self.latent_channels, h // self.vae_scale, w // self.vae_scale)
            if tuple(request.latents.shape) != want:
                violations.append(("latents", f"must have shape {want}"))
        return violations

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest naming every bad field."""
        violations = self.violations(request)
        if violations:
            raise InvalidRequest(violations)

    def binned_size(self, request: GenerationRequest) -> tuple[int, int]:
        """(H, W) the transformer runs at for this request."""
        width, height = request.size
        return classify_bin(height, width, self.bins)

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Requests with equal keys can share one transformer batch."""
        texts = self.prompt_texts(request)
        return (
            self.binned_size(request), request.num_inference_steps, request.scheduler, request.do_guidance,
            self.text_length(max(self.tokenizer.count_tokens(t) for t in texts)),
        )

    def prompt_texts(self, request: GenerationRequest) -> tuple[str, ...]:
        """What T5 reads: the styled, cleaned prompt, then (when guided) the negative prompt."""
        return _prompt_texts(request.style, request.prompt, request.negative_prompt, request.clean_caption,
                             request.do_guidance)

    def text_length(self, tokens: int) -> int:
        if not self.trim_text:
            return self.max_sequence_length
        return min(self.max_sequence_length, -(-tokens // TEXT_BUCKET) * TEXT_BUCKET)

    def warmup(self) -> None:
        self.generate(GenerationRequest(prompt="warm-up", num_inference_steps=1, image_size=(512, 512), seed=0))

    # ---- generation -----------------------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        cancel = (lambda _i: should_cancel()) if should_cancel else None
        (result,) = self.generate_batch([request], on_step=on_step, should_cancel=cancel)
        if isinstance(result, BaseException):
            raise result
        return result

    def generate_batch(
        self,
        requests: list[GenerationRequest],
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[int], bool] | None = None,
    ) -> list[GenerationResult | BaseException]:
        """Run requests that share a batch key as one transformer batch; a failed or cancelled one gets its error."""
        results: list[GenerationResult | BaseException | None] = [None] * len(requests)
        live: dict[int, _Job] = {}
        key = None
        for i, req in enumerate(requests):
            try:
                self.check(req)
                if key is not None and self.batch_key(req) != key:
                    raise ValueError("requests in one batch must share a batch key")
            except (InvalidRequest, ValueError) as e:
                results[i] = e
            else:
                key = key or self.batch_key(req)
                live[i] = None  # filled below
        if not live:
            return results  # type: ignore[return-value]

        t_start = time.perf_counter()
        first = requests[next(iter(live))]
        height, width = self.binned_size(first)
        steps, guided = first.num_inference_steps, first.do_guidance

        # 1. Text: prompt and (when guided) negative prompt, styles applied first, encoded in one T5 batch.
        texts = [t for i in live for t in self.prompt_texts(requests[i])]
        embeds, masks = self.encode_text(texts)
        per_request = 2 if guided else 1
        t_text = time.perf_counter()

        # 2. Latents and per-request schedulers.
        for n, i in enumerate(live):
            req = requests[i]
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            rng = np.random.default_rng(seed)
            shape = (req.num_images, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
            latents = (
                np.asarray(req.latents, dtype=np.float32)
                if req.latents is not None
                else rng.standard_normal(shape, dtype=np.float32)
            )
            scheduler = make_scheduler(req.scheduler, self.scheduler_config)
            scheduler.set_timesteps(steps)
            latents = latents * np.float32(scheduler.init_noise_sigma)
            k, c = req.num_images, per_request * n
            live[i] = _Job(
                request=req, seed=seed, rng=rng, scheduler=scheduler, latents=latents,
                cond=np.repeat(embeds[c : c + 1], k, 0), cond_mask=np.repeat(masks[c : c + 1], k, 0),
                uncond=np.repeat(embeds[c + 1 : c + 2], k, 0) if guided else None,
                uncond_mask=np.repeat(masks[c + 1 : c + 2], k, 0) if guided else None,
            )
        timesteps = next(iter(live.values())).scheduler.timesteps
        pos_embed = sincos_pos_embed(
            self.inner_dim, height // self.vae_scale // self.patch_size, width // self.vae_scale // self.patch_size,
            *self.pos_geometry,
        )

        # 3. Denoising: one transformer call per step for every live request, [uncond; cond] when guided.
        jobs: list[_Job] = []
        for step, t in enumerate(timesteps):
            for i in list(live):
                if should_cancel is not None and should_cancel(i):
                    results[i] = Cancelled(f"cancelled at step {step}")
                    del live[i]
            if not live:
                return results  # type: ignore[return-value]
            if len(jobs) != len(live):  # text conditioning changes only when a request leaves the batch
                jobs = list(live.values())
                ctx, ctx_mask, scale = _conditioning(jobs, guided)
            x = np.concatenate([j.latents for j in jobs])
            if guided:
                x = np.concatenate([x, x])
            noise_pred = self.predict_noise(x, t, ctx, ctx_mask, pos_embed, halves=2 if guided else 1)
            if guided:
                uncond, cond = np.split(noise_pred, 2)
                noise_pred = uncond + scale[:, None, None, None] * (cond - uncond)
            eps = noise_pred[:, : self.latent_channels]  # learned sigma: keep the noise half
            row = 0
            for j in jobs:
                n_rows = j.latents.shape[0]
                noise = j.rng.standard_normal(j.latents.shape, dtype=np.float32) if j.scheduler.needs_noise else None
                j.latents = j.scheduler.step(eps[row : row + n_rows], j.latents, noise)
                row += n_rows
            if on_step is not None:
                on_step(step + 1, len(timesteps))
        t_denoise = time.perf_counter()

        # 4. Decode all live rows at once, then per request: back to the requested size, pixels, files.
        jobs = list(live.values())
        decoded = self.decode(np.concatenate([j.latents for j in jobs]))
        t_decode = time.perf_counter()
        row = 0
        for i, j in live.items():
            k = j.request.num_images
            width_req, height_req = j.request.size
            pixels = to_uint8(resize_and_crop(decoded[row : row + k], width_req, height_req))
            row += k
            t0 = time.perf_counter()
            flags = [False] * k
            if j.request.enable_safety_checker:
                flags = self.safety_checker.check(pixels)
                pixels = self.safety_checker.apply(pixels, flags, self.flagged_images)
            t1 = time.perf_counter()
            images = [self._encode_image(p, j.request.output_format, n) for n, p in enumerate(pixels)]
            t_encode = time.perf_counter() - t1
            results[i] = GenerationResult(
                images=images,
                seed=j.seed,
                prompt=j.request.prompt,
                has_nsfw_concepts=[bool(f) for f in flags],
                timings={
                    "text_encoding": t_text - t_start,
                    "denoising": t_denoise - t_text,
                    "decoding": t_decode - t_denoise,
                    "safety": t1 - t0,
                    "image_encoding": t_encode,
                    "total": time.perf_counter() - t_start,
                },
            )
        return results  # type: ignore[return-value]

    # ---- stages ---------------------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """T5 last hidden states (B, L, C) and the int64 mask for preprocessed texts, L = the batch's text length.

        Texts already in the cache are not encoded again (the default empty negative prompt, repeated prompts).
        """
        ids, mask, truncated = self.tokenizer.encode(texts, max_length=self.max_sequence_length)
        length = self.text_length(int(mask.sum(1).max()))
        ids, mask = ids[:, :length], mask[:, :length]
        found = {t: v for t in texts if (v := self.text_cache.get((t, length))) is not None}
        todo = {t: n for n, t in enumerate(texts) if t not in found}
        if todo:
            rows = list(todo.values())
            for n in rows:
                if truncated[n]:
                    log.warning("prompt longer than %d tokens was truncated: %.80r", self.max_sequence_length, texts[n])
            fresh = self.text_encoder.run(None, {"input_ids": ids[rows], "attention_mask": mask[rows]})[0]
            for t, row in zip(todo, fresh, strict=True):
                found[t] = row
                self.text_cache.put((t, length), row)
        embeds = np.stack([found[t] for t in texts])
        return embeds, mask

    def predict_noise(self, x: np.ndarray, t: float, context: np.ndarray, mask: np.ndarray, pos_embed: np.ndarray,
                      halves: int = 1) -> np.ndarray:
        """One transformer call over the whole batch, or, with `guidance_in_one_batch` off, one per guidance half."""
        parts = 1 if self.guidance_in_one_batch else halves
        outs = [
            self.transformer.run(None, {
                "latents": xs,
                "timestep": np.full((len(xs),), t, dtype=np.float32),
                "encoder_hidden_states": cs,
                "encoder_attention_mask": ms,
                "pos_embed": pos_embed,
            })[0]
            for xs, cs, ms in zip(np.split(x, parts), np.split(context, parts), np.split(mask, parts), strict=True)
        ]
        return outs[0] if parts == 1 else np.concatenate(outs)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, 4, h, w) final latents -> (B, 3, H, W) images in about [-1, 1].

        One image at a time: the VAE's mid-block attention over (H/8 * W/8)^2 scores takes gigabytes per image
        at 1024², and batching the decoder buys little on top of its convolutions.
        """
        scaled = (latents / np.float32(self.vae_scaling_factor)).astype(np.float32)
        images = [self.vae_decoder.run(None, {"latents": scaled[i : i + 1]})[0] for i in range(len(scaled))]
        return np.concatenate(images)

    @staticmethod
    def _encode_image(pixels: np.ndarray, fmt: str, index: int) -> GeneratedImage:
        buf = io.BytesIO()
        pil_format, options = PIL_FORMATS[fmt]
        Image.fromarray(pixels).save(buf, format=pil_format, **options)
        ext = "jpg" if fmt == "jpeg" else fmt
        return GeneratedImage(pixels=pixels, data=buf.getvalue(), content_type=CONTENT_TYPES[fmt],
                              file_name=f"image_{index}.{ext}")


def _conditioning(jobs: list[_Job], guided: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Text embeddings and masks for the batch ([uncond; cond] when guided) and the per-row guidance scale."""
    ctx = np.concatenate([j.cond for j in jobs])
    mask = np.concatenate([j.cond_mask for j in jobs])
    if not guided:
        return ctx, mask, None
    ctx = np.concatenate([*(j.uncond for j in jobs), ctx])
    mask = np.concatenate([*(j.uncond_mask for j in jobs), mask])
    scale = np.concatenate([np.full(len(j.latents), j.request.guidance_scale, np.float32) for j in jobs])
    return ctx, mask, scale


@lru_cache(maxsize=1024)
def _prompt_texts(style: str, prompt: str, negative: str, clean: bool, guided: bool) -> tuple[str, ...]:
    prompt, negative = apply_style(style, prompt, negative)
    if guided:
        return preprocess(prompt, clean), preprocess(negative, clean)
    return (preprocess(prompt, clean),)


class EmbeddingCache:
    """Least-recently-used T5 outputs, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: np.ndarray) -> None:
        if key in self.entries or value.nbytes > self.max_bytes:
            return
        value = value.copy()
        value.flags.writeable = False
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
