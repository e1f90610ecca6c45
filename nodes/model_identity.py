"""The fingerprint of a ComfyUI MODEL's base weights (the core computes it; this file finds the weights)."""

from __future__ import annotations

from typing import Any

from ..fastguidance.fingerprint import weights_fingerprint


def model_fingerprint(model: Any) -> str:
    """Fingerprint of the diffusion model's own weights (not of patches such as LoRAs applied at load)."""
    return weights_fingerprint(model.model.diffusion_model.state_dict().items())


def model_architecture(model: Any) -> str:
    """The host's name of the model class (``SD15``, ``SDXL``, ``Flux``…), for file metadata and messages."""
    return type(model.model.model_config).__name__ if getattr(model.model, "model_config", None) else type(model.model).__name__
