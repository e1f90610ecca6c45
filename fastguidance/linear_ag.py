"""LinearAG: replace the uncond evaluation by a linear regression on the sampling path.

Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv 2312.12487, §4 (seed ``000_…``): the unconditional prediction of a step is estimated as an
affine combination of past iterates, ``û_t = Σ_j β^c_j·c_j + Σ_j β^u_j·u_j``, with coefficients
fitted by ordinary least squares on sampling paths of the same model and schedule; at run time
estimated steps alternate with CFG steps.

**What is regressed here** (the paper does not list its exact regressors). For model call ``t``
of a run and a window ``W`` (1…4), the regressors are::

    x_t, c_t, c_{t−1}, u_{t−1}, …, c_{t−W}, u_{t−W}, 1

(the current latent and cond prediction, which the cond-only evaluation provides for free, the
last ``W`` calls' cond and uncond predictions, and a constant), and the target is the **guidance
term** ``g_t = c_t − u_t``; then ``û_t = c_t − ĝ_t``. Each call has its own coefficients, shared by
every element and sample. Regressing ``g`` rather than ``u`` makes the ridge penalty pull towards
``ĝ = 0``, i.e. towards ``û = c`` (Adaptive Guidance's cond-only step), not towards ``û = 0``.
History slots before the first call are zero. At run time the history holds what the run used:
the real uncond on guided calls, the estimate on estimated ones.

**Fit** (per call, ridge on standardised regressors): with ``F`` the regressors and ``g`` the
target over all elements of the calibration paths, ``D = diag(FᵀF)``,
``β = D^{-½} (D^{-½} FᵀF D^{-½} + λ·I)^{-1} D^{-½} Fᵀg``. Only the Gram matrices
``[F g]ᵀ[F g]`` are accumulated (float64), so calibration needs constant memory. Every
``holdout_every``-th path is held out; the **held-out relative error** of a call is
``‖ĝ − g‖ / ‖g‖`` on those paths (0 = exact, 1 = as wrong as dropping guidance), computed from their
Gram matrix.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .engine import Action, GuidancePolicy, GuidanceRun, StepContext
from .errors import FastGuidanceError, InvalidInputError, TensorFileError
from .tensorfile import interpreting, load_tensor_file, save_tensor_file

FORMAT = "fastguidance.linear_ag"
FORMAT_VERSION = 1
MAX_WINDOW = 4
POLICY_MODES = ("alternate", "after_step", "error_bound")
#: relative tolerance when matching a run's sigmas to the calibrated ones
SIGMA_TOLERANCE = 1e-3


def regressor_names(window: int) -> list[str]:
    """Names of the regressors, in coefficient order (module docstring)."""
    names = ["x_t", "c_t"]
    for lag in range(1, window + 1):
        names += [f"c_t-{lag}", f"u_t-{lag}"]
    return names + ["1"]


def _regressors(x: torch.Tensor, cond: torch.Tensor, history: Sequence[tuple[torch.Tensor, torch.Tensor]],
                window: int) -> list[torch.Tensor | None]:
    """The regressors of :func:`regressor_names` (``None`` for an empty history slot or the constant)."""
    terms: list[torch.Tensor | None] = [x, cond]
    recent = list(history)[-window:][::-1]  # most recent first
    for lag in range(window):
        terms += list(recent[lag]) if lag < len(recent) else [None, None]
    return terms + [None]


def validate_linear_ag_calibration(window: int, regularization: float, paths: int | None = None) -> None:
    if not 1 <= window <= MAX_WINDOW:
        raise InvalidInputError("window", window, f"use 1 to {MAX_WINDOW} past calls (2 is a good start)")
    if not 0.0 < regularization <= 10.0:
        raise InvalidInputError("regularization", regularization,
                                "use a small positive ridge weight, e.g. 0.001 (larger = closer to cond-only)")
    if paths is not None and paths < 2:
        raise InvalidInputError("paths", paths, "calibrate on at least 2 sampling paths (a few dozen is better): "
                                "raise the batch size or the number of runs")


class LinearAGCalibration:
    """Accumulates the regression's Gram matrices over CFG sampling runs; :meth:`fit` solves them.

    Use :meth:`policy` as the (only) policy of the sampling runs: it lets every call run full CFG
    and records it. Every run must use the same schedule.
    """

    def __init__(self, window: int = 2, holdout_every: int = 4):
        validate_linear_ag_calibration(window, 1e-3)
        if holdout_every < 2:
            raise ValueError("holdout_every must be at least 2")
        self.window = window
        self.holdout_every = holdout_every
        self.paths = 0
        self.schedule: list[float] | None = None
        self.call_sigmas: dict[int, float] = {}
        self.call_steps: dict[int, int] = {}
        self._gram_fit: dict[int, torch.Tensor] = {}
        self._gram_held: dict[int, torch.Tensor] = {}

    @property
    def held_out_paths(self) -> int:
        return self.paths // self.holdout_every

    def policy(self) -> GuidancePolicy:
        return _CalibrationRecorder(self)

    def is_held_out(self, path: int) -> bool:
        return path % self.holdout_every == self.holdout_every - 1

    def _begin_run(self, run: GuidanceRun) -> int:
        if self.schedule is None:
            self.schedule = list(run.schedule)
        elif not _same_schedule(self.schedule, run.schedule):
            raise FastGuidanceError("every LinearAG calibration run must use the same schedule "
                                    f"({len(self.schedule) - 1} steps); this run has {run.total_steps}")
        first_path = self.paths
        self.paths += run.batch_size
        return first_path

    def _record(self, context: StepContext, first_path: int, x: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, history: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        known = self.call_sigmas.setdefault(context.call, context.sigma)
        if not math.isclose(known, context.sigma, rel_tol=SIGMA_TOLERANCE, abs_tol=1e-6):
            raise FastGuidanceError(f"calibration call {context.call} ran at sigma {context.sigma:.5g}, "
                                    f"an earlier run at {known:.5g}: use one sampler and schedule for every run")
        self.call_steps[context.call] = context.step
        batch = x.shape[0]
        columns = []
        for term in _regressors(x, cond, history, self.window):
            columns.append(torch.zeros_like(x) if term is None else term)
        columns[-1] = torch.ones_like(x)
        columns.append(cond - uncond)  # the target g_t
        stacked = torch.stack([column.reshape(batch, -1).float() for column in columns], dim=1)  # [B, P+1, N]
        held = [self.is_held_out(first_path + b) for b in range(batch)]
        for is_held, grams in ((False, self._gram_fit), (True, self._gram_held)):
            rows = [b for b in range(batch) if held[b] == is_held]
            if not rows:
                continue
            part = stacked if len(rows) == batch else torch.cat([stacked[b:b + 1] for b in rows])
            # accumulated where the data is (float64): read once, by fit(), not per model call
            gram = torch.einsum("bpn,bqn->pq", part, part).to(torch.float64)
            if context.call in grams:
                gram = grams[context.call].to(gram.device) + gram
            grams[context.call] = gram

    def fit(self, regularization: float = 1e-3, info: dict[str, Any] | None = None) -> "LinearAGCoefficients":
        """Ridge coefficients and held-out error per call (module docstring)."""
        validate_linear_ag_calibration(self.window, regularization, self.paths)
        if not self._gram_fit or self.schedule is None:
            raise FastGuidanceError("the calibration recorded no guided model call: sample with cfg above 1")
        if not self._gram_held:
            raise FastGuidanceError(f"the calibration has no held-out path: use at least {self.holdout_every} paths")
        calls = sorted(self.call_sigmas)
        self._gram_fit = {call: gram.cpu() for call, gram in self._gram_fit.items()}
        self._gram_held = {call: gram.cpu() for call, gram in self._gram_held.items()}
        size = len(regressor_names(self.window))
        coefficients = torch.zeros(len(calls), size, dtype=torch.float64)
        errors = torch.full((len(calls),), math.nan, dtype=torch.float64)
        for row, call in enumerate(calls):
            gram = self._gram_fit[call]
            features, target = gram[:size, :size], gram[:size, size]
            scale = features.diagonal().clamp(min=0).sqrt()
            scale = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
            standardised = scale[:, None] * features * scale[None, :]
            system = standardised + regularization * torch.eye(size, dtype=torch.float64)
            beta = scale * torch.linalg.solve(system, scale * target)
            coefficients[row] = beta
            held = self._gram_held.get(call)
            if held is not None and held[size, size] > 0:
                residual = beta @ held[:size, :size] @ beta - 2 * beta @ held[:size, size] + held[size, size]
                errors[row] = math.sqrt(max(float(residual), 0.0) / float(held[size, size]))
        metadata = {**(info or {}), "window": self.window, "regularization": regularization, "paths": self.paths,
                    "held_out_paths": self.held_out_paths, "regressors": regressor_names(self.window)}
        return LinearAGCoefficients(
            coefficients=coefficients.float(),
            call_sigmas=torch.tensor([self.call_sigmas[c] for c in calls], dtype=torch.float64),
            call_steps=torch.tensor([self.call_steps[c] for c in calls], dtype=torch.int64),
            schedule=torch.tensor(self.schedule, dtype=torch.float64),
            held_out_error=errors.float(),
            info=metadata,
        )


@dataclass
class _RecordState:
    first_path: int
    history: deque = field(default_factory=deque)


class _CalibrationRecorder(GuidancePolicy):
    """Lets every call run full CFG and feeds it to a :class:`LinearAGCalibration`."""

    name = "linear_ag_calibration"

    def __init__(self, calibration: LinearAGCalibration):
        self.calibration = calibration

    def start(self, run: GuidanceRun) -> _RecordState:
        return _RecordState(self.calibration._begin_run(run), deque(maxlen=self.calibration.window))

    def observe(self, state: _RecordState, context: StepContext, x, cond, uncond, full) -> None:
        if all(full):
            self.calibration._record(context, state.first_path, x, cond, uncond, state.history)
        state.history.append((cond, uncond))


@dataclass(frozen=True, eq=False)
class LinearAGCoefficients:
    """What a calibration found, for one model, sampler and schedule. Saved as safetensors."""

    coefficients: torch.Tensor  # [calls, regressors] float32
    call_sigmas: torch.Tensor  # [calls] sigma of each calibrated model call
    call_steps: torch.Tensor  # [calls] sampling step of each call
    schedule: torch.Tensor  # [steps + 1] the sampled sigmas
    held_out_error: torch.Tensor  # [calls] ‖ĝ − g‖ / ‖g‖ on held-out paths (nan: not measured)
    info: dict[str, Any]  # window, regularization, paths, sampler, scheduler, cfg, model fingerprint, …

    @property
    def window(self) -> int:
        return int(self.info["window"])

    @property
    def steps(self) -> int:
        return len(self.schedule) - 1

    def made_for(self) -> str:
        """One line naming the schedule the file was calibrated for (used in refusals)."""
        sampler = self.info.get("sampler", "?")
        scheduler = self.info.get("scheduler", "?")
        return (f"{self.steps} steps of {sampler} / {scheduler} (sigmas {float(self.schedule[0]):.4g} → "
                f"{float(self.schedule[-2]):.4g}, {len(self.call_sigmas)} model calls)")

    def error_by_step(self) -> list[tuple[int, float]]:
        """(step, held-out error) per calibrated call, for reports."""
        return [(int(step), float(error)) for step, error in zip(self.call_steps, self.held_out_error)]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        metadata = {"format": FORMAT, "version": FORMAT_VERSION, "method": "linear_ag", **self.info,
                    "steps": self.steps, "schedule": [float(s) for s in self.schedule],
                    "error_per_call": [None if math.isnan(e) else float(e) for e in self.held_out_error.tolist()]}
        return save_tensor_file(path, {"coefficients": self.coefficients, "call_sigmas": self.call_sigmas,
                                       "call_steps": self.call_steps, "schedule": self.schedule,
                                       "held_out_error": self.held_out_error}, metadata, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "LinearAGCoefficients":
        tensors, metadata = load_tensor_file(path, FORMAT, FORMAT_VERSION,
                                             "calibrate one with FastGuidance_LinearAGCalibrate",
                                             may_hold_nan=("held_out_error",))
        expected = {"coefficients", "call_sigmas", "call_steps", "schedule", "held_out_error"}
        window = metadata.get("window")
        if set(tensors) != expected or not isinstance(window, int) or isinstance(window, bool) \
                or not 1 <= window <= MAX_WINDOW:
            raise TensorFileError(f"{path} is a LinearAG file with missing parts (tensors {sorted(tensors)}, window "
                                  f"{window!r}): calibrate it again")
        with interpreting(path, "LinearAG calibration"):
            calls, size = tensors["coefficients"].shape
            vectors = ("call_sigmas", "call_steps", "held_out_error", "schedule")
            if size != len(regressor_names(window)) or calls < 1 or any(tensors[name].dim() != 1 for name in vectors) \
                    or any(tensors[name].shape[0] != calls for name in vectors[:3]) or tensors["schedule"].shape[0] < 2:
                raise TensorFileError(f"{path} has inconsistent shapes: calibrate it again")
            steps = tensors["call_steps"]
            if steps.is_floating_point() or int(steps.min()) < 0 or int(steps.max()) >= tensors["schedule"].shape[0]:
                raise TensorFileError(f"{path} names steps outside its schedule: calibrate it again")
            info = {k: v for k, v in metadata.items() if k not in ("format", "version", "method", "steps", "schedule",
                                                                   "error_per_call")}
            return cls(tensors["coefficients"].float(), tensors["call_sigmas"].double(), steps.long(),
                       tensors["schedule"].double(), tensors["held_out_error"].float(), info)


def _same_schedule(first: Sequence[float], second: Sequence[float]) -> bool:
    return len(first) == len(second) and all(
        math.isclose(a, b, rel_tol=SIGMA_TOLERANCE, abs_tol=1e-6) for a, b in zip(first, second))


class ScheduleMismatchError(InvalidInputError):
    """The run's schedule is not the one the coefficients were calibrated for."""


@dataclass
class _RunState:
    interpolate: bool
    history: deque
    total_steps: int
    #: per call index: (coefficients as Python numbers, held-out error); filled lazily
    rows: dict[int, tuple[list[float], float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _HostTable:
    """The calibration as Python numbers, read from its tensors once (never per model call)."""

    coefficients: list[list[float]]  # float32 values
    call_sigmas: list[float]
    held_out_error: list[float]

    @classmethod
    def of(cls, table: "LinearAGCoefficients") -> "_HostTable":
        return cls(table.coefficients.float().tolist(), table.call_sigmas.tolist(), table.held_out_error.tolist())


@dataclass(frozen=True, eq=False)  # identity equality: it holds tensors
class LinearAG(GuidancePolicy):
    """Estimate the uncond of chosen calls from the calibrated regression (module docstring).

    Args:
        coefficients: a calibration (:meth:`LinearAGCalibration.fit` or :meth:`LinearAGCoefficients.load`).
        mode: which calls are estimated (never the first call, which has no history):
            ``alternate`` odd steps (the paper's policy); ``after_step`` every step from
            ``after_step`` on; ``error_bound`` calls whose held-out error is at most ``error_bound``.
        interpolate_sigmas: use the coefficients on another schedule, picking them by noise level
            (linear in log sigma between calibrated calls); otherwise such a run is refused.
    """

    coefficients: LinearAGCoefficients
    mode: str = "alternate"
    after_step: int = 1
    error_bound: float = 0.3
    interpolate_sigmas: bool = False
    name = "linear_ag"

    def __post_init__(self) -> None:
        validate_linear_ag(self.mode, self.after_step, self.error_bound)
        # the per-call path reads no tensor: coefficients enter the estimate as Python numbers
        object.__setattr__(self, "_host", _HostTable.of(self.coefficients))

    def start(self, run: GuidanceRun) -> _RunState:
        matches = _same_schedule(self.coefficients.schedule.tolist(), run.schedule)
        if not matches and not self.interpolate_sigmas:
            raise self._mismatch(f"this run samples {run.total_steps} steps (sigmas {run.schedule[0]:.4g} → "
                                 f"{run.schedule[-2] if len(run.schedule) > 1 else 0:.4g})")
        return _RunState(interpolate=not matches, history=deque(maxlen=self.coefficients.window),
                         total_steps=run.total_steps)

    def may_skip_uncond(self, state: _RunState) -> bool:
        """False for settings that never estimate in this run, which is then plain CFG: ``after_step`` at or
        past the run's last step, or an ``error_bound`` below every calibrated call's held-out error
        (interpolated errors lie between calibrated ones, so none can be lower)."""
        if self.mode == "after_step":
            return self.after_step < state.total_steps
        if self.mode == "error_bound":
            return any(not math.isnan(error) and error <= self.error_bound for error in self._host.held_out_error)
        return state.total_steps > 1

    def _mismatch(self, what: str) -> ScheduleMismatchError:
        return ScheduleMismatchError(
            "coefficients", self.coefficients.info.get("name", "(calibration)"),
            f"it was calibrated for {self.coefficients.made_for()}; {what}. Calibrate for this sampler, scheduler "
            "and step count, or turn on interpolate_sigmas to pick coefficients by noise level")

    def _row(self, state: _RunState, context: StepContext) -> tuple[list[float], float]:
        if context.call in state.rows:
            return state.rows[context.call]
        table: _HostTable = self._host
        if state.interpolate:
            row = _interpolate(table, context.sigma)
        else:
            if context.call >= len(table.call_sigmas) or not math.isclose(
                    table.call_sigmas[context.call], context.sigma, rel_tol=SIGMA_TOLERANCE, abs_tol=1e-6):
                raise self._mismatch(f"model call {context.call} of this run is at sigma {context.sigma:.4g} "
                                     f"(another sampler: {self.coefficients.info.get('sampler', '?')} was calibrated)")
            row = (table.coefficients[context.call], table.held_out_error[context.call])
        state.rows[context.call] = row
        return row

    def propose(self, state: _RunState, context: StepContext) -> Action | None:
        if not state.history:
            return None
        beta, error = self._row(state, context)
        if not all(math.isfinite(value) for value in beta):
            return None
        if self.mode == "alternate":
            wanted = context.step % 2 == 1
        elif self.mode == "after_step":
            wanted = context.step >= self.after_step
        else:
            wanted = not math.isnan(error) and error <= self.error_bound
        return Action.ESTIMATE if wanted else None

    def observe(self, state: _RunState, context: StepContext, x, cond, uncond, full) -> None:
        state.history.append((cond, uncond))

    def estimate(self, state: _RunState, context: StepContext, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``û = c − ĝ`` in fp32. The coefficients are Python numbers (float32 values): nothing is copied to
        the device, and the products are the same float32 products as with device tensors."""
        weights, _ = self._row(state, context)
        guidance = torch.full_like(cond, weights[-1], dtype=torch.float32)
        for index, term in enumerate(_regressors(x, cond, state.history, self.coefficients.window)[:-1]):
            if term is not None:
                guidance = guidance + weights[index] * term.float()
        return (cond.float() - guidance).to(cond.dtype)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "mode": self.mode, "after_step": self.after_step, "error_bound": self.error_bound,
                "interpolate_sigmas": self.interpolate_sigmas, "window": self.coefficients.window,
                "calibrated_for": self.coefficients.made_for()}


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python number; beyond float32's range: ±inf)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _interpolate(table: _HostTable, sigma: float) -> tuple[list[float], float]:
    """Coefficients and error at ``sigma``: linear in log sigma between calibrated calls, clamped.

    The coefficients are combined with float32 rounding at each operation, the arithmetic of the
    float32 tensors they are stored in: ``f32(f32(1 − w)·a) + f32(f32(w)·b)``, rounded."""
    sigmas = table.call_sigmas
    order = sorted(range(len(sigmas)), key=lambda i: sigmas[i])
    log_sigma = math.log(max(sigma, 1e-8))
    logs = [math.log(max(sigmas[i], 1e-8)) for i in order]
    if log_sigma <= logs[0]:
        i = order[0]
        return table.coefficients[i], table.held_out_error[i]
    if log_sigma >= logs[-1]:
        i = order[-1]
        return table.coefficients[i], table.held_out_error[i]
    for position in range(1, len(order)):
        if log_sigma <= logs[position]:
            low, high = order[position - 1], order[position]
            span = logs[position] - logs[position - 1]
            weight = 0.0 if span == 0 else (log_sigma - logs[position - 1]) / span
            keep, take = _float32(1 - weight), _float32(weight)
            row = [_float32(_float32(keep * a) + _float32(take * b))
                   for a, b in zip(table.coefficients[low], table.coefficients[high])]
            error = (1 - weight) * table.held_out_error[low] + weight * table.held_out_error[high]
            return row, error
    raise AssertionError("unreachable: sigma within the calibrated range")


def validate_linear_ag(mode: str, after_step: int, error_bound: float) -> None:
    if mode not in POLICY_MODES:
        raise InvalidInputError("mode", mode, f"choose one of {', '.join(POLICY_MODES)}")
    if after_step < 1:
        raise InvalidInputError("after_step", after_step, "use 1 or more: the first step has no history to regress on")
    if not 0.0 <= error_bound <= 10.0:
        raise InvalidInputError("error_bound", error_bound,
                                "use a held-out relative error between 0 and 1 (0.3 = estimate where the "
                                "calibration was within 30% of the true guidance)")
