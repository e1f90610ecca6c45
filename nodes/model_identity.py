"""The fingerprint of a ComfyUI MODEL's base weights (the core computes it; this file finds the weights)."""

from __future__ import annotations

import logging
from typing import Any

from ..fastguidance.errors import InvalidInputError
from ..fastguidance.fingerprint import weights_fingerprint

log = logging.getLogger("fastguidance")


def model_fingerprint(model: Any) -> str:
    """Fingerprint of the diffusion model's own weights (not of patches such as LoRAs applied at load)."""
    return weights_fingerprint(model.model.diffusion_model.state_dict().items())


def model_architecture(model: Any) -> str:
    """The host's name of the model class (``SD15``, ``SDXL``, ``Flux``…), for file metadata and messages."""
    return type(model.model.model_config).__name__ if getattr(model.model, "model_config", None) else type(model.model).__name__


def require_same_model(model: Any, metadata: dict, input_name: str, file_name: str, other: str, remedy: str,
                       allow_other_model: bool, consequence: str) -> None:
    """Refuse a file made for another model (fingerprint) unless ``allow_other_model``; then warn once.

    ``other`` says what the file was made for, before its fingerprint ("SD15 model (", "model (SDXL, ").
    """
    made_for, this_model = metadata.get("model_fingerprint"), model_fingerprint(model)
    if not made_for or made_for == this_model:
        return
    where = f"another {other}fingerprint {made_for}; this one is {this_model})"
    if not allow_other_model:
        raise InvalidInputError(input_name, file_name, f"it was trained on {where}: {remedy}, or turn on allow_other_model")
    log.warning("FastGuidance: %s was trained on %s; %s", file_name, where, consequence)
