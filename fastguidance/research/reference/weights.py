"""The shipped weights of the reference model and classifier: safetensors with JSON metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from ...tensorfile import load_tensor_file, save_tensor_file
from .classifier import SceneClassifier
from .model import ModelConfig, ReferenceModel

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_PATH = WEIGHTS_DIR / "reference_model.safetensors"
CLASSIFIER_PATH = WEIGHTS_DIR / "adherence_classifier.safetensors"
STEP_PREDICTOR_PATH = WEIGHTS_DIR / "step_predictor.safetensors"
ADAPTERS_PATH = WEIGHTS_DIR / "guidance_adapters.safetensors"
MODEL_FORMAT = "fastguidance.reference_model"
CLASSIFIER_FORMAT = "fastguidance.adherence_classifier"
FORMAT_VERSION = 1
MISSING_HINT = "train it with `python -m fastguidance.research.reference.train`"


def save_model(model: ReferenceModel, info: dict, path: Path = MODEL_PATH, overwrite: bool = False) -> None:
    metadata = {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                "parameters": model.count_parameters(), "training": info}
    save_tensor_file(path, {k: v.half() for k, v in model.state_dict().items()}, metadata, overwrite)


def load_model(path: Path = MODEL_PATH, device: str | torch.device = "cpu") -> ReferenceModel:
    """The reference model in fp32 and eval mode (stored in fp16 to keep the file small)."""
    tensors, metadata = load_tensor_file(path, MODEL_FORMAT, FORMAT_VERSION, MISSING_HINT)
    # files saved before an option existed have no such key and no such layers: the option is off
    model = ReferenceModel(ModelConfig(**{"coordinates": False, "query_coordinates": False, **metadata["config"]}))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.metadata = metadata
    return model.to(device).eval().requires_grad_(False)


def save_classifier(classifier: SceneClassifier, info: dict, path: Path = CLASSIFIER_PATH, overwrite: bool = False) -> None:
    metadata = {"format": CLASSIFIER_FORMAT, "version": FORMAT_VERSION, "training": info,
                "parameters": sum(p.numel() for p in classifier.parameters())}
    save_tensor_file(path, classifier.state_dict(), metadata, overwrite)


def load_classifier(path: Path = CLASSIFIER_PATH, device: str | torch.device = "cpu") -> SceneClassifier:
    tensors, metadata = load_tensor_file(path, CLASSIFIER_FORMAT, FORMAT_VERSION, MISSING_HINT)
    classifier = SceneClassifier()
    classifier.load_state_dict(tensors)
    classifier.metadata = metadata
    return classifier.to(device).eval().requires_grad_(False)
