"""The shipped weights of the reference model and classifier: safetensors with JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import FastGuidanceError
from ..files import atomic_write
from .classifier import SceneClassifier
from .model import ModelConfig, ReferenceModel

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_PATH = WEIGHTS_DIR / "reference_model.safetensors"
CLASSIFIER_PATH = WEIGHTS_DIR / "adherence_classifier.safetensors"
MODEL_FORMAT = "fastguidance.reference_model"
CLASSIFIER_FORMAT = "fastguidance.adherence_classifier"
FORMAT_VERSION = 1


class WeightsError(FastGuidanceError):
    """A weights file is missing, corrupt or of another kind."""


def _save(tensors: dict[str, torch.Tensor], metadata: dict, path: Path, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata={"fastguidance": json.dumps(metadata)}))


def _load(path: Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist: train it with `python -m fastguidance.reference.train`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("fastguidance", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file ({error}); retrain or restore it") from None
    if metadata.get("format") != expected_format:
        raise WeightsError(f"{path} holds {metadata.get('format')!r}, not {expected_format!r}")
    if metadata.get("version") != FORMAT_VERSION:
        raise WeightsError(f"{path} has format version {metadata.get('version')}, this code reads {FORMAT_VERSION}")
    return tensors, metadata


def save_model(model: ReferenceModel, info: dict, path: Path = MODEL_PATH, overwrite: bool = False) -> None:
    metadata = {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                "parameters": model.count_parameters(), "training": info}
    _save({k: v.half() for k, v in model.state_dict().items()}, metadata, path, overwrite)


def load_model(path: Path = MODEL_PATH, device: str | torch.device = "cpu") -> ReferenceModel:
    """The reference model in fp32 and eval mode (stored in fp16 to keep the file small)."""
    tensors, metadata = _load(path, MODEL_FORMAT)
    model = ReferenceModel(ModelConfig(**metadata["config"]))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.metadata = metadata
    return model.to(device).eval().requires_grad_(False)


def save_classifier(classifier: SceneClassifier, info: dict, path: Path = CLASSIFIER_PATH, overwrite: bool = False) -> None:
    metadata = {"format": CLASSIFIER_FORMAT, "version": FORMAT_VERSION, "training": info,
                "parameters": sum(p.numel() for p in classifier.parameters())}
    _save(classifier.state_dict(), metadata, path, overwrite)


def load_classifier(path: Path = CLASSIFIER_PATH, device: str | torch.device = "cpu") -> SceneClassifier:
    tensors, metadata = _load(path, CLASSIFIER_FORMAT)
    classifier = SceneClassifier()
    classifier.load_state_dict(tensors)
    classifier.metadata = metadata
    return classifier.to(device).eval().requires_grad_(False)
