"""engine/schedulers/ against diffusers' DPMSolverMultistepScheduler and SASolverScheduler, step by step.

Tolerance: rtol 1e-5 and atol 1e-5 on latents of order 1-5, except where noted. Bit equality is not reachable: this
torch build's CPU float32 sqrt is not correctly rounded (one ulp off on ~14% of inputs; numpy's is exact), so diffusers'
scalar sigma_t/alpha_t are often one ulp off ours, and the epsilon-to-x0 conversion multiplies that by sigma/alpha
(157 at t=999). Measured (seeds 0-5, 3x4x16x16): <= 2.4e-6 abs for N >= 5, 8.8e-6 for N = 2, and 3.3e-5 for N = 1,
whose single step returns x0 from s = 157 (hence atol 1e-4 there).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.schedulers import DPMSolverMultistep, SASolver, Scheduler, make_scheduler, pixart_tau

# diffusers (numpy 2) warns about torch's __array__ signature when it builds its sigmas; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# scheduler/scheduler_config.json of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (docs/pixart-sigma.md §1.5), as
# json.load gives it.
PIXART_SIGMA_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -math.inf,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
STEP_COUNTS = (1, 2, 5, 14, 20, 25, 35)
NAMES = ("DPM-SOLVER", "SA-SOLVER")
SHAPE = (2, 4, 8, 8)


def _diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    # The scheduler modules alone: importing the diffusers package top level costs seconds more.
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
    import diffusers.schedulers.scheduling_sasolver as sasolver_module

    return torch, dpm_module, sasolver_module


def reference_scheduler(name: str, config: dict, sa_orders: tuple[int, int] = (2, 2)):
    """diffusers' scheduler built the way PixArt-Sigma's pipeline and app build it."""
    _, dpm_module, sasolver_module = _diffusers()
    dpm = dpm_module.DPMSolverMultistepScheduler.from_config(config)
    if name == "DPM-SOLVER":
        return dpm
    return sasolver_module.SASolverScheduler.from_config(
        dpm.config,
        algorithm_type="data_prediction",
        tau_func=lambda t: 1 if 200 <= t <= 800 else 0,
        predictor_order=sa_orders[0],
        corrector_order=sa_orders[1],
    )


def our_scheduler(name: str, config: dict, sa_orders: tuple[int, int] = (2, 2)) -> Scheduler:
    if sa_orders == (2, 2):
        return make_scheduler(name, config)
    return SASolver(config, predictor_order=sa_orders[0], corrector_order=sa_orders[1])


def denoiser_eps(x: np.ndarray, s: float, x0: np.ndarray, prediction: str = "epsilon") -> np.ndarray:
    """What a model would output at ratio s if the clean latent were x0 (so latents stay O(1)): its epsilon, or for
    the other prediction types the v or the x0 of the same denoiser."""
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    eps = (x.astype(np.float64) - alpha * x0) / (s * alpha)
    if prediction == "v_prediction":
        return (alpha * eps - s * alpha * x0).astype(np.float32)
    if prediction == "sample":
        return np.asarray(x0, dtype=np.float32)
    return eps.astype(np.float32)


def run_both(
    name: str,
    config: dict,
    n: int,
    seed: int,
    monkeypatch,
    model: str = "denoiser",
    sa_orders: tuple[int, int] = (2, 2),
    float64_reference: bool = False,
):
    prediction = config.get("prediction_type", "epsilon")
    """Run ours and diffusers side by side, each on its own latents; yield (step, ours, reference) per step.

    model="denoiser": each scheduler's epsilon comes from denoiser_eps on its own latents with the same random x0
    per step, as a real model sees its own sample. model="random": both get the identical standard-normal epsilon.
    SA-Solver: diffusers' randn_tensor is replaced by a function handing out the same arrays our step gets.
    float64_reference: diffusers' sigmas are cast to float64 so its scalar coefficients are computed in float64.
    """
    torch, _, sasolver_module = _diffusers()
    rng = np.random.default_rng(seed)
    ref = reference_scheduler(name, config, sa_orders)
    ours = our_scheduler(name, config, sa_orders)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    if float64_reference:
        ref.sigmas = ref.sigmas.double()

    pending: list[np.ndarray] = []
    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None, **kwargs):
        draws.append((tuple(shape), dtype))
        return torch.from_numpy(pending.pop().copy()).to(dtype)

    monkeypatch.setattr(sasolver_module, "randn_tensor", fake_randn)

    x_ours = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x_ours.copy())
    target = rng.standard_normal(SHAPE)
    for k, t in enumerate(ref.timesteps):
        s = float(ref.sigmas[k])
        x0 = target + 0.5 * rng.standard_normal(SHAPE)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        if model == "denoiser":
            eps_ours, eps_ref = denoiser_eps(x_ours, s, x0, prediction), denoiser_eps(x_ref.numpy(), s, x0, prediction)
        else:
            eps_ours = eps_ref = rng.standard_normal(SHAPE).astype(np.float32)
        pending.append(noise)
        x_ref = ref.step(torch.from_numpy(eps_ref.copy()), t, x_ref, return_dict=False)[0]
        x_ours = ours.step(eps_ours, x_ours, noise if ours.needs_noise else None)
        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        yield k, x_ours, x_ref.numpy()
    if name == "SA-SOLVER":
        # One full-shape draw per step, every step (also where tau = 0 gives it zero weight).
        assert draws == [(SHAPE, torch.float32)] * len(ref.timesteps)
    else:
        assert draws == []


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_timesteps_and_sigmas_match_diffusers(name: str, n: int) -> None:
    ref = reference_scheduler(name, PIXART_SIGMA_CONFIG)
    ours = make_scheduler(name, PIXART_SIGMA_CONFIG)
    ref.set_timesteps(n)
    ts = ours.set_timesteps(n)
    assert ts.dtype == np.int64 and ts is ours.timesteps
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    # The training schedule is bit-identical; the per-step ratios s = sqrt((1 - acp)/acp) within torch's sqrt ulp.
    np.testing.assert_array_equal(ours.schedule.alphas_cumprod, ref.alphas_cumprod.numpy())
    assert ours.sigmas.dtype == np.float32
    np.testing.assert_array_max_ulp(ours.sigmas, ref.sigmas.numpy(), maxulp=1)
    # The final sigma: DPM-Solver++ lands on 0 (final_sigmas_type "zero"); SA-Solver on sigma_min = s(0) ~ 0.0100.
    if name == "DPM-SOLVER":
        assert ours.sigmas[-1] == 0.0
    else:
        assert ours.sigmas[-1] == ours.schedule.sigmas[0] and abs(ours.sigmas[-1] - 0.0100) < 1e-5


def test_pixart_timesteps_are_the_spec_values() -> None:
    ours = make_scheduler("DPM-SOLVER", PIXART_SIGMA_CONFIG)
    spec_n20 = "999 949 899 849 799 749 699 649 599 549 500 450 400 350 300 250 200 150 100 50"
    assert ours.set_timesteps(20).tolist() == [int(t) for t in spec_n20.split()]
    assert ours.set_timesteps(14).tolist() == [999, 928, 856, 785, 714, 642, 571, 500, 428, 357, 285, 214, 143, 71]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_every_step_matches_diffusers(name: str, n: int, monkeypatch) -> None:
    atol = 1e-4 if n == 1 else 1e-5
    for k, ours, ref in run_both(name, PIXART_SIGMA_CONFIG, n, seed=n, monkeypatch=monkeypatch):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=atol, err_msg=f"{name} N={n} step {k}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_every_step_matches_diffusers_on_identical_random_eps(name: str, n: int, monkeypatch) -> None:
    # Pure noise as model output drives latents to O(100s), and with epsilon independent of the latent the solver is
    # linear with gain alpha_T/alpha_0 ~ 157, so float32 rounding grows with the scale: atol is 1e-5 of the scale.
    for k, ours, ref in run_both(name, PIXART_SIGMA_CONFIG, n, seed=100 + n, monkeypatch=monkeypatch, model="random"):
        atol = 1e-5 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=atol, err_msg=f"{name} N={n} step {k}")


SPACING_CASES = {
    "leading+offset": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "sigma_min": {"final_sigmas_type": "sigma_min"},
    "lambda_clipped": {"lambda_min_clipped": -4.0},
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(SPACING_CASES))
@pytest.mark.parametrize("n", (1, 5, 14, 20, 61))
def test_config_variants_match_diffusers(name: str, case: str, n: int, monkeypatch) -> None:
    # N=61 with trailing spacing: diffusers' float arange yields 62 timesteps ending in -1; kept for parity.
    config = {**PIXART_SIGMA_CONFIG, **SPACING_CASES[case]}
    ref = reference_scheduler(name, config)
    ours = make_scheduler(name, config)
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ours.set_timesteps(n), ref.timesteps.numpy())
    np.testing.assert_array_max_ulp(ours.sigmas, ref.sigmas.numpy(), maxulp=1)
    atol = 1e-4 if n == 1 else 1e-5
    for k, x_ours, x_ref in run_both(name, config, n, seed=7 * n, monkeypatch=monkeypatch):
        np.testing.assert_allclose(x_ours, x_ref, rtol=1e-5, atol=atol, err_msg=f"{name} {case} N={n} step {k}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("n", (1, 5, 20))
def test_other_prediction_types_match_diffusers(name: str, prediction: str, n: int, monkeypatch) -> None:
    # PixArt-Σ is epsilon; a v-prediction checkpoint (the embedded default's training target) runs through the same
    # solvers once its output is turned into x0.
    config = {**PIXART_SIGMA_CONFIG, "prediction_type": prediction}
    atol = 1e-4 if n == 1 else 1e-5
    for k, ours, ref in run_both(name, config, n, seed=11 * n, monkeypatch=monkeypatch):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=atol, err_msg=f"{name} {prediction} N={n} step {k}")


def test_prediction_type_changes_the_step() -> None:
    # Guards the test above against both sides ignoring prediction_type.
    x = np.ones(SHAPE, np.float32)
    steps = []
    for prediction in ("epsilon", "v_prediction", "sample"):
        scheduler = make_scheduler("DPM-SOLVER", {**PIXART_SIGMA_CONFIG, "prediction_type": prediction})
        scheduler.set_timesteps(5)
        steps.append(scheduler.step(0.5 * x, x))
    assert not np.allclose(steps[0], steps[1]) and not np.allclose(steps[1], steps[2])


@pytest.mark.parametrize("orders", [(1, 1), (1, 2), (3, 3), (3, 4), (4, 2)])
def test_other_sa_orders_match_diffusers(orders: tuple[int, int], monkeypatch) -> None:
    # PixArt uses (2, 2); the other orders exercise the general Lagrange integrals and the order ramps. At orders 3-4
    # diffusers' monomial-expanded Lagrange weights lose ~1e-5 relative in float32 (lambda^3 terms cancelling), so
    # the reference here runs its own formulas on float64 sigmas; float32 it differs from ours by up to 2.6e-5.
    for k, ours, ref in run_both(
        "SA-SOLVER", PIXART_SIGMA_CONFIG, 20, seed=5, monkeypatch=monkeypatch, sa_orders=orders, float64_reference=True
    ):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=f"orders {orders} step {k}")


def test_config_variants_change_the_schedule() -> None:
    # Guards the variant test above against a config key being ignored by both sides' defaults.
    base = make_scheduler("DPM-SOLVER", PIXART_SIGMA_CONFIG).set_timesteps(20)
    for case, extra in SPACING_CASES.items():
        variant = make_scheduler("DPM-SOLVER", {**PIXART_SIGMA_CONFIG, **extra})
        ts = variant.set_timesteps(20)
        if case == "sigma_min":
            assert variant.sigmas[-1] > 0.0
        else:
            assert not np.array_equal(ts, base), case


def _run_alone(name: str, n: int, eps: np.ndarray, noise: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
    sched = make_scheduler(name, PIXART_SIGMA_CONFIG)
    sched.set_timesteps(n)
    outs = []
    for k in range(n):
        x = sched.step(eps[k], x, noise[k] if sched.needs_noise else None)
        outs.append(x)
    return outs


@pytest.mark.parametrize("name", NAMES)
def test_batched_rows_equal_rows_computed_alone(name: str) -> None:
    n, batch = 14, 3
    rng = np.random.default_rng(1)
    eps = rng.standard_normal((n, batch, 4, 6, 5)).astype(np.float32)
    noise = rng.standard_normal((n, batch, 4, 6, 5)).astype(np.float32)
    x = rng.standard_normal((batch, 4, 6, 5)).astype(np.float32)
    together = _run_alone(name, n, eps, noise, x)
    for row in range(batch):
        alone = _run_alone(name, n, eps[:, row : row + 1], noise[:, row : row + 1], x[row : row + 1])
        for k in range(n):
            np.testing.assert_array_equal(together[k][row : row + 1], alone[k], err_msg=f"row {row} step {k}")


@pytest.mark.parametrize("name", NAMES)
def test_set_timesteps_resets_all_state(name: str) -> None:
    rng = np.random.default_rng(2)
    eps = rng.standard_normal((20, *SHAPE)).astype(np.float32)
    noise = rng.standard_normal((20, *SHAPE)).astype(np.float32)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    sched = make_scheduler(name, PIXART_SIGMA_CONFIG)
    sched.set_timesteps(7)
    for k in range(4):  # an abandoned run leaves history behind
        sched.step(eps[k], x, noise[k])
    sched.set_timesteps(20)
    y = x
    for k, expected in enumerate(_run_alone(name, 20, eps, noise, x)):
        y = sched.step(eps[k], y, noise[k])
        np.testing.assert_array_equal(y, expected)


def test_dpm_last_step_lands_on_x0_without_inf() -> None:
    rng = np.random.default_rng(3)
    sched = make_scheduler("DPM-SOLVER", PIXART_SIGMA_CONFIG)
    sched.set_timesteps(5)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    for _ in range(4):
        x = sched.step(rng.standard_normal(SHAPE).astype(np.float32), x)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    s = float(sched.sigmas[-2])
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    with np.errstate(all="raise"):
        out = sched.step(eps, x)
    assert sched.sigmas[-1] == 0.0
    np.testing.assert_allclose(out, (x - s * alpha * eps.astype(np.float64)) / alpha, rtol=1e-6, atol=1e-6)


def test_sa_noise_counts_only_where_tau_is_one() -> None:
    # N=20 timesteps: 999 949 899 849 | 799 ... 200 | 150 100 50; tau = 1 only in the middle block (200 <= t <= 800).
    n = 20
    rng = np.random.default_rng(4)
    eps = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    noise = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    base = _run_alone("SA-SOLVER", n, eps, noise, x)
    timesteps = [int(t) for t in make_scheduler("SA-SOLVER", PIXART_SIGMA_CONFIG).set_timesteps(n)]
    counted = []
    for k in range(n):
        other = noise.copy()
        other[k] = rng.standard_normal(SHAPE)
        changed = _run_alone("SA-SOLVER", n, eps, other, x)
        # Step k's predictor injects its noise (and step k+1's corrector reuses it); earlier steps never see it.
        for a, b in zip(base[:k], changed[:k], strict=True):
            np.testing.assert_array_equal(a, b)
        if not np.array_equal(base[-1], changed[-1]):
            counted.append(k)
            assert not np.allclose(base[k], changed[k], atol=1e-3)  # it enters at its own step, not later
    assert counted == [k for k, t in enumerate(timesteps) if 200 <= t <= 800] and len(counted) == 13


def test_make_scheduler_interface() -> None:
    dpm = make_scheduler("DPM-SOLVER", PIXART_SIGMA_CONFIG)
    sa = make_scheduler("sa-solver", PIXART_SIGMA_CONFIG)
    assert isinstance(dpm, DPMSolverMultistep) and isinstance(dpm, Scheduler)
    assert isinstance(sa, SASolver) and isinstance(sa, Scheduler)
    assert dpm.needs_noise is False and sa.needs_noise is True
    assert dpm.init_noise_sigma == 1.0 and sa.init_noise_sigma == 1.0
    assert (sa.predictor_order, sa.corrector_order, sa.tau) == (2, 2, pixart_tau)
    with pytest.raises(ValueError):
        make_scheduler("EULER", PIXART_SIGMA_CONFIG)

    x = np.zeros(SHAPE, np.float32)
    sa.set_timesteps(2)
    with pytest.raises(ValueError):
        sa.step(x, x)  # SA-Solver without noise
    dpm.set_timesteps(2)
    dpm.step(x, x)
    dpm.step(x, x)
    with pytest.raises(RuntimeError):
        dpm.step(x, x)  # more steps than timesteps
    with pytest.raises(ValueError):
        dpm.set_timesteps(0)


@pytest.mark.parametrize(
    "extra",
    [
        {"use_karras_sigmas": True},
        {"solver_type": "heun"},
        {"solver_order": 3},
        {"algorithm_type": "sde-dpmsolver++"},
        {"prediction_type": "flow_prediction"},
        {"thresholding": True},
        {"final_sigmas_type": "sigma_max"},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_unsupported_dpm_options_are_refused(extra: dict) -> None:
    with pytest.raises(NotImplementedError):
        make_scheduler("DPM-SOLVER", {**PIXART_SIGMA_CONFIG, **extra})
