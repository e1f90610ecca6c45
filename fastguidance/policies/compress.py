"""Compress Guidance: compute the guidance on a few steps only, reuse or compress it elsewhere.

Dinh et al., "Compress Guidance in Conditional Diffusion Sampling" (seed ``002_…``), §3.3. The
paper's formulas did not survive in our copy of the text; what is implemented here follows its
words, and the deviations are named.

**Guided steps** (the paper's set ``G``, its Eq. 15 skewed towards early steps). For ``N`` sampling
steps and ``n`` guided steps, with skew exponent ``k``::

    t_j = floor(N · (j / n)^k),   j = 0 … n−1

then made strictly increasing and kept in range (``t_j ← min(max(t_j, t_{j−1} + 1), N − n + j)``). ``t_0 = 0``: the first step is always guided. ``k = 1`` spaces the guided steps evenly
(the paper's "uniform skipping"); ``k > 1`` puts more of them early, where the guidance changes
fastest (paper, Appendix D and Theorem 2). ``n`` comes from ``guided_steps`` or from the
compression rate ``r = N / n`` (``n = ⌊N / r + ½⌋``, at least 1).

**Modes**, with CFG written as ``c + (s − 1)·g`` and ``g = c − u``:

- ``reuse`` (the paper's Eq. 12–13): a skipped step reuses the sample's last computed guidance,
  ``û = c − (σ/σ_last)·g_last``, so it still gets ``(s − 1)·(σ/σ_last)·g_last``: the guidance is
  reused in noise space, where the paper reuses its gradient (engine action REUSE).
- ``compress`` (the paper's Eq. 14: "compressing the duplicated gradients into one guidance
  step"): skipped steps are not guided (``û = c``); a guided step that covers ``m`` steps (itself
  and the skipped steps up to the next guided one) gets ``m`` times the guidance,
  ``c + m·(s − 1)·g`` (engine guidance weight ``w = m``).

Both modes spend ``N + n`` model evaluations per image instead of ``2N`` (one per midpoint call
more for two-call samplers). Guided steps count sampling steps: every call of a guided step is
guided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..engine import Action, GuidancePolicy, GuidanceRun, StepContext
from ..errors import InvalidInputError

COMPRESS_MODES = ("reuse", "compress")
MAX_SKEW = 8.0


def guided_step_indices(total_steps: int, guided_steps: int, skew: float = 1.0) -> list[int]:
    """The guided steps ``G`` (module docstring): sorted, distinct, starting at 0, ``min(n, N)`` of them."""
    if total_steps < 1:
        return []
    count = max(1, min(guided_steps, total_steps))
    indices: list[int] = []
    for j in range(count):
        index = math.floor(total_steps * (j / count) ** skew)
        if indices and index <= indices[-1]:
            index = indices[-1] + 1
        # leave room for the guided steps still to come (matters for skew < 1, which crowds them late)
        indices.append(min(index, total_steps - count + j))
    return indices


def guided_step_count(total_steps: int, guided_steps: int = 0, compression: float = 0.0) -> int:
    """``n`` from an explicit count (``guided_steps > 0``) or from the rate ``compression = N / n``."""
    if guided_steps > 0:
        return min(guided_steps, max(total_steps, 1))
    return max(1, min(total_steps, math.floor(total_steps / compression + 0.5)))  # halves round up


def compression_weights(total_steps: int, guided: list[int]) -> dict[int, int]:
    """For ``compress`` mode: guided step → number of steps it covers (itself and the skipped ones after it)."""
    bounds = guided + [total_steps]
    return {step: bounds[i + 1] - step for i, step in enumerate(guided)}


@dataclass
class _RunState:
    guided: frozenset[int]
    weights: dict[int, int]


@dataclass(frozen=True)
class CompressGuidance(GuidancePolicy):
    """Guidance on a skewed subset of steps; reuse (``û = c − (σ/σ_last)·g_last``) or compress it elsewhere.

    Args:
        compression: steps per guided step, ``r = N / n`` (used when ``guided_steps`` is 0);
            1 guides every step (plain CFG).
        guided_steps: ``n`` directly; 0 = use ``compression``.
        skew: the exponent ``k``; 1 = evenly spread, larger = more guided steps early.
        mode: ``reuse`` or ``compress`` (module docstring).
    """

    compression: float = 4.0
    guided_steps: int = 0
    skew: float = 2.0
    mode: str = "reuse"
    name = "compg"

    def __post_init__(self) -> None:
        validate_compress_guidance(self.compression, self.guided_steps, self.skew, self.mode)
        object.__setattr__(self, "uses_guidance_cache", self.mode == "reuse")

    def start(self, run: GuidanceRun) -> _RunState:
        count = guided_step_count(run.total_steps, self.guided_steps, self.compression)
        guided = guided_step_indices(run.total_steps, count, self.skew)
        weights = compression_weights(run.total_steps, guided) if self.mode == "compress" else {}
        return _RunState(frozenset(guided), weights)

    def propose(self, state: _RunState, context: StepContext) -> Action | None:
        if context.step in state.guided:
            return None
        return Action.REUSE if self.mode == "reuse" else Action.COND_ONLY

    def guidance_weight(self, state: _RunState, context: StepContext) -> float | None:
        return state.weights.get(context.step)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "compression": self.compression, "guided_steps": self.guided_steps,
                "skew": self.skew, "mode": self.mode}


def validate_compress_guidance(compression: float, guided_steps: int, skew: float, mode: str) -> None:
    """Raise :class:`InvalidInputError` naming the first bad setting and how to fix it."""
    if guided_steps < 0:
        raise InvalidInputError("guided_steps", guided_steps,
                                "use 0 (take the number from compression) or a positive number of guided steps")
    if guided_steps == 0 and not compression >= 1.0:
        raise InvalidInputError("compression", compression,
                                "use a rate of at least 1.0 (steps per guided step; 1.0 guides every step, "
                                "4.0 guides a quarter of them)")
    if not 0.0 < skew <= MAX_SKEW:
        raise InvalidInputError("skew", skew,
                                f"use an exponent between 0 and {MAX_SKEW}: 1.0 spreads guided steps evenly, "
                                "larger values put more of them early")
    if mode not in COMPRESS_MODES:
        raise InvalidInputError("mode", mode, f"choose one of {', '.join(COMPRESS_MODES)}")
