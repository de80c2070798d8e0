"""The two PixArt-Sigma samplers, in numpy, reproducing diffusers' schedulers as PixArt-Sigma configures them.

* `DPMSolverMultistep`: DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095, as `DPMSolverMultistepScheduler` runs it.
* `SASolver`: the stochastic Adams predictor-corrector of Xue et al. 2023, arXiv 2309.05019, as `SASolverScheduler`
  runs it (data prediction, predictor and corrector of order 2, the PixArt tau(t)).

Notation (both papers): the VP forward process is x_t = alpha_t x_0 + sigma_t eps, with alpha_t^2 + sigma_t^2 = 1.
diffusers indexes its schedule by the ratio s = sigma_t / alpha_t, so alpha = 1/sqrt(1+s^2), sigma = s alpha and the
half log-SNR lambda = ln(alpha/sigma) = -ln s. Both solvers integrate the data-prediction ODE/SDE in lambda.

Precision: betas and alphas_cumprod are float32 and bit-identical to diffusers' tensors; the per-step ratios s are
float32 and within one ulp of them (torch's CPU float32 sqrt is not correctly rounded; numpy's is). The per-step scalar
coefficients and the array updates are float64, rounded to float32 once per step. diffusers does the same math in
float32, so the two agree to float32 rounding, not bit for bit: at t = 999 the eps-to-x0 conversion divides by
alpha ~ 0.006, so one ulp of difference in sigma becomes ~1e-5 in x0 (tests/engine/test_schedulers.py states what is reached).

Everything applied to a sample is elementwise with per-step scalar coefficients, so row i of a batched call equals the
same row computed alone, whatever else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SCHEDULER_NAMES = ("DPM-SOLVER", "SA-SOLVER")

# Defaults of diffusers' DPMSolverMultistepScheduler.__init__ for the keys read here; a checkpoint's
# scheduler_config.json overrides them, and keys absent from the file keep these (as diffusers' from_config does).
_DPM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

# SASolverScheduler.__init__ defaults. It has no solver_order/solver_type/euler_at_final/final_sigmas_type, so
# building it from a DPM config silently drops those (its final sigma is always sigma_min, see SASolver).
_SA_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "thresholding": False,
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "lambda_min_clipped": -math.inf,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


def pixart_tau(t: int) -> float:
    """SA-Solver's tau(t) in PixArt's app (also diffusers' default): SDE in the middle, ODE at both ends."""
    return 1.0 if 200 <= t <= 800 else 0.0


def _merge_config(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    merged.update({k: v for k, v in config.items() if k in defaults})
    # scheduler_config.json writes -inf as "-inf" or null depending on the writer; both mean "no clipping".
    if merged["lambda_min_clipped"] is None:
        merged["lambda_min_clipped"] = -math.inf
    merged["lambda_min_clipped"] = float(merged["lambda_min_clipped"])
    return merged


def _refuse(cfg: Mapping[str, Any], key: str, supported: tuple[Any, ...]) -> None:
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


def _alpha_sigma_lambda(s: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of the VP process at ratio s = sigma/alpha, in float64; s = 0 is the clean end."""
    if s == 0.0:
        return 1.0, 0.0, math.inf
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return alpha, s * alpha, -math.log(s)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _data_prediction(model_output: np.ndarray, sample: np.ndarray, s: float, prediction_type: str) -> np.ndarray:
    """The clean latent x0 the model output implies: both solvers integrate the data-prediction form (DPM-Solver++
    Sec. 3). epsilon: x0 = (x - sigma eps) / alpha; v (Salimans & Ho 2022, v = alpha eps - sigma x0):
    x0 = alpha x - sigma v; sample: the output is x0. PixArt-Σ checkpoints are epsilon."""
    alpha, sigma, _ = _alpha_sigma_lambda(s)
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    return (sample - sigma * model_output) / alpha


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
            _refuse(cfg, key, (False, None))
        _refuse(cfg, "prediction_type", PREDICTION_TYPES)
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
        raise NotImplementedError

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

    def step(self, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError


class DPMSolverMultistep(Scheduler):
    """DPM-Solver++(2M) with the midpoint second-order rule (Lu et al. 2022, Alg. 2), diffusers' variant.

    Order schedule (diffusers `step`): the first step is first order (no history yet), the middle steps second order,
    and the last step first order whenever it lands on sigma = 0 (or when lower_order_final and N < 15, or
    euler_at_final): extrapolating x0 into lambda = +inf is unstable, and the first-order step to s = 0 is exactly x0.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        cfg = _merge_config(config, _DPM_DEFAULTS)
        _refuse(cfg, "algorithm_type", ("dpmsolver++",))
        _refuse(cfg, "solver_type", ("midpoint",))
        _refuse(cfg, "solver_order", (1, 2))
        _refuse(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        super().__init__(cfg)
        self._reset()

    def _final_sigma(self) -> float:
        if self.config["final_sigmas_type"] == "zero":
            return 0.0
        return float(self.schedule.sigmas[0])

    def _reset(self) -> None:
        self._prev_x0: np.ndarray | None = None

    def step(self, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        k = self._begin_step(model_output, sample)
        cfg = self.config
        n = self.num_inference_steps
        x = np.asarray(sample, dtype=np.float64)
        s_k, s_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        x0 = _data_prediction(np.asarray(model_output, dtype=np.float64), x, s_k, cfg["prediction_type"])

        last = k == n - 1
        final_first_order = last and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        if cfg["solver_order"] == 1 or k == 0 or final_first_order:
            prev = self._first_order(x, x0, s_k, s_next)
        else:
            prev = self._second_order_midpoint(x, x0, self._prev_x0, float(self.sigmas[k - 1]), s_k, s_next)

        self._prev_x0 = x0
        self._step_index += 1
        return prev.astype(np.float32)

    @staticmethod
    def _first_order(x: np.ndarray, x0: np.ndarray, s: float, s_next: float) -> np.ndarray:
        """DPM-Solver++1 = DDIM: x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0, h = lambda_t - lambda_s."""
        if s_next == 0.0:
            # sigma_t = 0, alpha_t = 1, h = +inf: the formula's limit is x0 (diffusers gets it through inf arithmetic).
            return x0.copy()
        alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(s)
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(s_next)
        h = lam_t - lam_s
        return (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * x0

    @staticmethod
    def _second_order_midpoint(
        x: np.ndarray, x0: np.ndarray, x0_prev: np.ndarray, s_prev: float, s: float, s_next: float
    ) -> np.ndarray:
        """DPM-Solver++(2M): the first-order step plus half its x0 weight times the backward difference D1.

        D1 = (x0_k - x0_{k-1}) / r0 with r0 = h_{k-1}/h_k rescales the previous step's difference to this step's
        length, so D0 + D1/2 is x0 extrapolated to the interval's midpoint in lambda.
        """
        _, _, lam_prev = _alpha_sigma_lambda(s_prev)
        _, sigma_s, lam_s = _alpha_sigma_lambda(s)
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(s_next)
        h, h_prev = lam_t - lam_s, lam_s - lam_prev
        d1 = (x0 - x0_prev) * (h / h_prev)
        weight = alpha_t * math.expm1(-h)
        return (sigma_t / sigma_s) * x - weight * x0 - 0.5 * weight * d1


def _lagrange_exp_integrals(nodes: list[float], lam_s: float, lam_t: float, c: float) -> np.ndarray:
    """b_i = integral over [lam_s, lam_t] of e^{c lambda} l_i(lambda), l_i the Lagrange basis on `nodes`.

    These are the SA-Solver weights (the closed-form integrals of the paper's Lagrange interpolant). They are
    computed in u = lambda - lam_s, where the monomial moments M_m = int_0^h u^m e^{cu} du follow from integration by
    parts, M_m = (h^m e^{ch} - m M_{m-1}) / c; expanding around 0 instead of around lambda itself avoids cancelling
    large terms, and the result equals diffusers' expanded form exactly in exact arithmetic.
    """
    h = lam_t - lam_s
    u = np.asarray(nodes, dtype=np.float64) - lam_s
    p = len(nodes)
    moments = [math.expm1(c * h) / c]
    for m in range(1, p):
        moments.append((h**m * math.exp(c * h) - m * moments[-1]) / c)
    weights = np.empty(p)
    for i in range(p):
        others = np.delete(u, i)
        # np.poly: monic coefficients of prod (u - u_j), highest power first.
        basis = np.atleast_1d(np.poly(others)) / np.prod(u[i] - others)
        weights[i] = sum(basis[p - 1 - m] * moments[m] for m in range(p))
    return math.exp(c * lam_s) * weights


class SASolver(Scheduler):
    """SA-Solver (Xue et al. 2023), data-prediction form, with diffusers' step structure.

    Each call at step k (timestep t_k, sample x_k coming from the previous predictor):
      1. x0_k from the model output.
      2. Corrector (stochastic Adams-Moulton), k > 0: redo the previous interval [lambda_{k-1}, lambda_k] from the
         previous step's input with the same noise, now interpolating through x0_k too. This costs no extra model call.
      3. Predictor (stochastic Adams-Bashforth): from the corrected x_k over [lambda_k, lambda_{k+1}] using
         x0_k, x0_{k-1}, ..., injecting fresh noise, which is remembered for step 2 of the next call.

    One noise draw per call, every call, even when tau(t_k) = 0 makes its weight zero: the caller's draws then line
    up one to one with diffusers' `randn_tensor` calls. The last step lands on sigma_min (s(0) ~ 0.01), not 0: unlike
    DPMSolverMultistepScheduler, SASolverScheduler has no final_sigmas_type, so the returned latents keep that small
    residual noise level, exactly as diffusers' PixArt pipeline does.
    """

    needs_noise = True

    def __init__(
        self,
        config: Mapping[str, Any],
        predictor_order: int = 2,
        corrector_order: int = 2,
        tau: Callable[[int], float] = pixart_tau,
    ) -> None:
        if not (1 <= predictor_order <= 4 and 1 <= corrector_order <= 4):
            raise ValueError("SA-Solver predictor_order and corrector_order must be in 1..4")
        cfg = _merge_config(config, _SA_DEFAULTS)
        super().__init__(cfg)
        self.predictor_order = predictor_order
        self.corrector_order = corrector_order
        self.tau = tau
        self._history_len = max(predictor_order, corrector_order - 1)
        self._reset()

    def _final_sigma(self) -> float:
        return float(self.schedule.sigmas[0])

    def _reset(self) -> None:
        self._x0s: list[np.ndarray] = []  # newest last, at most _history_len
        self._last_sample: np.ndarray | None = None
        self._last_noise: np.ndarray | None = None
        self._next_corrector_order = 0
        self._warmup = 0  # diffusers' lower_order_nums: how many past x0 the orders may use

    def _lam(self, index: int) -> float:
        return _alpha_sigma_lambda(float(self.sigmas[index]))[2]

    def _adams(
        self,
        x: np.ndarray,
        start: int,
        node_indices: list[int],
        x0s: list[np.ndarray],
        noise: np.ndarray,
        tau: float,
    ) -> np.ndarray:
        """x_t = e^{-tau^2 h} (sigma_t/sigma_s) x_s + (1+tau^2) sigma_t e^{-tau^2 lambda_t} sum_i b_i x0_i
        + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi, over [lambda_s, lambda_t] = [lambda(start), lambda(start+1)].

        The data-prediction SDE with constant tau on the interval, solved exactly except for x0(lambda), which is
        replaced by its Lagrange interpolant through (lambda(node_indices[i]), x0s[i]).
        """
        _, sigma_s, lam_s = _alpha_sigma_lambda(float(self.sigmas[start]))
        _, sigma_t, lam_t = _alpha_sigma_lambda(float(self.sigmas[start + 1]))
        h = lam_t - lam_s
        c = 1.0 + tau * tau
        nodes = [self._lam(i) for i in node_indices]
        b = _lagrange_exp_integrals(nodes, lam_s, lam_t, c)
        if len(nodes) == 2:
            # diffusers' (and the official code's) empirical O(h^3) change for order 2, "similar to UniPC": the
            # divided difference (x0_0 - x0_1)/(n_0 - n_1) gets weight e^{c lambda_t} h^2/2 instead of the exact
            # int e^{c lambda} (lambda - lambda_s) = e^{c lambda_t} (ch - 1 + e^{-ch})/c^2.
            delta = math.exp(c * lam_t) * (h * h / 2 - (h * c + math.expm1(-c * h)) / (c * c)) / (nodes[0] - nodes[1])
            b[0] += delta
            b[1] -= delta
        drift = sum(bi * x0 for bi, x0 in zip(b, x0s, strict=True))
        scale = c * sigma_t * math.exp(-tau * tau * lam_t)
        noise_std = sigma_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
        return math.exp(-tau * tau * h) * (sigma_t / sigma_s) * x + scale * drift + noise_std * noise

    def step(self, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        k = self._begin_step(model_output, sample)
        if noise is None:
            raise ValueError("SA-Solver needs fresh standard-normal noise for every step")
        if noise.shape != sample.shape:
            raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
        x = np.asarray(sample, dtype=np.float64)
        xi = np.asarray(noise, dtype=np.float64)
        x0 = _data_prediction(np.asarray(model_output, dtype=np.float64), x, float(self.sigmas[k]),
                              self.config["prediction_type"])

        if k > 0 and self._last_sample is not None:
            order = self._next_corrector_order
            x = self._adams(
                self._last_sample,
                start=k - 1,
                node_indices=[k - i for i in range(order)],
                x0s=([x0] + self._x0s[::-1])[:order],
                noise=self._last_noise,
                tau=self.tau(int(self.timesteps[k - 1])),
            )

        self._x0s = (self._x0s + [x0])[-self._history_len :]

        n = self.num_inference_steps
        p_cap, c_cap = self.predictor_order, self.corrector_order
        if self.config["lower_order_final"]:
            # Near the end there are too few steps left for the high-order interpolant to pay off.
            p_cap, c_cap = min(p_cap, n - k), min(c_cap, n - k + 1)
        predictor_order = min(p_cap, self._warmup + 1)
        self._next_corrector_order = min(c_cap, self._warmup + 2)

        self._last_sample, self._last_noise = x, xi
        prev = self._adams(
            x,
            start=k,
            node_indices=[k - i for i in range(predictor_order)],
            x0s=self._x0s[::-1][:predictor_order],
            noise=xi,
            tau=self.tau(int(self.timesteps[k])),
        )
        self._warmup = min(self._warmup + 1, self._history_len)
        self._step_index += 1
        return prev.astype(np.float32)


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """Build a sampler from its request name and the checkpoint's scheduler_config.json (a DPMSolverMultistep one).

    SA-Solver is built from that same config the way PixArt's app does, SASolverScheduler.from_config(cfg,
    algorithm_type="data_prediction", tau_func=pixart_tau, predictor_order=2, corrector_order=2).
    """
    key = name.upper()
    if key == "DPM-SOLVER":
        return DPMSolverMultistep(config)
    if key == "SA-SOLVER":
        return SASolver(config, predictor_order=2, corrector_order=2, tau=pixart_tau)
    raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULER_NAMES}")
