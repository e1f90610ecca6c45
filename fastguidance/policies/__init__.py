"""The methods of the pack as engine policies (see :mod:`fastguidance.engine`)."""

from .adapter import AdapterGuidance
from .adaptive import AFTER_CUTOFF_MODES, AdaptiveGuidance
from .compress import COMPRESS_MODES, CompressGuidance
from .window import CFGWindow, GuidanceInterval

__all__ = ["AdapterGuidance", "AFTER_CUTOFF_MODES", "AdaptiveGuidance", "COMPRESS_MODES", "CompressGuidance", "CFGWindow",
           "GuidanceInterval"]
