"""DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095, as diffusers' `DPMSolverMultistepScheduler` runs it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import Scheduler, StepPlan, Terms, alpha_sigma_lambda, data_terms, merge_config, refuse

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


class DPMSolverMultistep(Scheduler):
    """DPM-Solver++(2M) with the midpoint second-order rule (Lu et al. 2022, Alg. 2), diffusers' variant.

    Order schedule (diffusers `step`): the first step is first order (no history yet), the middle steps second order,
    and the last step first order whenever it lands on sigma = 0 (or when lower_order_final and N < 15, or
    euler_at_final): extrapolating x0 into lambda = +inf is unstable, and the first-order step to s = 0 is exactly x0.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        cfg = merge_config(config, _DPM_DEFAULTS)
        refuse(cfg, "algorithm_type", ("dpmsolver++",))
        refuse(cfg, "solver_type", ("midpoint",))
        refuse(cfg, "solver_order", (1, 2))
        refuse(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        super().__init__(cfg)
        self._reset()

    def _final_sigma(self) -> float:
        if self.config["final_sigmas_type"] == "zero":
            return 0.0
        return float(self.schedule.sigmas[0])

    def plan(self) -> StepPlan:
        """x0 from the model output; the first-order step (DDIM), or the second-order midpoint step once the previous
        x0 is kept; x0 kept for the next step."""
        k = self._step_index
        cfg = self.config
        n = self.num_inference_steps
        s_k, s_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        last = k == n - 1
        final_first_order = last and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        if cfg["solver_order"] == 1 or k == 0 or final_first_order:
            following = self._first_order(s_k, s_next)
        else:
            following = self._second_order_midpoint(float(self.sigmas[k - 1]), s_k, s_next)
        self._step_index += 1
        return StepPlan(values=(("x0", data_terms(s_k, cfg["prediction_type"])), ("next", following)),
                        keep=(("x0_1", "x0"),))

    @staticmethod
    def _first_order(s: float, s_next: float) -> Terms:
        """DPM-Solver++1 = DDIM: x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0, h = lambda_t - lambda_s."""
        if s_next == 0.0:
            # sigma_t = 0, alpha_t = 1, h = +inf: the formula's limit is x0 (diffusers gets it through inf arithmetic).
            return (("x0", 1.0),)
        alpha_s, sigma_s, lam_s = alpha_sigma_lambda(s)
        alpha_t, sigma_t, lam_t = alpha_sigma_lambda(s_next)
        h = lam_t - lam_s
        return (("x", sigma_t / sigma_s), ("x0", -alpha_t * math.expm1(-h)))

    @staticmethod
    def _second_order_midpoint(s_prev: float, s: float, s_next: float) -> Terms:
        """DPM-Solver++(2M): the first-order step plus half its x0 weight times the backward difference D1.

        D1 = (x0_k - x0_{k-1}) / r0 with r0 = h_{k-1}/h_k rescales the previous step's difference to this step's
        length, so D0 + D1/2 is x0 extrapolated to the interval's midpoint in lambda:
        x_t = (sigma_t/sigma_s) x - w x0 - w/2 (x0 - x0_prev) h/h_prev, w = alpha_t (e^{-h} - 1).
        """
        _, _, lam_prev = alpha_sigma_lambda(s_prev)
        _, sigma_s, lam_s = alpha_sigma_lambda(s)
        alpha_t, sigma_t, lam_t = alpha_sigma_lambda(s_next)
        h, h_prev = lam_t - lam_s, lam_s - lam_prev
        weight = alpha_t * math.expm1(-h)
        half_d1 = 0.5 * weight * (h / h_prev)
        return (("x", sigma_t / sigma_s), ("x0", -weight - half_d1), ("x0_1", half_d1))
