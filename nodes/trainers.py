"""What the pack's trainer nodes share: their prompt lines and the training curve they return as an IMAGE."""

from __future__ import annotations

import os
import time

import folder_paths
import numpy as np
import torch
from PIL import Image

from ..fastguidance.errors import InvalidInputError
from ..fastguidance.charts import quality_plot


def prompt_lines(prompts: str) -> list[str]:
    """A multiline ``prompts`` input as its non-empty lines, or an error naming the input."""
    lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    if not lines:
        raise InvalidInputError("prompts", prompts, "write at least one prompt, one per line")
    return lines


def curve_image(values: list[float], y_label: str, title: str, last_label: str = "", x_label: str = "iteration") -> torch.Tensor:
    """``values`` against their index (from 1), joined by a line, as an IMAGE ``[1, H, W, 3]``."""
    points = [{"label": "", "x": float(i + 1), "y": float(v)} for i, v in enumerate(values)]
    points[-1]["label"] = last_label
    path = os.path.join(folder_paths.get_temp_directory(), f"fastguidance_curve_{time.time_ns()}.png")
    quality_plot(points, path, x_label, y_label, title, line=True)
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    finally:
        os.remove(path)
    return torch.from_numpy(array)[None]
