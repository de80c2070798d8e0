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

import contextlib
import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine.binding import capture_row_buckets, graph_shape, transformer_calls
from engine.generation import (
    BatchedText,
    Generation,
    advance,
    batch_latents,
    batch_rows,
    batch_timesteps,
    begin_step,
    gather_rows,
    prompt_rows,
    prompt_rows_of,
    rows_computing,
)
from engine.images import checked_vae_tile, decode_latents, encode_image
from engine.manifest import Manifest
from engine.positions import sincos_pos_embed
from engine.preview import PreviewMap
from engine.request import Cancelled, GenerationRequest, GenerationResult, InvalidRequest
from engine.resolution import classify_bin, resize_and_crop, to_uint8
from engine.runtime import Acceleration, default_providers, release_freed_memory, shape_profiles, shrink_after_runs
from engine.schedulers import make_scheduler
from engine.sessions import GraphOpener, bind_transformer, open_safety_checker
from engine.step_cache import step_cache_for
from engine.step_graph import device_steps_for
from engine.text import T5Tokenizer
from engine.text_cache import KeyedEmbeddingCache, open_text_cache
from engine.text_encoding import encode_texts, prompt_texts
from engine.transformer_parts import TransformerParts
from engine.vocabulary import DEFAULT_STEP_CACHE, DEFAULT_STEP_CACHE_MECHANISM, FLAGGED_IMAGE_MODES

TEXT_ENCODER_DEVICES = ("auto", "cpu")


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
        device_step: bool | None = None,
        step_cache: str = DEFAULT_STEP_CACHE,
        step_cache_mechanism: str = DEFAULT_STEP_CACHE_MECHANISM,
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
        for the next one (measured at 1024²: 1.5 GB that would otherwise sit beside the VAE decode).
        `device_step`: guidance and the sampler update on the transformer's device too (engine.step_graph; default:
        on with IO binding on a GPU). `step_cache`: the mode of requests that name none; `step_cache_mechanism`: how
        their rows skip work, "blocks" loading the transformer's parts beside it (engine.step_cache)."""
        _check_choice("flagged_images", flagged_images, FLAGGED_IMAGE_MODES)
        step_cache_for(step_cache, 1, False, step_cache_mechanism)  # refuses an unknown mode or mechanism
        self.step_cache, self.step_cache_mechanism = step_cache, step_cache_mechanism
        _check_choice("text_encoder_device", text_encoder_device, TEXT_ENCODER_DEVICES)
        self.manifest = Manifest.load(export_dir, verify=verify_files)
        self.path = self.manifest.folder
        overrides = {"text_encoder": text_encoder_variant} if text_encoder_variant else None
        self.variant, files = self.manifest.files(variant, overrides, provider=(providers or default_providers())[0])
        self.max_rows = max_rows
        self._read_model_config()
        acceleration = acceleration or Acceleration()
        if acceleration.cache_dir is None:
            acceleration = dataclasses.replace(acceleration, cache_dir=self.path / "trt-cache")
        graphs = GraphOpener(files, providers, intra_op_threads, acceleration,
                             self.tensorrt_profiles(max_rows, acceleration.cuda_graphs))
        self._open_sessions(graphs, text_encoder_device=text_encoder_device,
                            text_encoder_resident=text_encoder_resident, memory_arena=memory_arena,
                            io_binding=io_binding)
        self.trim_text = trim_text
        self.guidance_in_one_batch = guidance_in_one_batch
        self.text_cache: KeyedEmbeddingCache = open_text_cache(
            int(text_cache_mb * 2**20), text_cache_dir, files["text_encoder"], self.manifest.get("hashes", {}),
            int(text_cache_disk_mb * 2**20))
        self.vae_tile = checked_vae_tile(vae_tile, self.vae_scale)
        self.tokenizer = T5Tokenizer.from_file(files["tokenizer"])
        self.safety_checker = open_safety_checker(self.manifest, graphs)
        self.flagged_images = flagged_images
        # Parsing a graph holds its protobuf beside the weights it copies out; glibc keeps those pages after the
        # parse (270 MB of a 384 MB graph, measured) unless asked to give them back.
        release_freed_memory()
        self._batched_text = BatchedText()
        # captured graphs are made for a few shapes: rows and text padded up to them (engine.binding.graph_shape)
        self.graph_shapes = self.bound_transformer is not None and self.bound_transformer.cuda_graphs
        self.device_steps = device_steps_for(self.bound_transformer, device_step, self.guidance_in_one_batch,
                                             acceleration)
        self._closed = False

    @classmethod
    def load(cls, export_dir: str | Path, providers: list[str] | tuple[str, ...] | None = None, **options) -> Engine:
        return cls(export_dir, providers, **options)

    # ---- loading: the steps of __init__ ---------------------------------------------------------------------
    def _read_model_config(self) -> None:
        """The model's dimensions, bins and constants, from the manifest."""
        tr = self.manifest["transformer"]
        self.bins = self.manifest["aspect_ratio_bins"]
        self.patch_size = int(tr["config"]["patch_size"])
        self.latent_channels = int(tr["config"]["in_channels"])
        self.out_channels = int(tr["config"].get("out_channels") or 2 * self.latent_channels)
        self.inner_dim = int(tr["inner_dim"])
        self.caption_channels = int(tr["config"]["caption_channels"])
        self.vae_scale = int(self.manifest["vae"]["scale_factor"])
        self.max_sequence_length = int(self.manifest["text_encoder"]["max_sequence_length"])
        self.pos_geometry = (float(tr["pos_embed"]["base_size"]), float(tr["pos_embed"]["interpolation_scale"]))
        self.vae_scaling_factor = float(self.manifest["vae"]["scaling_factor"])
        self.scheduler_config = self.manifest["scheduler"]["config"]
        self.preview_map = PreviewMap.from_manifest(self.manifest.get("preview"))  # None: exported before previews

    def tensorrt_profiles(self, max_rows: int, cuda_graphs: bool = False) -> dict[str, dict]:
        """TensorRT's optimization profiles: every bin, up to `max_rows` rows and the longest text; with CUDA graphs
        up to the buckets those are padded to (engine.binding.graph_shape)."""
        rows, text = graph_shape(max_rows, self.max_sequence_length) if cuda_graphs else (
            max_rows, self.max_sequence_length)
        return shape_profiles(
            self.bins, max_rows=rows, latent_channels=self.latent_channels, vae_scale=self.vae_scale,
            patch_size=self.patch_size, inner_dim=self.inner_dim, caption_channels=self.caption_channels,
            max_text=text,
        )

    def _open_sessions(self, graphs: GraphOpener, *, text_encoder_device: str, text_encoder_resident: bool,
                       memory_arena: bool, io_binding: bool | None) -> None:
        """T5 (resident, or opened per encode), the transformer and its IO binding, the VAE decoder."""
        # T5 loaded per encode when not resident: its arena would only hold the peak of a session about to go.
        self._text_encoder_session = graphs.opener("text_encoder", memory_arena=text_encoder_resident,
                                                   on_cpu=text_encoder_device == "cpu")
        self.text_encoder = self._text_encoder_session() if text_encoder_resident else None
        self.transformer = graphs.open("transformer", memory_arena=memory_arena)
        # The VAE's mid-block attention peaks at gigabytes per image at 1024²; an arena would keep that peak
        # resident between requests, so this session allocates and frees per run (on a GPU: its arena shrinks).
        self.vae_decoder = graphs.open("vae_decoder", memory_arena=False)
        self._shrink = shrink_after_runs(self.vae_decoder, graphs.acceleration.device_id)
        self._transformer_run = None if memory_arena else self._shrink
        self.bound_transformer = bind_transformer(self.transformer, io_binding, graphs.acceleration,
                                                  self._transformer_run)
        self.transformer_parts = TransformerParts.open(
            self.manifest, self.variant, graphs, memory_arena=memory_arena, run_options=self._transformer_run,
        ) if self.step_cache_mechanism == "blocks" else None

    @property
    def has_safety_checker(self) -> bool:
        return self.safety_checker is not None

    @property
    def providers(self) -> list[str]:
        self._check_open()
        return self.transformer.get_providers()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the sessions (T5, transformer, VAE, safety checker), the transformer's device buffers and the text
        caches' memory (a disk cache stays on disk). Idempotent; the engine refuses work afterwards."""
        if self._closed:
            return
        self._closed = True
        if self.device_steps is not None:
            self.device_steps.close()
        if self.bound_transformer is not None:
            self.bound_transformer.close()
        self.device_steps = None
        self.text_cache.clear()
        self.text_encoder = self.transformer = self.vae_decoder = None
        self.bound_transformer = self.safety_checker = self.transformer_parts = None
        self._text_encoder_session = None
        self._batched_text.clear()
        release_freed_memory()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")

    # ---- requests -------------------------------------------------------------------------------------------
    def violations(self, request: GenerationRequest) -> list[tuple[str, str]]:
        """Every bad field as (field, rule), the engine's own rules included, whatever else is wrong."""
        violations = request.violations()
        if request.enable_safety_checker is True and not self.has_safety_checker:
            violations.append(("enable_safety_checker", "this engine was exported without a safety checker"))
        if request.preview_every and self.preview_map is None:
            violations.append(("preview_every", "this export has no preview map: export it again (pixart export)"))
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
        return prompt_texts(request.style, request.prompt, request.negative_prompt, request.clean_caption,
                            request.do_guidance)

    def warmup(self) -> None:
        """A small request through every stage; with CUDA graphs also the default size's graphs for every row
        bucket a step can use, captured now rather than under the first requests."""
        self.generate(GenerationRequest(prompt="warm-up", num_inference_steps=1, image_size=(512, 512), seed=0))
        if self.graph_shapes:
            size_bin = self.binned_size(GenerationRequest(prompt="warm-up"))
            pos_embed = self.pos_embed(size_bin)
            capture_row_buckets(lambda *feeds: self.predict_noise(*feeds, pos_embed), self.max_rows,
                                (self.latent_channels, *(side // self.vae_scale for side in size_bin)),
                                self.caption_channels)

    # ---- the three stages -----------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Generation:
        """Validate, encode the texts (through the cache), draw the seed's latents and set up the sampler."""
        started = time.perf_counter()
        self._check_open()
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
            cache=step_cache_for(request.step_cache or self.step_cache, request.num_images, request.do_guidance,
                                 self.step_cache_mechanism),
        )
        generation.timings["text_encoding"] = time.perf_counter() - started
        return generation

    def step(self, generations: Sequence[Generation]) -> None:
        """One denoising step for every generation: one transformer call (two with `guidance_in_one_batch` off)
        over all their rows, then each advances its own sampler. They must share a latent size. Rows of requests
        with a step cache that skip this step stay out of the call and take their cache's forecast (or, with the
        "blocks" mechanism, run the transformer's head and tail but not its body)."""
        self._check_open()
        if not generations:
            return
        begin_step(generations)
        pos_embed = self.pos_embed(generations[0].size_bin)
        caching = any(g.cache is not None for g in generations)
        if self.device_steps is not None and not caching:  # guidance and the sampler update where it runs
            context, mask = self._batched_text.get(generations, pad=self.graph_shapes)
            self.device_steps.step(generations, batch_timesteps(generations), context, mask, pos_embed,
                                   self.out_channels)
            return
        if self.device_steps is not None:  # the bin's rows step on the host while any of them caches
            self.device_steps.release(generations[0].size_bin)
        if caching and self.transformer_parts is not None:  # every row runs the head and the tail, some the body
            self.transformer_parts.step(generations, *self._batched_text.get(generations), pos_embed,
                                        self.latent_channels, one_call=self.guidance_in_one_batch)
            return
        computing = rows_computing(batch_rows(generations)) if caching else None
        if computing is None or all(computing):
            context, mask = self._batched_text.get(generations, pad=self.graph_shapes)
            x, t = batch_latents(generations)
            noise_pred = self.predict_noise(x, t, context, mask, pos_embed, split=prompt_rows(generations))
        else:  # only the rows that compute enter the transformer call
            rows = [row for row, computes in zip(batch_rows(generations), computing, strict=True) if computes]
            noise_pred = self.predict_noise(*gather_rows(rows, pad=self.graph_shapes), pos_embed,
                                            split=prompt_rows_of(rows)) if rows else None
        advance(generations, noise_pred, self.latent_channels, computing)

    def preview(self, generation: Generation) -> bytes | None:
        """The preview a step left due (engine/preview.py), as JPEG bytes, once; None when none is due."""
        x0, generation.preview = generation.preview, None
        return self.preview_map.render(x0) if x0 is not None and self.preview_map is not None else None

    def finish(self, generations: Sequence[Generation]) -> list[GenerationResult]:
        """Decode, resize and crop back to the requested size, run the safety checker, encode the images."""
        self._check_open()
        results = []
        for g in generations:
            t0 = time.perf_counter()
            decoded = self.decode(g.latents)
            t1 = time.perf_counter()
            width, height = g.request.size
            pixels = to_uint8(resize_and_crop(decoded, width, height))
            flags = [False] * len(pixels)
            if g.request.enable_safety_checker:
                with self._capture_guard():
                    flags = self.safety_checker.check(pixels)
                pixels = self.safety_checker.apply(pixels, flags, self.flagged_images)
            t2 = time.perf_counter()
            images = [encode_image(p, g.request.output_format, n) for n, p in enumerate(pixels)]
            t3 = time.perf_counter()
            timings = {"text_encoding": 0.0, "denoising": 0.0, **g.timings, "decoding": t1 - t0, "safety": t2 - t1,
                       "image_encoding": t3 - t2, "total": t3 - g.started}
            results.append(GenerationResult(images=images, seed=g.seed, prompt=g.request.prompt,
                                            has_nsfw_concepts=[bool(f) for f in flags], timings=timings,
                                            steps_computed=g.steps_computed, steps_cached=g.steps_cached))
        return results

    # ---- whole requests: thin loops over the stages ---------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        self._check_open()
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
        results: dict[int, GenerationResult | BaseException] = {}
        running: dict[int, Generation] = {}
        for i, request in enumerate(requests):
            try:
                running[i] = self.prepare(request)
            except InvalidRequest as exc:
                results[i] = exc
        while running:
            self.step(list(running.values()))
            for i in [i for i, g in running.items() if g.done]:
                (results[i],) = self.finish([running.pop(i)])
        return [results[i] for i in range(len(requests))]

    # ---- pieces of the stages -------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """T5 last hidden states (B, L, C) and the int64 mask for preprocessed texts, L = the texts' length bucket;
        texts already in the cache are not encoded again (the default empty negative prompt, repeated prompts)."""
        self._check_open()
        return encode_texts(texts, self.tokenizer, self.text_cache, self._run_text_encoder,
                            max_length=self.max_sequence_length, trim=self.trim_text)

    def _run_text_encoder(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.text_encoder is not None:
            return self.text_encoder.run(None, feeds)[0]
        session = self._text_encoder_session()
        try:
            return session.run(None, feeds)[0]
        finally:
            del session
            release_freed_memory()

    def pos_embed(self, size_bin: tuple[int, int]) -> np.ndarray:
        """The positional embedding of a bin's tokens (cached per bin by engine.positions)."""
        h, w = (side // self.vae_scale // self.patch_size for side in size_bin)
        return sincos_pos_embed(self.inner_dim, h, w, *self.pos_geometry)

    def predict_noise(self, x: np.ndarray, t: np.ndarray, context: np.ndarray, mask: np.ndarray,
                      pos_embed: np.ndarray, split: int | None = None) -> np.ndarray:
        """The transformer over every row, or, with `guidance_in_one_batch` off, one call per guidance half (rows
        before and after `split`); see engine.binding.transformer_calls."""
        self._check_open()
        return transformer_calls(self._run_transformer, x, t, context, mask, pos_embed,
                                 None if self.guidance_in_one_batch else split, pad=self.graph_shapes)

    def _run_transformer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.bound_transformer is None:
            return self.transformer.run(None, feeds, self._transformer_run)[0]
        rows, _, *latent_size = feeds["latents"].shape
        return self.bound_transformer.run(feeds, (rows, self.out_channels, *latent_size))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, 4, h, w) final latents -> (B, 3, H, W) images in about [-1, 1] (whole, or in tiles of `vae_tile`).
        With CUDA graphs it waits out a transformer run that may be capturing (see engine.binding)."""
        self._check_open()
        with self._capture_guard():
            return decode_latents(lambda z: self.vae_decoder.run(None, {"latents": z}, self._shrink)[0], latents,
                                  self.vae_scaling_factor, tile=self.vae_tile, scale_factor=self.vae_scale)

    def _capture_guard(self) -> contextlib.AbstractContextManager:
        """Held by GPU work off the stepping thread (the VAE decode, the safety checker) while a transformer run may
        be capturing a CUDA graph: stream capture must not see another thread's work on the device."""
        bound = self.bound_transformer
        return bound.device_lock if bound is not None and bound.cuda_graphs else contextlib.nullcontext()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: one of {choices}, not {value!r}")
