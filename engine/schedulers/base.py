"""What both PixArt-Sigma samplers share, in numpy: the noise schedule, the data prediction from a model output, and
the `Scheduler` interface the engine steps (`set_timesteps`, `step`, `init_noise_sigma`, `needs_noise`).

Notation (both papers): the VP forward process is x_t = alpha_t x_0 + sigma_t eps, with alpha_t^2 + sigma_t^2 = 1.
diffusers indexes its schedule by the ratio s = sigma_t / alpha_t, so alpha = 1/sqrt(1+s^2), sigma = s alpha and the
half log-SNR lambda = ln(alpha/sigma) = -ln s. Both solvers integrate the data-prediction ODE/SDE in lambda.

Precision: betas and alphas_cumprod are float32 and bit-identical to diffusers' tensors; the per-step ratios s are
float32 and within one ulp of them (torch's CPU float32 sqrt is not correctly rounded; numpy's is). The per-step scalar
coefficients and the array updates are float64, rounded to float32 once per step. diffusers does the same math in
float32, so the two agree to float32 rounding, not bit for bit: at t = 999 the eps-to-x0 conversion divides by
alpha ~ 0.006, so one ulp of difference in sigma becomes ~1e-5 in x0 (tests/engine/test_schedulers.py states what
is reached).

Everything applied to a sample is elementwise with per-step scalar coefficients, so row i of a batched call equals the
same row computed alone, whatever else shares the batch. So a step is written as a `StepPlan`: each array it makes
(the data prediction, SA-Solver's corrected sample, the next sample, the arrays kept for later steps) is a weighted
sum of a few arrays, with float64 weights computed on the host. `apply_plan` evaluates a plan in numpy; the
engine's device step (engine/step_graph.py) evaluates the same weights on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


def merge_config(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    merged.update({k: v for k, v in config.items() if k in defaults})
    # scheduler_config.json writes -inf as "-inf" or null depending on the writer; both mean "no clipping".
    if merged["lambda_min_clipped"] is None:
        merged["lambda_min_clipped"] = -math.inf
    merged["lambda_min_clipped"] = float(merged["lambda_min_clipped"])
    return merged


def refuse(cfg: Mapping[str, Any], key: str, supported: tuple[Any, ...]) -> None:
    # Options this port does not implement must fail loudly: a silently different sampler would still make images.
    if key in cfg and cfg[key] not in supported:
        raise NotImplementedError(f"scheduler config {key}={cfg[key]!r} is not supported (supported: {supported})")


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32), bit for bit.

    The training betas must be the exact float32 values diffusers uses: 1 - beta is rounded to float32 and a
    thousand of those are multiplied, so a one-ulp difference in a beta shows up in every later sigma. torch rounds
    the step to float32, walks forward from start for the first half and backward from end for the second half, and
    rounds each value once.
    """
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1)) if steps > 1 else 0.0
    i = np.arange(steps)
    return np.where(i < steps // 2, np.float64(s) + step * i, np.float64(e) - step * (steps - 1 - i)).astype(np.float32)


class NoiseSchedule:
    """The discrete VP training schedule, as float32 arrays identical to diffusers' tensors."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        n = int(cfg["num_train_timesteps"])
        if cfg["trained_betas"] is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
        elif cfg["beta_schedule"] == "linear":
            betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
        elif cfg["beta_schedule"] == "scaled_linear":
            betas = _torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
        else:
            raise NotImplementedError(f"beta_schedule {cfg['beta_schedule']!r} is not supported")
        self.num_train_timesteps = n
        alphas = np.float32(1.0) - betas
        # torch's CPU cumprod accumulates float32 in float64 and rounds each partial product; so do we.
        self.alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        acp = self.alphas_cumprod
        self.sigmas = np.sqrt((np.float32(1.0) - acp) / acp)  # s_t = sigma_t / alpha_t, float32
        self.lambdas = np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1.0) - acp))  # only for lambda_min_clipped

    def timesteps(
        self, num_inference_steps: int, spacing: str, steps_offset: int, lambda_min_clipped: float
    ) -> np.ndarray:
        """Inference timesteps, high noise first, by the rules of Lin et al. 2023 (arXiv 2305.08891) Table 2."""
        n_train = self.num_train_timesteps
        # lambda_min_clipped drops the noisiest train steps whose lambda is below it (needed for cosine schedules).
        clipped_idx = int(np.searchsorted(self.lambdas[::-1], lambda_min_clipped))
        last = n_train - clipped_idx
        n = num_inference_steps
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
        elif spacing == "trailing":
            # float arange, as diffusers: for some n it yields n+1 values (the last one -1); kept for parity.
            ts = np.arange(last, 0, -n_train / n).round().astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing {spacing!r} must be one of 'linspace', 'leading', 'trailing'")
        return ts

    def sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        # diffusers interpolates with np.interp; at integer timesteps that is exact indexing.
        return np.interp(timesteps, np.arange(self.num_train_timesteps), self.sigmas).astype(np.float32)


def alpha_sigma_lambda(s: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of the VP process at ratio s = sigma/alpha, in float64; s = 0 is the clean end."""
    if s == 0.0:
        return 1.0, 0.0, math.inf
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return alpha, s * alpha, -math.log(s)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

Terms = tuple[tuple[str, float], ...]  # (array name, weight): the array is their weighted sum
# What a step starts from: the sample, the model output (guided, its prediction half), this step's fresh noise...
INPUTS = ("x", "model", "noise")
# ...and what samplers keep between steps: the last data predictions, newest first (SA-Solver's orders go up to 4),
# and SA-Solver's corrector inputs
SLOTS = ("x0_1", "x0_2", "x0_3", "x0_4", "last_sample", "last_noise")
SOURCES = INPUTS + SLOTS


@dataclass(frozen=True)
class StepPlan:
    """One step as weighted sums, in order: each of `values` names an array made from the sources and the values
    before it; "next" is the step's result; `keep` says which array each slot holds afterwards (a slot left out is
    emptied)."""

    values: tuple[tuple[str, Terms], ...]
    keep: tuple[tuple[str, str], ...]

    def flat(self) -> dict[str, dict[str, float]]:
        """"next" and each kept slot as one weighted sum of SOURCES (the values substituted): what a device
        evaluates in one contraction."""
        known: dict[str, dict[str, float]] = {name: {name: 1.0} for name in SOURCES}
        for name, terms in self.values:
            combined: dict[str, float] = {}
            for source, weight in terms:
                for base, w in known[source].items():
                    combined[base] = combined.get(base, 0.0) + weight * w
            known[name] = combined
        return {"next": known["next"], **{slot: known[source] for slot, source in self.keep}}


def apply_plan(plan: StepPlan, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the next sample in float32, the state after the step in float64) from float64 `arrays` (SOURCES present).
    Each output is its weighted sum of sources in SOURCES order, so the device step computes the same thing."""
    outputs = {}
    for name, weights in plan.flat().items():
        total = None
        for source in SOURCES:
            weight = weights.get(source, 0.0)
            if weight != 0.0:
                term = weight * arrays[source]
                total = term if total is None else total + term
        outputs[name] = total if total is not None else np.zeros_like(arrays["x"])
    return outputs.pop("next").astype(np.float32), outputs


def data_terms(s: float, prediction_type: str) -> Terms:
    """The clean latent x0 the model output implies, as weights of the sample and the model output: both solvers
    integrate the data-prediction form (DPM-Solver++ Sec. 3). epsilon: x0 = (x - sigma eps) / alpha; v (Salimans &
    Ho 2022, v = alpha eps - sigma x0): x0 = alpha x - sigma v; sample: the output is x0. PixArt-Σ is epsilon."""
    alpha, sigma, _ = alpha_sigma_lambda(s)
    if prediction_type == "v_prediction":
        return (("x", alpha), ("model", -sigma))
    if prediction_type == "sample":
        return (("model", 1.0),)
    return (("x", 1.0 / alpha), ("model", -sigma / alpha))


class Scheduler:
    """What the engine needs from a sampler: timesteps for N steps, then one `step` per model evaluation."""

    needs_noise: bool = False
    init_noise_sigma: float = 1.0  # VP schedules start from a standard normal latent

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        for key in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "thresholding",
            "rescale_betas_zero_snr",
        ):
            refuse(cfg, key, (False, None))
        refuse(cfg, "prediction_type", PREDICTION_TYPES)
        self.config = dict(cfg)
        self.schedule = NoiseSchedule(cfg)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.sigmas = np.zeros(0, dtype=np.float32)
        self.num_inference_steps = 0
        self._step_index = 0

    def _final_sigma(self) -> float:
        """Where the last step lands (the N+1-th sigma)."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget the arrays and counters of the steps taken (the state a new request starts from)."""
        self.state: dict[str, np.ndarray] = {}

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        cfg = self.config
        ts = self.schedule.timesteps(
            int(num_inference_steps), cfg["timestep_spacing"], int(cfg["steps_offset"]), cfg["lambda_min_clipped"]
        )
        self.timesteps = ts
        # N+1 sigmas: one per timestep, then where the last step lands.
        final = np.float32(self._final_sigma())
        self.sigmas = np.concatenate([self.schedule.sigmas_at(ts), [final]]).astype(np.float32)
        self.num_inference_steps = len(ts)
        # Always start at index 0: diffusers looks the first timestep up instead, which is the same index unless
        # timesteps repeat, and that takes N close to num_train_timesteps, far beyond the step counts served.
        self._step_index = 0
        self._reset()
        return ts

    def _begin_step(self, model_output: np.ndarray, sample: np.ndarray) -> int:
        if self._step_index >= self.num_inference_steps:
            raise RuntimeError(
                f"step called {self._step_index + 1} times for {self.num_inference_steps} timesteps; call set_timesteps"
            )
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")
        return self._step_index

    def plan(self) -> StepPlan:
        """The next step's weights (and the sampler's scalar bookkeeping advanced past it)."""
        raise NotImplementedError

    def step(self, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """One step in numpy: the next sample from the model's output (noise: fresh standard normal, for samplers
        that need it)."""
        self._begin_step(model_output, sample)
        if self.needs_noise:
            if noise is None:
                raise ValueError(f"{type(self).__name__} needs fresh standard-normal noise for every step")
            if noise.shape != sample.shape:
                raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
        x = np.asarray(sample, dtype=np.float64)
        arrays = {"x": x, "model": np.asarray(model_output, dtype=np.float64),
                  "noise": np.asarray(noise, dtype=np.float64) if noise is not None else np.zeros_like(x)}
        for slot in SLOTS:
            arrays[slot] = self.state.get(slot, np.zeros_like(x))
        result, self.state = apply_plan(self.plan(), arrays)
        return result
