"""The engine: an export folder in, images out. No torch, no diffusers: ONNX Runtime, numpy and tokenizers.

A request goes through three stages, each one job (the reference loop of diffusers' PixArtSigmaPipeline, cut where
a server needs to cut it):

    generation = engine.prepare(request)     # validate, clean + tokenize + encode text, seed latents, sampler
    while not generation.done:
        engine.step([generation, ...])       # one transformer call for every row given, each at its own timestep
    result, = engine.finish([generation])    # decode, resize/crop back, safety, encode images, timings

`step` takes generations of different requests at different timesteps, with their own text lengths (masked),
guidance scales and samplers, as long as they share a latent size (a bin): a row's arithmetic does not depend on
its companions, so requests can join and leave a running batch at any step boundary (continuous batching).
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from engine.binding import BoundSession
from engine.manifest import Manifest
from engine.positions import sincos_pos_embed
from engine.request import Cancelled, GeneratedImage, GenerationRequest, GenerationResult, InvalidRequest
from engine.resolution import classify_bin, resize_and_crop, to_uint8
from engine.runtime import Acceleration, create_session, device_of, release_freed_memory, shape_profiles
from engine.safety import SafetyChecker
from engine.schedulers import Scheduler, make_scheduler
from engine.text import T5Tokenizer, apply_style, preprocess
from engine.text_cache import DiskEmbeddingCache, KeyedEmbeddingCache, TieredEmbeddingCache
from engine.tiling import decode_tiled
from engine.vocabulary import FLAGGED_IMAGE_MODES, FORMAT_DETAILS

log = logging.getLogger(__name__)

# A request's text is encoded and cross-attended only up to its longest text (prompt or negative prompt) rounded up
# to this many tokens. Padding is masked out (T5: -inf bias, transformer: -10000 bias, both exp() to 0), so
# trimming changes nothing but the work; a batch pads its rows to the longest member's length, masked the same way.
TEXT_BUCKET = 32
TEXT_ENCODER_DEVICES = ("auto", "cpu")


@dataclass(eq=False)
class Generation:
    """One request in flight, as plain data: its conditioning, its latents and its sampler's state.

    `context`/`mask` hold the prompt's T5 states, and for a guided request the negative prompt's after them:
    (1 or 2, L, C) and (1 or 2, L).
    """

    request: GenerationRequest
    seed: int
    size_bin: tuple[int, int]  # (H, W) in pixels the transformer runs at
    rng: np.random.Generator  # the request's own stream: initial latents, then SA-Solver's per-step noise
    sampler: Scheduler
    latents: np.ndarray  # (num_images, C, H/8, W/8) float32
    context: np.ndarray
    mask: np.ndarray
    step_index: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    denoise_started: float | None = None

    @property
    def guided(self) -> bool:
        return self.request.do_guidance

    @property
    def total_steps(self) -> int:
        return len(self.sampler.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def rows(self) -> int:
        """Rows this generation adds to a transformer batch."""
        return len(self.latents) * (2 if self.guided else 1)


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
        verify_files: bool = False,
        io_binding: bool | None = None,
        acceleration: Acceleration | None = None,
        max_rows: int = 16,
        text_encoder_variant: str | None = None,
        text_encoder_device: str = "auto",
        text_encoder_resident: bool = True,
        vae_tile: int | None = None,
        text_cache_dir: str | Path | None = None,
        text_cache_disk_mb: float = 1024,
        memory_arena: bool = True,
    ):
        """`io_binding`: keep the transformer's inputs and output in device buffers between steps (default: on
        when it runs on a GPU). `acceleration`: GPU provider settings (device, CUDA graphs, TensorRT fp16 and
        caches). `max_rows`: the most transformer rows a step will see (guided images count twice), which sizes
        TensorRT's optimization profiles.

        Memory (what `engine.memory` picks for a budget): `text_encoder_variant` takes T5 alone from another
        variant (e.g. "int4"); `text_encoder_device` "cpu" runs T5 on the CPU while the rest runs on the GPU;
        `text_encoder_resident=False` loads T5 for each encode that misses the caches and frees it after;
        `vae_tile` decodes in tiles of that many pixels (a multiple of 32), blended as diffusers does;
        `text_cache_dir` keeps T5 outputs on disk too, across restarts, keyed by the T5 graph's hash;
        `memory_arena=False` frees the transformer's activations after every call instead of keeping their peak
        for the next one (measured at 1024²: 1.5 GB that would otherwise sit beside the VAE decode)."""
        if flagged_images not in FLAGGED_IMAGE_MODES:
            raise ValueError(f"flagged_images: one of {FLAGGED_IMAGE_MODES}, not {flagged_images!r}")
        if text_encoder_device not in TEXT_ENCODER_DEVICES:
            raise ValueError(f"text_encoder_device: one of {TEXT_ENCODER_DEVICES}, not {text_encoder_device!r}")
        self.manifest = Manifest.load(export_dir, verify=verify_files)
        self.path = self.manifest.folder
        overrides = {"text_encoder": text_encoder_variant} if text_encoder_variant else None
        self.variant, files = self.manifest.files(variant, overrides)
        tr = self.manifest["transformer"]
        self.bins = self.manifest["aspect_ratio_bins"]
        self.patch_size = int(tr["config"]["patch_size"])
        self.latent_channels = int(tr["config"]["in_channels"])
        self.out_channels = int(tr["config"].get("out_channels") or 2 * self.latent_channels)
        self.inner_dim = int(tr["inner_dim"])
        self.vae_scale = int(self.manifest["vae"]["scale_factor"])
        self.max_sequence_length = int(self.manifest["text_encoder"]["max_sequence_length"])
        acceleration = acceleration or Acceleration(cache_dir=self.path / "trt-cache")
        profiles = shape_profiles(
            self.bins, max_rows=max_rows, latent_channels=self.latent_channels, vae_scale=self.vae_scale,
            patch_size=self.patch_size, inner_dim=self.inner_dim,
            caption_channels=int(tr["config"]["caption_channels"]), max_text=self.max_sequence_length,
        )

        def session(component: str, **kw) -> ort.InferenceSession:
            return create_session(files[component], providers, intra_op_threads, graph=component,
                                  acceleration=acceleration, profiles=profiles, **kw)

        text_providers = ["CPUExecutionProvider"] if text_encoder_device == "cpu" else providers

        def text_encoder_session() -> ort.InferenceSession:
            # Loaded per encode when not resident: its arena would only hold the peak of a session about to go.
            return create_session(files["text_encoder"], text_providers, intra_op_threads, graph="text_encoder",
                                  acceleration=acceleration, profiles=profiles, memory_arena=text_encoder_resident)

        self._text_encoder_session = text_encoder_session
        self.text_encoder = text_encoder_session() if text_encoder_resident else None
        self.transformer = session("transformer", memory_arena=memory_arena)
        # The VAE's mid-block attention peaks at gigabytes per image at 1024²; an arena would keep that peak
        # resident between requests, so this session allocates and frees per run.
        self.vae_decoder = session("vae_decoder", memory_arena=False)
        device = device_of(self.transformer)
        if acceleration.cuda_graphs and device == "cpu":
            raise ValueError("CUDA graphs need the transformer on a GPU provider")
        use_binding = (device != "cpu") if io_binding is None else io_binding
        self.bound_transformer = (
            BoundSession(self.transformer, device, acceleration.device_id, acceleration.cuda_graphs)
            if use_binding or acceleration.cuda_graphs else None
        )
        self.trim_text = trim_text
        self.guidance_in_one_batch = guidance_in_one_batch
        self.text_cache: KeyedEmbeddingCache = EmbeddingCache(int(text_cache_mb * 2**20))
        if text_cache_dir is not None:
            hashes = self.manifest.get("hashes", {})
            entry = hashes.get(files["text_encoder"].name + ".data") or hashes.get(files["text_encoder"].name)
            key = entry["sha256"] if entry else _file_identity(files["text_encoder"])
            disk = DiskEmbeddingCache(text_cache_dir, key, int(text_cache_disk_mb * 2**20))
            self.text_cache = TieredEmbeddingCache(self.text_cache, disk)
        if vae_tile is not None and (vae_tile <= 0 or vae_tile % (4 * self.vae_scale)):
            raise ValueError(f"vae_tile: a positive multiple of {4 * self.vae_scale} pixels, not {vae_tile}")
        self.vae_tile = vae_tile
        self.tokenizer = T5Tokenizer.from_file(files["tokenizer"])
        self.pos_geometry = (float(tr["pos_embed"]["base_size"]), float(tr["pos_embed"]["interpolation_scale"]))
        self.vae_scaling_factor = float(self.manifest["vae"]["scaling_factor"])
        self.scheduler_config = self.manifest["scheduler"]["config"]
        checker = self.manifest.get("safety_checker")
        self.safety_checker = (
            SafetyChecker.from_manifest(self.path, checker, providers, intra_op_threads) if checker else None
        )
        self.flagged_images = flagged_images
        # Parsing a graph holds its protobuf beside the weights it copies out; glibc keeps those pages after the
        # parse (270 MB of a 384 MB graph, measured) unless asked to give them back.
        release_freed_memory()
        self._batch_text: tuple[tuple[Generation, ...], np.ndarray, np.ndarray] | None = None

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
        """(H, W) the transformer runs at for this request: requests with the same one can share a step."""
        width, height = request.size
        return classify_bin(height, width, self.bins)

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

    # ---- the three stages -----------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> Generation:
        """Validate, encode the texts (through the cache), draw the seed's latents and set up the sampler."""
        started = time.perf_counter()
        self.check(request)
        context, mask = self.encode_text(list(self.prompt_texts(request)))
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        rng = np.random.default_rng(seed)
        height, width = self.binned_size(request)
        shape = (request.num_images, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        if request.latents is not None:
            latents = np.asarray(request.latents, dtype=np.float32)
        else:
            latents = rng.standard_normal(shape, dtype=np.float32)
        sampler = make_scheduler(request.scheduler, self.scheduler_config)
        sampler.set_timesteps(request.num_inference_steps)
        generation = Generation(
            request=request, seed=seed, size_bin=(height, width), rng=rng, sampler=sampler,
            latents=latents * np.float32(sampler.init_noise_sigma), context=context, mask=mask, started=started,
        )
        generation.timings["text_encoding"] = time.perf_counter() - started
        return generation

    def step(self, generations: Sequence[Generation]) -> None:
        """One denoising step for every generation: one transformer call (two with `guidance_in_one_batch` off)
        over all their rows, then each advances its own sampler. They must share a latent size."""
        if not generations:
            return
        if len({g.size_bin for g in generations}) != 1:
            raise ValueError("generations stepped together must share a size bin")
        now = time.perf_counter()
        for g in generations:
            if g.done:
                raise ValueError("a finished generation was stepped again")
            if g.denoise_started is None:
                g.denoise_started = now
        guided = [g for g in generations if g.guided]
        # rows: every generation's prompt half, then the negative half of the guided ones
        x = np.concatenate([g.latents for g in generations] + [g.latents for g in guided])
        t = np.concatenate([np.full(len(g.latents), g.sampler.timesteps[g.step_index], np.float32)
                            for g in [*generations, *guided]])
        context, mask = self._conditioning(generations)
        height, width = generations[0].size_bin
        pos_embed = sincos_pos_embed(self.inner_dim, height // self.vae_scale // self.patch_size,
                                     width // self.vae_scale // self.patch_size, *self.pos_geometry)
        split = sum(len(g.latents) for g in generations)
        noise_pred = self.predict_noise(x, t, context, mask, pos_embed, split=split if guided else None)
        cond_rows, uncond_rows = noise_pred[:split], noise_pred[split:]
        row = uncond_row = 0
        for g in generations:
            n = len(g.latents)
            eps = cond_rows[row : row + n]
            if g.guided:
                uncond = uncond_rows[uncond_row : uncond_row + n]
                eps = uncond + np.float32(g.request.guidance_scale) * (eps - uncond)
                uncond_row += n
            row += n
            eps = eps[:, : self.latent_channels]  # learned sigma: keep the prediction half (epsilon or v)
            noise = g.rng.standard_normal(g.latents.shape, dtype=np.float32) if g.sampler.needs_noise else None
            g.latents = g.sampler.step(eps, g.latents, noise)
            g.step_index += 1
            if g.done:
                g.timings["denoising"] = time.perf_counter() - g.denoise_started

    def finish(self, generations: Sequence[Generation]) -> list[GenerationResult]:
        """Decode, resize and crop back to the requested size, run the safety checker, encode the images."""
        results = []
        for g in generations:
            t0 = time.perf_counter()
            decoded = self.decode(g.latents)
            t1 = time.perf_counter()
            width, height = g.request.size
            pixels = to_uint8(resize_and_crop(decoded, width, height))
            flags = [False] * len(pixels)
            if g.request.enable_safety_checker:
                flags = self.safety_checker.check(pixels)
                pixels = self.safety_checker.apply(pixels, flags, self.flagged_images)
            t2 = time.perf_counter()
            images = [encode_image(p, g.request.output_format, n) for n, p in enumerate(pixels)]
            t3 = time.perf_counter()
            timings = {"text_encoding": 0.0, "denoising": 0.0, **g.timings, "decoding": t1 - t0, "safety": t2 - t1,
                       "image_encoding": t3 - t2, "total": t3 - g.started}
            results.append(GenerationResult(images=images, seed=g.seed, prompt=g.request.prompt,
                                            has_nsfw_concepts=[bool(f) for f in flags], timings=timings))
        return results

    # ---- whole requests: thin loops over the stages ---------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        generation = self.prepare(request)
        while not generation.done:
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled at step {generation.step_index}")
            self.step([generation])
            if on_step is not None:
                on_step(generation.step_index, generation.total_steps)
        (result,) = self.finish([generation])
        return result

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | BaseException]:
        """Requests of one size bin, stepped together until each is done; a refused one gets its error."""
        results: list[GenerationResult | BaseException | None] = [None] * len(requests)
        running: dict[int, Generation] = {}
        for i, request in enumerate(requests):
            try:
                running[i] = self.prepare(request)
            except InvalidRequest as exc:
                results[i] = exc
        while running:
            self.step(list(running.values()))
            for i, g in list(running.items()):
                if g.done:
                    (results[i],) = self.finish([g])
                    del running[i]
        return results  # type: ignore[return-value]

    # ---- pieces of the stages -------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """T5 last hidden states (B, L, C) and the int64 mask for preprocessed texts, L = the texts' length bucket.

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
            fresh = self._run_text_encoder({"input_ids": ids[rows], "attention_mask": mask[rows]})
            for t, row in zip(todo, fresh, strict=True):
                found[t] = row
                self.text_cache.put((t, length), row)
        embeds = np.stack([found[t] for t in texts])
        return embeds, mask

    def _run_text_encoder(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.text_encoder is not None:
            return self.text_encoder.run(None, feeds)[0]
        session = self._text_encoder_session()
        try:
            return session.run(None, feeds)[0]
        finally:
            del session
            release_freed_memory()

    def _conditioning(self, generations: Sequence[Generation]) -> tuple[np.ndarray, np.ndarray]:
        """Text states and masks in row order, padded to the longest member; rebuilt only when membership changes."""
        cached = self._batch_text
        if cached is not None and len(cached[0]) == len(generations) and all(
                a is b for a, b in zip(cached[0], generations, strict=True)):
            return cached[1], cached[2]
        length = max(g.context.shape[1] for g in generations)
        parts = [(g, 0) for g in generations] + [(g, 1) for g in generations if g.guided]
        rows = sum(len(g.latents) for g, _ in parts)
        context = np.zeros((rows, length, generations[0].context.shape[2]), np.float32)
        mask = np.zeros((rows, length), np.int64)
        row = 0
        for g, which in parts:
            n, width = len(g.latents), g.context.shape[1]
            context[row : row + n, :width] = g.context[which]
            mask[row : row + n, :width] = g.mask[which]
            row += n
        self._batch_text = (tuple(generations), context, mask)
        return context, mask

    def predict_noise(self, x: np.ndarray, t: np.ndarray, context: np.ndarray, mask: np.ndarray,
                      pos_embed: np.ndarray, split: int | None = None) -> np.ndarray:
        """One transformer call over every row, or, with `guidance_in_one_batch` off, one per guidance half
        (rows before and after `split`)."""
        bounds = [0, len(x)] if self.guidance_in_one_batch or split is None else [0, split, len(x)]
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            whole = (a, b) == (0, len(x))  # slicing would make new arrays: the bound text would be sent again
            feeds = {
                "latents": x[a:b],
                "timestep": t[a:b],
                "encoder_hidden_states": context if whole else context[a:b],
                "encoder_attention_mask": mask if whole else mask[a:b],
                "pos_embed": pos_embed,
            }
            if self.bound_transformer is not None:
                out_shape = (b - a, self.out_channels, *x.shape[2:])
                outs.append(self.bound_transformer.run(feeds, out_shape))
            else:
                outs.append(self.transformer.run(None, feeds)[0])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, 4, h, w) final latents -> (B, 3, H, W) images in about [-1, 1].

        One image at a time: the VAE's mid-block attention over (H/8 * W/8)^2 scores takes gigabytes per image
        at 1024², and batching the decoder buys little on top of its convolutions.
        """
        scaled = (latents / np.float32(self.vae_scaling_factor)).astype(np.float32)
        release_freed_memory()  # what the denoising loop freed, before the decoder's own peak

        def decode(z: np.ndarray) -> np.ndarray:
            return self.vae_decoder.run(None, {"latents": z})[0]

        if self.vae_tile:
            images = [decode_tiled(scaled[i : i + 1], decode, tile=self.vae_tile, scale_factor=self.vae_scale)
                      for i in range(len(scaled))]
        else:
            images = [decode(scaled[i : i + 1]) for i in range(len(scaled))]
        release_freed_memory()
        return np.concatenate(images)


def _file_identity(path: Path) -> str:
    """Stands in for a hash the manifest lacks: name, size and modification time of the graph's weights."""
    data = path.with_name(path.name + ".data")
    target = data if data.exists() else path
    st = target.stat()
    return f"{target.name}-{st.st_size}-{st.st_mtime_ns}"


def encode_image(pixels: np.ndarray, fmt: str, index: int) -> GeneratedImage:
    content_type, pil_format, options, extension = FORMAT_DETAILS[fmt]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=pil_format, **options)
    return GeneratedImage(pixels=pixels, data=buf.getvalue(), content_type=content_type,
                          file_name=f"image_{index}.{extension}")


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
