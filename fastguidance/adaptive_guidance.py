"""Adaptive Guidance: stop guiding a sample once its cond and uncond predictions agree.

Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv 2312.12487, §3: the cosine ``γ_t = cos(ε_c, ε_u)`` between the conditional and unconditional
noise predictions rises towards 1 during sampling; once ``γ_t ≥ γ̄`` (0.991 in the paper) the
remaining steps use the conditional prediction only, halving their cost. Here the cosine is
measured per sample (:func:`fastguidance.guidance.per_sample_cosine`) and each sample latches on its
own.

Extensions (not in the paper, measured by the benchmark): ``after_cutoff="reuse"`` keeps applying
the guidance term ``g = c − u`` of the sample's last guided step instead of dropping guidance;
``cosine_space="denoised"`` measures ``cos(c, u)`` on the denoised predictions instead of the
paper's noise directions (see :func:`fastguidance.guidance.per_sample_cosine` for why);
``convergence`` adds a second condition to the latch.

**The defaults deviate from the paper**, because its configuration gives unguided pictures on
schedules with σ_max ≈ 14.6. The paper's premise is that γ rises towards 1 during sampling. On
the reference model the noise-space cosine does the opposite: it starts at 0.9999 (the bound in
:func:`~fastguidance.guidance.per_sample_cosine`) and *falls* to 0.996, so the paper's threshold
0.991 latches every sample at its first step (the bench's 61% adherence is the no-guidance level);
the cosine of the denoised predictions rises as the paper describes (0.96 → 0.99999). So the
defaults measure the denoised cosine, with threshold 0.9998 (on the bench 15% fewer evaluations at
−0.4 points of adherence; 0.9995 saves 19% at −1.2 on the bench's 96 prompts but −2.7 on its first
48, too close to the 2-point limit for a default), and latch a sample only once its cosine distance ``δ = 1 − γ`` has also fallen to
``convergence`` (0.5) times the distance measured at the sample's first guided step in the window:
``γ_i ≥ γ̄  and  δ_i ≤ ρ·δ_first``. The second condition needs no tuning per model: it cannot
hold at the first step unless the two predictions are identical there (then guidance does
nothing and cutting it costs nothing), and it never holds while the cosine falls, so a model whose
cosine does not rise keeps plain CFG instead of losing its guidance. The paper's exact rule is
``cosine_space="noise"``, ``threshold=0.991``, ``convergence=1.0`` (the condition off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engine import Action, CallRecord, GuidancePolicy, GuidanceRun, StepContext
from .errors import InvalidInputError
from .validation import require_number
from .guidance import COSINE_SPACES

AFTER_CUTOFF_MODES = ("cond_only", "reuse")
#: cosines never exceed 1, so a threshold above it disables the cutoff (parity with plain CFG)
MAX_THRESHOLD = 1.0001
#: ``convergence`` at this value turns the second latch condition off (the paper's rule)
CONVERGENCE_OFF = 1.0
#: the paper's configuration (arXiv 2312.12487, §4: γ̄ = 0.991 on the noise predictions)
PAPER_SETTINGS = {"threshold": 0.991, "cosine_space": "noise", "convergence": CONVERGENCE_OFF}


@dataclass
class _RunState:
    latched: list[bool]
    sigma_start: float  # the window, as sigmas: sigma_start >= sigma >= sigma_end
    sigma_end: float
    first_distance: list[float | None]  # δ = 1 − γ at the sample's first measured call in the window
    latched_at: list[int | None]  # the step whose cosine latched the sample
    first_step: list[int | None]  # the step of that first measured call
    highest: list[float | None]  # the highest cosine measured in the window (for the run's advice)

    def in_window(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


@dataclass(frozen=True)
class AdaptiveGuidance(GuidancePolicy):
    """Per-sample cosine-gated CFG cutoff.

    Args:
        threshold: γ̄, the cosine at which a sample stops being guided (default 0.9998 on the
            denoised cosine; 0.991 is the paper's value on the noise cosine). Values above 1 never
            cut (the result is plain CFG).
        start_percent, end_percent: the window of the denoising process (0 = first step, 1 = last)
            in which the cutoff may happen and applies; outside it every step is guided.
        after_cutoff: ``cond_only`` (paper: ``û = c``) or ``reuse`` (``û = c − (σ/σ_last)·g_last``, see the engine).
        cosine_space: ``noise`` (paper: ``cos(x − c, x − u)``) or ``denoised`` (``cos(c, u)``, the default).
        convergence: ρ of the second latch condition ``δ_i ≤ ρ·δ_first`` (module docstring);
            1.0 turns it off (the paper's rule), 0.5 is the default.
    """

    threshold: float = 0.9998
    start_percent: float = 0.0
    end_percent: float = 1.0
    after_cutoff: str = "cond_only"
    cosine_space: str = "denoised"
    convergence: float = 0.5
    name = "ag"
    wants_cosine = True

    def __post_init__(self) -> None:
        validate_adaptive_guidance(self.threshold, self.start_percent, self.end_percent, self.after_cutoff,
                                   self.cosine_space, self.convergence)
        object.__setattr__(self, "uses_guidance_cache", self.after_cutoff == "reuse")

    @property
    def _cutoff_action(self) -> Action:
        return Action.REUSE if self.after_cutoff == "reuse" else Action.COND_ONLY

    def start(self, run: GuidanceRun) -> _RunState:
        unknown: list = [None] * run.batch_size
        return _RunState(
            latched=[False] * run.batch_size,
            sigma_start=run.percent_to_sigma(self.start_percent),
            sigma_end=run.percent_to_sigma(self.end_percent),
            first_distance=list(unknown), latched_at=list(unknown), first_step=list(unknown), highest=list(unknown),
        )

    def propose(self, state: _RunState, context: StepContext) -> list[Action] | None:
        if not state.in_window(context.sigma) or not any(state.latched):
            return None
        return [self._cutoff_action if latched else Action.FULL for latched in state.latched]

    def may_skip_uncond(self, state: _RunState) -> bool:
        return self.threshold <= 1.0  # cosines never exceed 1: above it AG is plain CFG

    def measured(self, state: _RunState, record: CallRecord, cosine: list[float | None]) -> None:
        if not state.in_window(record.sigma):
            return
        for sample, value in enumerate(cosine):
            if value is None or state.latched[sample]:
                continue
            distance = 1.0 - value
            if state.first_distance[sample] is None:
                state.first_distance[sample], state.first_step[sample] = distance, record.step
            previous = state.highest[sample]
            state.highest[sample] = value if previous is None else max(previous, value)
            converged = (self.convergence >= CONVERGENCE_OFF
                         or distance <= self.convergence * state.first_distance[sample])
            if value >= self.threshold and converged:
                state.latched[sample], state.latched_at[sample] = True, record.step

    def advice(self, state: _RunState) -> list[str]:
        """What the user should know after a run that cut at the first step or never cut, with the fix."""
        if self.threshold > 1.0:
            return []  # plain CFG was asked for
        messages = []
        first = [b for b, step in enumerate(state.latched_at) if step is not None and step == state.first_step[b]]
        if first:
            messages.append(
                f"Adaptive Guidance cut guidance at the first step for {len(first)} of {len(state.latched)} image(s): "
                f"they came out unguided (cosine_space {self.cosine_space}, threshold {self.threshold}). Fix: use the "
                f"defaults (cosine_space denoised, threshold {AdaptiveGuidance.threshold}, convergence "
                f"{AdaptiveGuidance.convergence}), or raise the threshold above the first cosine on the node's chart.")
        measured = [value for value in state.highest if value is not None]
        if measured and not any(state.latched):
            messages.append(
                f"Adaptive Guidance never cut guidance (highest cosine {max(measured):.5f}, threshold {self.threshold}"
                + ("" if self.convergence >= CONVERGENCE_OFF else f", convergence {self.convergence}")
                + "): this run cost as much as plain CFG. Fix: lower the threshold below the cosines the node's chart "
                "shows for the last steps"
                + (", or raise convergence towards 1.0" if self.convergence < CONVERGENCE_OFF else "") + ".")
        return messages

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": self.threshold, "start_percent": self.start_percent,
                "end_percent": self.end_percent, "after_cutoff": self.after_cutoff, "cosine_space": self.cosine_space,
                "convergence": self.convergence}


def validate_window(start_percent: float, end_percent: float) -> None:
    """The cut window: two fractions of the schedule, in order."""
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        require_number(name, value, 0.0, 1.0, "use a fraction of the schedule between 0.0 and 1.0")
    if start_percent > end_percent:
        raise InvalidInputError("start_percent", start_percent,
                                f"the window must start before it ends: set start_percent <= end_percent ({end_percent})")


def validate_adaptive_guidance(threshold: float, start_percent: float, end_percent: float, after_cutoff: str,
                               cosine_space: str = "denoised", convergence: float = 0.5) -> None:
    """Raise :class:`InvalidInputError` naming the first bad setting and how to fix it."""
    require_number("threshold", threshold, 0.0, MAX_THRESHOLD,
                   f"use a cosine between 0 and {MAX_THRESHOLD} (default 0.9998 on the denoised cosine; 0.991 is "
                   "the paper's value on the noise cosine; above 1 never cuts guidance)")
    validate_window(start_percent, end_percent)
    if after_cutoff not in AFTER_CUTOFF_MODES:
        raise InvalidInputError("after_cutoff", after_cutoff, f"choose one of {', '.join(AFTER_CUTOFF_MODES)}")
    if cosine_space not in COSINE_SPACES:
        raise InvalidInputError("cosine_space", cosine_space, f"choose one of {', '.join(COSINE_SPACES)}")
    require_number("convergence", convergence, 0.0, CONVERGENCE_OFF,
                   "use a fraction between 0.0 and 1.0: 0.5 cuts only once 1 − cosine has halved since the first "
                   "step; 1.0 turns the condition off (the paper's rule)")
