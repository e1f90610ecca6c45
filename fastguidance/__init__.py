"""FastGuidance core: cheaper classifier-free guidance, in pure torch (never imports ComfyUI).

The engine (:mod:`fastguidance.engine`) runs policies (one module per method: :mod:`.adaptive_guidance`,
:mod:`.compress_guidance`, :mod:`.linear_ag`, :mod:`.guidance_adapters`; :mod:`.step_predictor` sets the steps) that decide,
per model call and sample, whether the uncond prediction is evaluated or estimated. The same
engine serves the ComfyUI nodes (``nodes/``) and the small sampler of :mod:`fastguidance.research.sampling`.
"""

from .engine import Action, CallRecord, GuidancePolicy, GuidanceRun, RunSummary, StepContext, StepPlan, combine_actions
from .errors import FastGuidanceError, InvalidInputError
from .adaptive_guidance import AdaptiveGuidance

__version__ = "0.1.0"

__all__ = [
    "Action", "AdaptiveGuidance", "CallRecord", "FastGuidanceError", "GuidancePolicy", "GuidanceRun",
    "InvalidInputError", "RunSummary", "StepContext", "StepPlan", "combine_actions", "__version__",
]
