"""AGD loading: the node that puts trained guidance adapters on a MODEL, and the checks of the file against it."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..fastguidance.errors import InvalidInputError
from ..fastguidance.guidance_adapters.adapters import load_adapters, read_adapters_header
from . import model_folders
from .adapter_patch import attach_points, install_adapters, warn_outside_range
from .model_identity import model_architecture, require_same_model
from .validation import FileInput, ValidatedNode

log = logging.getLogger("fastguidance")


#: at queue time the file's header alone is read (its metadata, tensor names and shapes); ``execute`` loads it,
#: values and all, once
_LOAD_CHECKS = (FileInput("adapter", model_folders.ADAPTERS, "train adapters with Train Guidance Adapter",
                          read_adapters_header),)


class LoadGuidanceAdapterNode(ValidatedNode):
    CHECKS = _LOAD_CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_LoadGuidanceAdapter",
            display_name="Load Guidance Adapter (FastGuidance)",
            category="sampling/fastguidance",
            description="Adapter Guidance Distillation (Jensen et al. 2025): small adapters trained on your model make "
                        "one model evaluation return the CFG result, so every step costs one evaluation instead of "
                        "two. Use the output MODEL with the stock KSampler or SamplerCustomAdvanced. The adapters "
                        "come from 'Train Guidance Adapter' for this model.",
            inputs=[
                io.Model.Input("model", tooltip="The model the adapters were trained for."),
                io.Combo.Input("adapter", options=model_folders.files(model_folders.ADAPTERS),
                               tooltip="An adapter file from models/fastguidance_adapters/."),
                io.Boolean.Input("use_sampler_cfg", default=True,
                                 tooltip="On: the guidance scale is the sampler's cfg (the negative prompt is not "
                                         "evaluated; the adapters learned its effect). Off: use guidance_scale below."),
                io.Float.Input("guidance_scale", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="The guidance scale ω when use_sampler_cfg is off. Stay inside the range the "
                                       "adapters were trained on (shown in the log; default training range 1–8)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scales the adapters' output. 1 = as trained; 0 = adapters off, which gives "
                                       "exactly the unguided (cfg 1) result at one evaluation per step."),
                io.Boolean.Input("allow_other_model", default=False, optional=True,
                                 tooltip="Use adapters trained on another model of the same architecture (for "
                                         "example before a LoRA), with a warning. Off: they are refused."),
            ],
            outputs=[io.Model.Output(tooltip="The model with adapters: one evaluation per step, guided.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, adapter: str, use_sampler_cfg: bool, guidance_scale: float, strength: float,
                allow_other_model: bool = False) -> io.NodeOutput:
        path = model_folders.existing_file(model_folders.ADAPTERS, adapter, "adapter",
                                           "train adapters with Train Guidance Adapter")
        adapters, metadata = load_adapters(path)
        check_made_for(model, adapter, metadata, adapters.spec.attach_points, allow_other_model)
        omega_range = tuple(metadata["omega_range"]) if metadata.get("omega_range") else None
        omega = None if use_sampler_cfg else float(guidance_scale)
        if omega is not None:
            warn_outside_range(omega, omega_range)
        log.info("FastGuidance [agd]: %s (%d parameters, trained for ω %s) at %s, strength %.2f", adapter,
                 adapters.count_parameters(), omega_range, "the sampler's cfg" if omega is None else f"ω {omega:.2f}",
                 strength)
        return io.NodeOutput(install_adapters(model, adapters, omega, strength, omega_range, cls.hidden.unique_id))


def check_made_for(model, adapter: str, metadata: dict, file_points: dict, allow_other_model: bool) -> None:
    """Refuse adapters made for another architecture or attach-point set; another fingerprint only on request."""
    architecture = model_architecture(model)
    if metadata.get("architecture") != architecture:
        raise InvalidInputError("adapter", adapter, f"it was trained for a {metadata.get('architecture')} model and "
                                                    f"this model is {architecture}: train adapters for this model")
    points = attach_points(model)
    if dict(file_points) != points:
        missing = sorted(set(points) ^ set(file_points))[:4]
        raise InvalidInputError("adapter", adapter, f"it was made for other attach points ({len(file_points)} in the "
                                                    f"file, {len(points)} in this model; differing: {missing} or "
                                                    "their widths): train adapters for this model")
    recorded = metadata.get("recorded_steps")
    part = f"steps {recorded[0]}–{recorded[1]} of {metadata.get('trajectory_steps')}, " \
        if isinstance(recorded, list) and len(recorded) == 2 else ""
    # Wan 2.2's high- and low-noise models share architecture and attach points: the fingerprint tells them apart
    require_same_model(model, metadata, "adapter", adapter, f"{architecture} model ({part}", "train adapters for this model",
                       allow_other_model, "results may differ from CFG")


