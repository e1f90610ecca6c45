"""The adherence classifier: an independent judge of whether an image shows what its prompt says.

It is the "off-sampling" classifier of the Compress Guidance paper (Dinh et al., seed ``002_…``,
§5): trained on the scene generator only, never used for guidance. It reads an image and predicts
every attribute head of :data:`fastguidance.research.reference.scenes.HEADS`; the **adherence** of an image
to its prompt is the share of the prompt's named attributes it predicts right
(:func:`adherence`). Its penultimate features give a Fréchet distance between generated and real
images (the FID recipe of Heusel et al. 2017 with this network in place of Inception).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .scenes import HEADS, Scene, scene_labels

FEATURE_DIM = 128


class SceneClassifier(nn.Module):
    """A small CNN with one classification head per scene attribute."""

    def __init__(self):
        super().__init__()

        def block(channels_in: int, channels_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.GroupNorm(8, channels_out), nn.SiLU(),
                nn.Conv2d(channels_out, channels_out, 3, padding=1), nn.GroupNorm(8, channels_out), nn.SiLU(),
            )

        self.body = nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 64),
                                  nn.MaxPool2d(2))  # 64 × 4 × 4: keeps where things are
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(classes)) for name, classes in HEADS.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, 128]`` of images in [0, 1]."""
        return self.features(self.body(images * 2.0 - 1.0))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.embed(images)
        return {name: head(features) for name, head in self.heads.items()}


def label_tensors(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Class index per head and scene; -100 (ignored by the loss) where a head does not apply."""
    labels = {name: torch.full((len(scenes),), -100, dtype=torch.long) for name in HEADS}
    for row, scene in enumerate(scenes):
        for name, value in scene_labels(scene).items():
            if value is not None:
                labels[name][row] = HEADS[name].index(value)
    return labels


def classifier_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[name], labels[name].to(logits[name].device), ignore_index=-100)
               for name in HEADS if (labels[name] >= 0).any())


@torch.no_grad()
def predict(classifier: SceneClassifier, images: torch.Tensor) -> dict[str, list[str]]:
    """Predicted class name per head and image."""
    logits = classifier(images)
    return {name: [HEADS[name][i] for i in logits[name].argmax(dim=1).tolist()] for name in HEADS}


@torch.no_grad()
def adherence(classifier: SceneClassifier, images: torch.Tensor, scenes: Sequence[Scene]) -> torch.Tensor:
    """Per image, the share (0–1) of its prompt's named attributes that the classifier sees."""
    predictions = predict(classifier, images)
    scores = []
    for row, scene in enumerate(scenes):
        named = scene.named_labels()
        scores.append(sum(predictions[head][row] == value for head, value in named.items()) / len(named))
    return torch.tensor(scores, dtype=torch.float32)


@torch.no_grad()
def attribute_accuracy(classifier: SceneClassifier, images: torch.Tensor, scenes: Sequence[Scene]) -> float:
    """Share of all applicable attribute labels predicted right (the classifier's own accuracy)."""
    predictions = predict(classifier, images)
    right = total = 0
    for row, scene in enumerate(scenes):
        for head, value in scene_labels(scene).items():
            if value is not None:
                right += predictions[head][row] == value
                total += 1
    return right / total
