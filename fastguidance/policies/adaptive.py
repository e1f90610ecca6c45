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
paper's noise directions (see :func:`fastguidance.guidance.per_sample_cosine` for why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import Action, CallRecord, GuidancePolicy, GuidanceRun, StepContext
from ..errors import InvalidInputError
from ..guidance import COSINE_SPACES

AFTER_CUTOFF_MODES = ("cond_only", "reuse")
#: cosines never exceed 1, so a threshold above it disables the cutoff (parity with plain CFG)
MAX_THRESHOLD = 1.0001


@dataclass
class _RunState:
    latched: list[bool]
    sigma_start: float  # the window, as sigmas: sigma_start >= sigma >= sigma_end
    sigma_end: float

    def in_window(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


@dataclass(frozen=True)
class AdaptiveGuidance(GuidancePolicy):
    """Per-sample cosine-gated CFG cutoff.

    Args:
        threshold: γ̄, the cosine at which a sample stops being guided; 0.991 is the paper's value.
            Values above 1 never cut (the result is plain CFG).
        start_percent, end_percent: the window of the denoising process (0 = first step, 1 = last)
            in which the cutoff may happen and applies; outside it every step is guided.
        after_cutoff: ``cond_only`` (paper: ``û = c``) or ``reuse`` (``û = c − (σ/σ_last)·g_last``, see the engine).
        cosine_space: ``noise`` (paper: ``cos(x − c, x − u)``) or ``denoised`` (``cos(c, u)``).
    """

    threshold: float = 0.991
    start_percent: float = 0.0
    end_percent: float = 1.0
    after_cutoff: str = "cond_only"
    cosine_space: str = "noise"
    name = "ag"
    wants_cosine = True

    def __post_init__(self) -> None:
        validate_adaptive_guidance(self.threshold, self.start_percent, self.end_percent, self.after_cutoff,
                                   self.cosine_space)
        object.__setattr__(self, "uses_guidance_cache", self.after_cutoff == "reuse")

    @property
    def _cutoff_action(self) -> Action:
        return Action.REUSE if self.after_cutoff == "reuse" else Action.COND_ONLY

    def start(self, run: GuidanceRun) -> _RunState:
        return _RunState(
            latched=[False] * run.batch_size,
            sigma_start=run.percent_to_sigma(self.start_percent),
            sigma_end=run.percent_to_sigma(self.end_percent),
        )

    def propose(self, state: _RunState, context: StepContext) -> list[Action] | None:
        if not state.in_window(context.sigma) or not any(state.latched):
            return None
        return [self._cutoff_action if latched else Action.FULL for latched in state.latched]

    def measured(self, state: _RunState, record: CallRecord, cosine: list[float | None]) -> None:
        if not state.in_window(record.sigma):
            return
        for sample, value in enumerate(cosine):
            if value is not None and value >= self.threshold:
                state.latched[sample] = True

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": self.threshold, "start_percent": self.start_percent,
                "end_percent": self.end_percent, "after_cutoff": self.after_cutoff, "cosine_space": self.cosine_space}


def validate_adaptive_guidance(threshold: float, start_percent: float, end_percent: float, after_cutoff: str,
                               cosine_space: str = "noise") -> None:
    """Raise :class:`InvalidInputError` naming the first bad setting and how to fix it."""
    if not 0.0 <= threshold <= MAX_THRESHOLD:
        raise InvalidInputError("threshold", threshold,
                                f"use a cosine between 0 and {MAX_THRESHOLD} (0.991 is the paper's value; "
                                "above 1 never cuts guidance)")
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= value <= 1.0:
            raise InvalidInputError(name, value, "use a fraction of the schedule between 0.0 and 1.0")
    if start_percent > end_percent:
        raise InvalidInputError("start_percent", start_percent,
                                f"the window must start before it ends: set start_percent <= end_percent ({end_percent})")
    if after_cutoff not in AFTER_CUTOFF_MODES:
        raise InvalidInputError("after_cutoff", after_cutoff, f"choose one of {', '.join(AFTER_CUTOFF_MODES)}")
    if cosine_space not in COSINE_SPACES:
        raise InvalidInputError("cosine_space", cosine_space, f"choose one of {', '.join(COSINE_SPACES)}")
