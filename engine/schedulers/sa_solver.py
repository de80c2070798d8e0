"""SA-Solver, the stochastic Adams predictor-corrector of Xue et al. 2023, arXiv 2309.05019, as diffusers'
`SASolverScheduler` runs it (data prediction, predictor and corrector of order 2, the PixArt tau(t))."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .base import SLOTS, Scheduler, StepPlan, Terms, alpha_sigma_lambda, data_terms, merge_config

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
        cfg = merge_config(config, _SA_DEFAULTS)
        super().__init__(cfg)
        self.predictor_order = predictor_order
        self.corrector_order = corrector_order
        self.tau = tau
        self._history_len = max(predictor_order, corrector_order - 1)
        self._reset()

    def _final_sigma(self) -> float:
        return float(self.schedule.sigmas[0])

    def _reset(self) -> None:
        super()._reset()
        self._next_corrector_order = 0
        self._warmup = 0  # diffusers' lower_order_nums: how many past x0 the orders may use

    def _lam(self, index: int) -> float:
        return alpha_sigma_lambda(float(self.sigmas[index]))[2]

    def _adams(self, start: str, interval: int, nodes: list[str], newest: int, noise: str, tau: float) -> Terms:
        """x_t = e^{-tau^2 h} (sigma_t/sigma_s) x_s + (1+tau^2) sigma_t e^{-tau^2 lambda_t} sum_i b_i x0_i
        + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi, over [lambda_s, lambda_t] = [lambda(interval), lambda(interval+1)],
        from the arrays named `start` (x_s), `nodes` (x0 at the steps newest, newest-1, ...) and `noise` (xi).

        The data-prediction SDE with constant tau on the interval, solved exactly except for x0(lambda), which is
        replaced by its Lagrange interpolant through (lambda of each node's step, its x0).
        """
        _, sigma_s, lam_s = alpha_sigma_lambda(float(self.sigmas[interval]))
        _, sigma_t, lam_t = alpha_sigma_lambda(float(self.sigmas[interval + 1]))
        h = lam_t - lam_s
        c = 1.0 + tau * tau
        lams = [self._lam(newest - i) for i in range(len(nodes))]
        b = _lagrange_exp_integrals(lams, lam_s, lam_t, c)
        if len(lams) == 2:
            # diffusers' (and the official code's) empirical O(h^3) change for order 2, "similar to UniPC": the
            # divided difference (x0_0 - x0_1)/(n_0 - n_1) gets weight e^{c lambda_t} h^2/2 instead of the exact
            # int e^{c lambda} (lambda - lambda_s) = e^{c lambda_t} (ch - 1 + e^{-ch})/c^2.
            delta = math.exp(c * lam_t) * (h * h / 2 - (h * c + math.expm1(-c * h)) / (c * c)) / (lams[0] - lams[1])
            b[0] += delta
            b[1] -= delta
        scale = c * sigma_t * math.exp(-tau * tau * lam_t)
        noise_std = sigma_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
        return ((start, math.exp(-tau * tau * h) * (sigma_t / sigma_s)),
                *((node, scale * float(bi)) for node, bi in zip(nodes, b, strict=True)), (noise, noise_std))

    def plan(self) -> StepPlan:
        """x0 from the model output; the corrector (k > 0) redoes the previous interval through the new x0 too; the
        predictor steps from the corrected sample with this step's noise; the last x0s, the corrected sample and the
        noise are kept for the next step's corrector and predictor."""
        k = self._step_index
        history = ["x0", *SLOTS[: self._history_len]]  # newest first: this step's x0, then the kept ones
        values: list[tuple[str, Terms]] = [("x0", data_terms(float(self.sigmas[k]), self.config["prediction_type"]))]
        if k > 0:
            values.append(("corrected", self._adams("last_sample", k - 1, history[: self._next_corrector_order], k,
                                                    "last_noise", self.tau(int(self.timesteps[k - 1])))))
        else:
            values.append(("corrected", (("x", 1.0),)))
        n = self.num_inference_steps
        p_cap, c_cap = self.predictor_order, self.corrector_order
        if self.config["lower_order_final"]:
            # Near the end there are too few steps left for the high-order interpolant to pay off.
            p_cap, c_cap = min(p_cap, n - k), min(c_cap, n - k + 1)
        predictor_order = min(p_cap, self._warmup + 1)
        self._next_corrector_order = min(c_cap, self._warmup + 2)
        values.append(("next", self._adams("corrected", k, history[:predictor_order], k, "noise",
                                           self.tau(int(self.timesteps[k])))))
        self._warmup = min(self._warmup + 1, self._history_len)
        self._step_index += 1
        kept = tuple(zip(SLOTS[: self._history_len], history, strict=False))  # x0_1 <- x0, x0_2 <- x0_1
        return StepPlan(values=tuple(values), keep=(*kept, ("last_sample", "corrected"), ("last_noise", "noise")))
