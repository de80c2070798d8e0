"""The two PixArt-Sigma samplers, in numpy, reproducing diffusers' schedulers as PixArt-Sigma configures them.

* `DPMSolverMultistep` (dpm_solver.py): DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095.
* `SASolver` (sa_solver.py): the stochastic Adams predictor-corrector of Xue et al. 2023, arXiv 2309.05019.

Both share the noise schedule and the `Scheduler` interface (base.py); `make_scheduler` builds one by request name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import PREDICTION_TYPES, NoiseSchedule, Scheduler
from .dpm_solver import DPMSolverMultistep
from .sa_solver import SASolver, pixart_tau

SCHEDULER_NAMES = ("DPM-SOLVER", "SA-SOLVER")

__all__ = ["PREDICTION_TYPES", "SCHEDULER_NAMES", "DPMSolverMultistep", "NoiseSchedule", "SASolver", "Scheduler",
           "make_scheduler", "pixart_tau"]


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
