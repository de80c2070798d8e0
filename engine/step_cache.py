"""Step caching: a transformer row skips model work on steps where its output is predicted to barely change. Two
mechanisms, one per engine (`Engine(step_cache_mechanism=...)`): "forecast" skips the whole transformer call and
takes a forecast of the model's output (RowCache); "blocks" runs the first block(s) every step and skips the rest
when their residual barely changed (BlockRowCache; engine.transformer_parts runs the transformer's parts).

Each row of a batch (one image's prompt half, or its negative-prompt half) decides from its own history only, so a
request's image does not depend on the requests it runs with. The decision and the forecast follow published
training-free methods, written out so their arithmetic can be checked (o: what a row keeps of its outputs, by
default the data estimate x0 its model output implies; x: its input sample; i: the step index):

* **When to skip** (criterion "output", after TeaCache/MagCache, arXiv 2411.19108 and 2506.09045): a row's relative
  change per step between its last two computed steps, `|o1 - o0| / |o1| / (i1 - i0)`, is carried on; at step i the
  change since the last computed step is predicted as that rate times `i - i1`. Or (criterion "input", EasyCache,
  arXiv 2507.02860): a model's relative output change follows its relative input change at a rate
  `k = (|o1 - o0| / |o0|) / (|x1 - x0| / |x0|)`, so the change is predicted as `k |x_i - x1| / |x1|`.
  The row skips while the prediction stays under the mode's threshold.
* **What to use instead** (TaylorSeer, arXiv 2503.06923, first order): the last kept output extrapolated along the
  timesteps, `o1 + (o1 - o0) (t_i - t1) / (t1 - t0)`, or reused as is. Kept as a data estimate ("data" space), the
  forecast is turned back into a model output at the row's current sample, so the sample's own noise (which
  SA-Solver changes at every step) stays exact.

The first and the last few steps always compute (layout is decided early, details late), and so does every step
after `max_skips` skipped in a row. A guided image's two halves decide together (engine.generation): guidance
weighs them by g and 1 - g, so the errors of two forecasts made at the same step largely cancel, where a lone
forecast half would be amplified g times (measured with `fast` at guidance 4.5: 10 dB against 28 dB PSNR to
`off`). Everything else stays exact: guidance,
the samplers and their noise streams see the forecast exactly where they would have seen the model's output.

* **Blocks** (first-block-residual caching: FBCache, and diffusers' FirstBlockCache whose rule this is): the
  head (embeddings and the first n blocks) runs for every row; its residual r (output minus input) is compared with
  r' at the row's last computed step, and the row skips the body while `mean|r - r'| / mean|r'|` stays under the
  threshold, adding the body's residual cached at that step to its current head output instead. A skipped row still
  sees its current input, timestep and text through the head and the tail (final norm and projection).

Memory: a forecasting row keeps its last input and two outputs (the prediction half of the channels): three arrays
the size of its latents; a blocks row two arrays of its hidden states (tokens x width: 19 MB each for a 1024² row
of the real model). Both are freed when the request finishes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.schedulers.base import data_terms
from engine.vocabulary import DEFAULT_STEP_CACHE_MECHANISM, STEP_CACHE_MECHANISMS, STEP_CACHE_MODES

FORECASTS = ("reuse", "linear")
CRITERIA = ("input", "output")
SPACES = ("model", "data")
ARRAYS_PER_ROW = 3  # the last computed input and two outputs, each the size of one image's latents


@dataclass(frozen=True)
class CachePolicy:
    """How eagerly rows skip: `threshold` bounds the predicted relative change since the last computed step;
    `first_steps` and `last_steps` are fractions of the run always computed (at least one step each); `max_skips`
    skipped steps in a row at most; `criterion`, `forecast` and `space` pick the variants above."""

    threshold: float
    first_steps: float = 0.1
    last_steps: float = 0.1
    max_skips: int = 2
    criterion: str = "output"
    forecast: str = "linear"
    space: str = "data"

    def __post_init__(self) -> None:
        for name, choices in (("criterion", CRITERIA), ("forecast", FORECASTS), ("space", SPACES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: one of {choices}, not {getattr(self, name)!r}")

    def always_computed(self, step_index: int, total_steps: int) -> bool:
        first = max(1, round(self.first_steps * total_steps))
        last = max(1, round(self.last_steps * total_steps)) if self.last_steps > 0 else 0
        return step_index < first or step_index >= total_steps - last


# The modes a request names ("off" has no policy: every row computes every step, exactly as without caching),
# chosen with benchmarks/step_cache_quality.py on the trained default (README "Step caching").
POLICIES: dict[str, CachePolicy] = {
    "balanced": CachePolicy(threshold=0.2),
    "fast": CachePolicy(threshold=0.4, max_skips=4),
}
# The "blocks" mechanism's (its threshold bounds the head residual's relative change; criterion, forecast and space
# do not apply): balanced at the threshold diffusers' FirstBlockCache was measured with here, fast a step further,
# then measured with the same benchmark (README "Step caching": forecast does less work at comparable accuracy).
BLOCK_POLICIES: dict[str, CachePolicy] = {
    "balanced": CachePolicy(threshold=0.2),
    "fast": CachePolicy(threshold=0.3, max_skips=4),
}
assert set(POLICIES) | {"off"} == set(BLOCK_POLICIES) | {"off"} == set(STEP_CACHE_MODES)


Conversion = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (sample, array) -> array


def data_conversions(s: float, prediction_type: str) -> tuple[Conversion, Conversion]:
    """(model output -> data estimate, data estimate -> model output) at noise ratio s = sigma/alpha, for a sample x:
    the samplers' own relation (engine.schedulers.base.data_terms), x0 = a x + b model. Forecasting the data
    estimate and converting back at the current sample keeps the sample's own noise in the model output, which a
    stochastic sampler (SA-Solver) changes at every step."""
    terms = dict(data_terms(s, prediction_type))
    a, b = np.float32(terms.get("x", 0.0)), np.float32(terms.get("model", 0.0))
    return (lambda x, model: a * x + b * model), (lambda x, x0: (x0 - a * x) / b)


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(a, dtype=np.float64))))


class RowCache:
    """One transformer row's history: the inputs and outputs of its last two computed steps."""

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.inputs: list[np.ndarray] = []  # last two computed inputs, oldest first
        self.outputs: list[np.ndarray] = []  # and their outputs
        self.timesteps: list[float] = []
        self.steps: list[int] = []  # and their step indices
        self.skipped = 0  # steps skipped since the last computed one
        self.rate: float | None = None  # k: relative output change per relative input change, last two computed

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.outputs) + (self.inputs[-1].nbytes if self.inputs else 0)

    def computes(self, x: np.ndarray, step_index: int, total_steps: int) -> bool:
        """Whether this row runs the model at `step_index` for input `x`."""
        if len(self.outputs) < 2 or self.rate is None or self.skipped >= self.policy.max_skips:
            return True
        if self.policy.always_computed(step_index, total_steps):
            return True
        if self.policy.criterion == "output":  # the last computed change per step, carried on
            o0, o1 = self.outputs
            s0, s1 = self.steps
            per_step = _norm(o1 - o0) / max(_norm(o1), 1e-12) / (s1 - s0)
            predicted = per_step * (step_index - s1)
        else:
            last = self.inputs[-1]
            predicted = self.rate * _norm(x - last) / max(_norm(last), 1e-12)
        return predicted >= self.policy.threshold

    def record(self, x: np.ndarray, t: float, output: np.ndarray, step_index: int, to_data: Conversion) -> None:
        """A computed step's input and output (copies are kept; the output as the data estimate it implies, with
        `space` "data")."""
        if self.policy.space == "data":
            output = to_data(x, output)
        if self.outputs:
            o0, x0 = self.outputs[-1], self.inputs[-1]
            change_in = _norm(x - x0) / max(_norm(x0), 1e-12)
            change_out = _norm(output - o0) / max(_norm(o0), 1e-12)
            self.rate = change_out / change_in if change_in > 0 else None
        else:
            self.rate = None
        self.inputs = [x.copy()]
        self.outputs = [*self.outputs[-1:], output.copy()]
        self.timesteps = [*self.timesteps[-1:], float(t)]
        self.steps = [*self.steps[-1:], step_index]
        self.skipped = 0

    def forecast(self, x: np.ndarray, t: float, from_data: Conversion) -> np.ndarray:
        """The model output this row takes at timestep `t` for input `x` instead of running the model."""
        self.skipped += 1
        o0, o1 = self.outputs
        if self.policy.forecast == "reuse":
            out = o1
        else:
            t0, t1 = self.timesteps
            out = o1 + (o1 - o0) * np.float32((t - t1) / (t1 - t0))
        return from_data(x, out) if self.policy.space == "data" else out


class BlockRowCache:
    """One transformer row's head residual and body residual at its last computed step (the "blocks" mechanism)."""

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.head_residual: np.ndarray | None = None
        self.body_residual: np.ndarray | None = None
        self.skipped = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.head_residual, self.body_residual) if a is not None)

    def computes(self, head_residual: np.ndarray, step_index: int, total_steps: int) -> bool:
        """Whether this row runs the body at `step_index`, its head having made `head_residual`."""
        if self.head_residual is None or self.skipped >= self.policy.max_skips:
            return True
        if self.policy.always_computed(step_index, total_steps):
            return True
        last = self.head_residual
        change = np.mean(np.abs(head_residual - last), dtype=np.float64) / max(
            float(np.mean(np.abs(last), dtype=np.float64)), 1e-12)
        return change >= self.policy.threshold

    def record(self, head_residual: np.ndarray, body_residual: np.ndarray) -> None:
        """A computed step's residuals (kept as copies)."""
        self.head_residual, self.body_residual = head_residual.copy(), body_residual
        self.skipped = 0

    def reuse(self) -> np.ndarray:
        """The body residual this row adds to its head output instead of running the body."""
        self.skipped += 1
        return self.body_residual


class StepCache:
    """A request's rows: its images' prompt halves, then (when guided) their negative-prompt halves, in the order a
    transformer batch lays them out (engine.generation)."""

    def __init__(self, mode: str, images: int, guided: bool, mechanism: str = DEFAULT_STEP_CACHE_MECHANISM):
        self.mechanism = mechanism
        row, policy = (RowCache, POLICIES[mode]) if mechanism == "forecast" else (BlockRowCache, BLOCK_POLICIES[mode])
        self.rows: list[RowCache] | list[BlockRowCache] = [row(policy) for _ in range(images * (2 if guided else 1))]

    @property
    def forecasts(self) -> bool:
        """Rows skip the whole transformer call and forecast its output (else they run its head and tail)."""
        return self.mechanism == "forecast"

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)


def step_cache_for(mode: str, images: int, guided: bool,
                   mechanism: str = DEFAULT_STEP_CACHE_MECHANISM) -> StepCache | None:
    """None for "off": such a request steps exactly as the engine does without caching."""
    if mode not in STEP_CACHE_MODES:
        raise ValueError(f"step_cache: one of {STEP_CACHE_MODES}, not {mode!r}")
    if mechanism not in STEP_CACHE_MECHANISMS:
        raise ValueError(f"step_cache_mechanism: one of {STEP_CACHE_MECHANISMS}, not {mechanism!r}")
    return None if mode == "off" else StepCache(mode, images, guided, mechanism)
