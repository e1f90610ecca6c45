"""Fixed guidance windows: the cheap baselines every adaptive method has to beat.

Two rules that need no measurement during sampling; outside its window a step is cond only
(``û = c``, engine action ``COND_ONLY``), inside it is plain CFG:

- :class:`CFGWindow`: guided for the first fraction ``f`` of the sampling steps, cond only after.
  This is what ComfyUI users run today without this pack (the host's own CFG override by schedule
  percentage, KJNodes' ScheduledCFGGuidance, ppm's CFGLimiterGuider) and "Step AG" (arXiv
  2506.08351: CFG on the first steps only, 20–30% faster). With ``N`` steps the guided steps are
  ``0 … n−1``, ``n = ⌊f·N + ½⌋``: ``N + n`` model evaluations per image instead of ``2N``, so the
  fraction that matches a method's evaluation count ``E`` is ``f = (E − N)/N``.
- :class:`GuidanceInterval`: Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves
  Sample and Distribution Quality in Diffusion Models" (NeurIPS 2024, arXiv 2404.07724): the
  guidance weight of its guided denoiser is ``w`` for ``σ ∈ (σ_lo, σ_hi]`` and 1 (no guidance) elsewhere. The paper
  searches the interval per model on FID; the default here, ``(0.28, 5.42]``, is the one it reports
  for EDM2 (``σ_max = 80`` there). It guides neither the first, noisiest steps (where guidance
  narrows the distribution) nor the last ones (where it changes little). Deviation: none in the
  rule; the interval is not searched for each model (the benchmark measures two).

Both rules decide from the step (or its σ) alone, so every call of a midpoint sampler's step gets
the same action, and the result does not depend on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..engine import Action, GuidancePolicy, GuidanceRun, StepContext
from ..errors import InvalidInputError
from ..validation import require_number

#: the interval Kynkäänniemi et al. 2024 report for EDM2 (σ_lo, σ_hi]
PAPER_INTERVAL = (0.28, 5.42)


def window_guided_steps(total_steps: int, fraction: float) -> int:
    """``n = ⌊f·N + ½⌋``: how many first steps a :class:`CFGWindow` of ``fraction`` guides."""
    return max(0, min(total_steps, math.floor(fraction * total_steps + 0.5)))


def window_fraction_for(total_steps: int, evaluations: float) -> float:
    """The fraction ``f = n/N`` whose window costs the evaluation count nearest ``evaluations`` per
    image (``N + n``, clamped to ``[N, 2N]``): the window "at matched evaluations"."""
    guided = max(0, min(total_steps, math.floor(evaluations - total_steps + 0.5)))
    return guided / total_steps if total_steps else 0.0


@dataclass(frozen=True)
class CFGWindow(GuidancePolicy):
    """CFG on the first ``fraction`` of the steps, cond only after (module docstring).

    Args:
        fraction: ``f`` in [0, 1]; 1 guides every step (plain CFG), 0 none (cond only).
    """

    fraction: float = 0.5
    name = "cfg_window"

    def __post_init__(self) -> None:
        require_number("fraction", self.fraction, 0.0, 1.0,
                       "use the share of the first steps to guide, between 0.0 (none) and 1.0 (every step: plain CFG)")

    def start(self, run: GuidanceRun) -> int:
        return window_guided_steps(run.total_steps, self.fraction)

    def propose(self, state: int, context: StepContext) -> Action | None:
        return None if context.step < state else Action.COND_ONLY

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "fraction": self.fraction}


@dataclass(frozen=True)
class GuidanceInterval(GuidancePolicy):
    """CFG only while ``sigma_low < σ ≤ sigma_high``, cond only elsewhere (module docstring).

    Args:
        sigma_low, sigma_high: the interval; the defaults are the paper's EDM2 values (0.28, 5.42].
    """

    sigma_low: float = PAPER_INTERVAL[0]
    sigma_high: float = PAPER_INTERVAL[1]
    name = "guidance_interval"

    def __post_init__(self) -> None:
        require_number("sigma_low", self.sigma_low, 0.0, math.inf,
                       "use a noise level of 0 or more (the paper's 0.28; 0 guides down to the last step)")
        require_number("sigma_high", self.sigma_high, 0.0, math.inf,
                       "use a noise level above sigma_low (the paper's 5.42; a value above the schedule's "
                       "largest sigma guides from the first step)")
        if not self.sigma_low < self.sigma_high:
            raise InvalidInputError("sigma_high", self.sigma_high,
                                    f"the interval must not be empty: use sigma_high > sigma_low ({self.sigma_low})")

    def propose(self, state: Any, context: StepContext) -> Action | None:
        return None if self.sigma_low < context.sigma <= self.sigma_high else Action.COND_ONLY

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "sigma_low": self.sigma_low, "sigma_high": self.sigma_high}
