"""What the benchmark runs: one list of method variants, each a name, its settings and its policies.

The benchmark's loop (:mod:`fastguidance.bench`) never names a method. A method joins the
benchmark by adding a factory to :data:`VARIANT_FACTORIES`; combinations are variants whose
``method`` joins the parts with ``+`` (``ag+compg``) and whose policies are the parts' policies
(the engine's combination rule decides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .engine import GuidancePolicy
from .policies import AdaptiveGuidance


@dataclass(frozen=True)
class BenchVariant:
    """One row of the benchmark."""

    method: str  # none, cfg, ag, compg, linear_ag, agd, adadiff, or parts joined by "+"
    settings: dict = field(default_factory=dict)
    make_policies: Callable[[], Sequence[GuidancePolicy]] = tuple
    guided: bool = True  # False: no guidance at all (cfg scale 1, one evaluation per step)
    scale: float | None = None  # CFG scale of this row; None: the benchmark's --scale

    @property
    def label(self) -> str:
        if not self.settings:
            return self.method
        return self.method + " " + " ".join(f"{key}={value}" for key, value in self.settings.items())


def baseline_variants() -> list[BenchVariant]:
    """No guidance, CFG at the benchmark's scale (the reference of every row), CFG at other scales."""
    return [BenchVariant("none", guided=False), BenchVariant("cfg")] + [
        BenchVariant("cfg", {"scale": scale}, scale=scale) for scale in (2.0, 8.0)]


def adaptive_guidance_variants() -> list[BenchVariant]:
    """The paper's threshold, a lower one, and the reuse extension."""
    variants = []
    for threshold in (0.991, 0.98):
        variants.append(BenchVariant("ag", {"threshold": threshold},
                                     lambda threshold=threshold: [AdaptiveGuidance(threshold=threshold)]))
    variants.append(BenchVariant("ag", {"threshold": 0.98, "after_cutoff": "reuse"},
                                 lambda: [AdaptiveGuidance(threshold=0.98, after_cutoff="reuse")]))
    return variants


#: every method's variants, in table order; later methods add their factory here
VARIANT_FACTORIES: tuple[Callable[[], list[BenchVariant]], ...] = (
    baseline_variants,
    adaptive_guidance_variants,
)


def all_variants() -> list[BenchVariant]:
    return [variant for factory in VARIANT_FACTORIES for variant in factory()]
