"""AGD as an engine policy: every model call is one adapted, guided evaluation (action ``ADAPTER``).

Jensen et al., "Efficient Distillation of Classifier-Free Guidance using Adapters", arXiv 2503.07274:
adapters trained on CFG-guided trajectories make the conditional pass return CFG's prediction at the
scale ``ω`` they are given, so the uncond is never evaluated. The policy only tells the engine so
(which skips the uncond and returns ``û = c``, making CFG's combination the identity); the host
activates the adapters on the conditional pass (see ``nodes/adapter_patch.py``).
"""

from __future__ import annotations

from typing import Any

from ..engine import Action, GuidancePolicy, StepContext


class AdapterGuidance(GuidancePolicy):
    """Proposes ``ADAPTER`` for every sample of every call."""

    name = "agd"
    reads_sigma = False  # the same action at every call: adapters alone read nothing from the device per call

    def __init__(self, omega: float | None, strength: float = 1.0):
        self.omega = omega  # None: the sampler's cfg
        self.strength = strength

    def propose(self, state: Any, context: StepContext) -> Action:
        return Action.ADAPTER

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "omega": self.omega, "strength": self.strength}
