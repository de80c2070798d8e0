"""The two sides a `pixart bench` worker measures, behind one interface: eager diffusers (EagerSide) and the ONNX
engine (EngineSide), each loading, running the three stages and generating a batch end to end (uint8 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common.prompts import NEGATIVE, PROMPTS


class Side:
    """What a worker needs from either side: load, the three stages, and a batch end to end (uint8 images)."""

    device = "cpu"
    calls = 0

    def fresh(self, prompt: str) -> str:
        """The prompt made new for each call, the same sequence on both sides: a text-embedding cache (the
        engine has one) must not turn repeats of one prompt into free text encoding. Negatives stay repeated,
        as in real traffic."""
        self.calls += 1
        return f"{prompt}, take {self.calls}"

    def load(self) -> None: ...
    def prepare(self, size: int, batch: int) -> None: ...  # inputs for the stage calls, made untimed
    def text(self) -> None: ...
    def step(self, batch: int) -> None: ...
    def decode(self) -> None: ...
    def generate(self, prompts: list[str], latents: np.ndarray, steps: int) -> np.ndarray: ...
    def info(self) -> dict:
        return {}


class EagerSide(Side):
    def __init__(self, spec: dict):
        import torch

        self.torch, self.spec = torch, spec
        torch.set_num_threads(spec["threads"])
        self.device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 on a GPU, as the eager baseline is deployed; fp32 on a CPU, where half precision is not faster
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def load(self) -> None:
        from diffusers import PixArtSigmaPipeline

        self.pipe = PixArtSigmaPipeline.from_pretrained(self.spec["checkpoint"], torch_dtype=self.dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def prepare(self, size: int, batch: int) -> None:
        torch = self.torch
        with torch.inference_mode():
            embeds, mask, neg, neg_mask = self._encode(PROMPTS[0])
            self.ctx = {
                b: (torch.cat([neg.repeat(b, 1, 1), embeds.repeat(b, 1, 1)]),
                    torch.cat([neg_mask.repeat(b, 1), mask.repeat(b, 1)]))
                for b in self.spec["batches"]
            }
        lat = torch.from_numpy(np.load(self.spec["latents"])).to(self.device, self.dtype)
        self.latents = lat
        self.t = torch.tensor(999.0, device=self.device)

    def _encode(self, prompt: str):
        return self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=True, negative_prompt=NEGATIVE, num_images_per_prompt=1,
            device=self.device, clean_caption=False, max_sequence_length=300,
        )

    def text(self) -> None:
        with self.torch.inference_mode():
            self._encode(self.fresh(PROMPTS[0]))
        self._sync()

    def step(self, batch: int) -> None:
        ctx, mask = self.ctx[batch]
        x = self.torch.cat([self.latents[:batch]] * 2)
        with self.torch.inference_mode():
            self.pipe.transformer(
                x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=self.t.expand(x.shape[0]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
            )
        self._sync()

    def decode(self) -> None:
        vae = self.pipe.vae
        with self.torch.inference_mode():
            vae.decode(self.latents[:1] / vae.config.scaling_factor, return_dict=False)
        self._sync()

    def generate(self, prompts: list[str], latents: np.ndarray, steps: int) -> np.ndarray:
        size = latents.shape[-1] * 8
        with self.torch.inference_mode():
            images = self.pipe(
                prompt=[self.fresh(p) for p in prompts], negative_prompt=[NEGATIVE] * len(prompts),
                height=size, width=size,
                num_inference_steps=steps, guidance_scale=self.spec["guidance"],
                latents=self.torch.from_numpy(latents).to(self.device, self.dtype), output_type="np",
                clean_caption=False,
            ).images
        self._sync()
        return (np.asarray(images) * 255).round().astype(np.uint8)

    def info(self) -> dict:
        out = {"device": self.device, "torch_threads": self.torch.get_num_threads(), "dtype": str(self.dtype)}
        if self.device == "cuda":
            out["gpu_max_allocated_mib"] = self.torch.cuda.max_memory_allocated() / 2**20
        return out


class EngineSide(Side):
    def __init__(self, spec: dict):
        import engine.pipeline  # noqa: F401  (imports are timed apart from the load, as torch's are on the other side)

        self.spec = spec

    def load(self) -> None:
        from engine import Engine
        from engine.runtime import CPU, CUDA, Acceleration

        options = dict(self.spec["engine_options"])
        replay = options.pop("replay_step_cache", None)
        if replay is not None:  # cached modes on untrained weights: the trained default's decisions
            from benchmarks.step_cache_replay import install

            install(Path(replay), self.spec["guidance"])
        if "acceleration" in options:
            options["acceleration"] = Acceleration(**options["acceleration"])
        # a variant names its providers only to ask for TensorRT: otherwise CUDA on the GPU, the CPU on the CPU
        providers = options.pop("providers", None) or ([CUDA, CPU] if self.spec.get("device") == "cuda" else [CPU])
        try:
            self.engine = Engine.load(self.spec["export"], providers, **options)
        except TypeError as e:
            opts = self.spec["engine_options"]
            raise SystemExit(f"variant {self.spec['side']}: Engine.load does not take {opts}: {e}") from e

    def prepare(self, size: int, batch: int) -> None:
        from engine import GenerationRequest
        from engine.text import preprocess

        self.texts = [preprocess(PROMPTS[0], False), preprocess(NEGATIVE, False)]
        self.engine.encode_text(self.texts)
        self.latents = np.load(self.spec["latents"])
        # Generations as the server steps them (guided: prompt and negative rows in one call), with room for
        # every timed repeat: a step is timed as the engine runs it, sampler update included.
        self.generations = {
            b: [self.engine.prepare(GenerationRequest(
                prompt=PROMPTS[0], negative_prompt=NEGATIVE, image_size=(size, size), num_inference_steps=100,
                guidance_scale=self.spec["guidance"], seed=i, latents=self.latents[i : i + 1], clean_caption=False,
            )) for i in range(b)]
            for b in self.spec["batches"]
        }

    def text(self) -> None:
        self.engine.encode_text([preprocess_text(self.fresh(PROMPTS[0])), self.texts[1]])

    def step(self, batch: int) -> None:
        self.engine.step(self.generations[batch])

    def decode(self) -> None:
        self.engine.decode(self.latents[:1])

    def generate(self, prompts: list[str], latents: np.ndarray, steps: int) -> np.ndarray:
        from engine import GenerationRequest

        size = latents.shape[-1] * 8
        requests = [
            GenerationRequest(
                prompt=self.fresh(p), negative_prompt=NEGATIVE, image_size=(size, size), num_inference_steps=steps,
                guidance_scale=self.spec["guidance"], seed=i, latents=latents[i : i + 1], clean_caption=False,
            )
            for i, p in enumerate(prompts)
        ]
        results = self.engine.generate_many(requests)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self.last_timings = [r.timings for r in results]
        return np.stack([im.pixels for r in results for im in r.images])

    def info(self) -> dict:
        return {"providers": list(self.engine.providers), "options": self.spec["engine_options"]}


def preprocess_text(text: str) -> str:
    from engine.text import preprocess

    return preprocess(text, False)
