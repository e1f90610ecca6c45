"""ComfyUI glue of FastGuidance: V3 node schemas that validate, call the core and wrap the result."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .adaptive_guidance import AdaptiveGuidanceNode, AdaptiveGuiderNode
from .compare_images import CompareImagesNode
from .compress_guidance import CompressGuidanceNode, CompressGuiderNode
from .adapter_loading import LoadGuidanceAdapterNode
from .adapter_training import TrainGuidanceAdapterNode
from .linear_ag import LinearAGCalibrateNode, LinearAGNode
from .step_predictor import StepPredictorNode, TrainStepPredictorNode
from .tune import LoadPresetNode, TuneNode

#: the one list of the pack's nodes
NODES: list[type[io.ComfyNode]] = [
    AdaptiveGuidanceNode,
    AdaptiveGuiderNode,
    CompareImagesNode,
    CompressGuidanceNode,
    CompressGuiderNode,
    LinearAGCalibrateNode,
    LoadGuidanceAdapterNode,
    LinearAGNode,
    LoadPresetNode,
    StepPredictorNode,
    TrainGuidanceAdapterNode,
    TrainStepPredictorNode,
    TuneNode,
]


class FastGuidanceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FastGuidanceExtension:
    return FastGuidanceExtension()
