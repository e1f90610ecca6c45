"""Which prompt attributes a reference model follows, with and without CFG.

    .venv/bin/python benchmarks/attribute_adherence.py [MODEL.safetensors] [--prompts 128] [--scales 1,5,8] [--steps 20]

The benchmark's adherence is one number per image. To judge a (re)trained reference model we need
to know *what* it follows: this samples the same training prompts from the same noise at a few CFG
scales (scale 1 = no guidance) and prints, per kind of prompt and attribute, the share the
adherence classifier finds right (positions: chance is 20%; a pair's axis: 50%).

It also prints the high-noise position probe: the horizontal centre of "redness" in the model's
denoised prediction from pure noise at the highest noise level, for "a large red circle on the
left / on the right", in pixels from the left edge. A model that has learned where things go shows
about 8.5 and 23.5 (the centres of those positions in the 32-pixel renders); one that ignores
position words shows about 16 for both, although at that noise only the prompt can say where the
object will be.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastguidance.research.reference.classifier import adherence, predict  # noqa: E402
from fastguidance.research.reference.model import ReferenceModel  # noqa: E402
from fastguidance.research.reference.scenes import random_scene  # noqa: E402
from fastguidance.research.reference.train import render_prompts  # noqa: E402
from fastguidance.research.reference.weights import MODEL_PATH, load_classifier, load_model  # noqa: E402


def position_probe(model: ReferenceModel, samples: int = 32) -> dict[str, float]:
    """Horizontal centre of redness in the denoised prediction at the highest noise level."""
    sigma = model.schedule.sigmas[-1].expand(samples)
    x = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * sigma[0]
    columns = torch.arange(32, dtype=torch.float32) + 0.5  # pixel centres, as scenes.py draws them
    centres = {}
    for where in ("on the left", "on the right"):
        with torch.no_grad():
            denoised = model.denoise(x, sigma, [model.encode([f"a large red circle {where}"])])[0]
        redness = (denoised[:, 0] - denoised[:, 1:].mean(dim=1)).mean(dim=0).clamp(min=0).sum(dim=0)
        centres[where] = float((redness * columns).sum() / redness.sum())
    return centres


def _scales(text: str) -> list[float]:
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,5,8") from None
    if any(scale < 1 for scale in scales):
        raise argparse.ArgumentTypeError(f"{text!r}: CFG scales start at 1 (no guidance)")
    return scales


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=MODEL_PATH, help="reference model file (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=128, help="training prompts to sample (default 128)")
    parser.add_argument("--scales", type=_scales, default="1,5,8", help="CFG scales, comma-separated; 1 = no guidance (default 1,5,8)")
    parser.add_argument("--steps", type=int, default=20, help="dpmpp_2m/karras steps (default 20)")
    options = parser.parse_args(argv)
    model, classifier = load_model(options.model), load_classifier()
    rng = random.Random(0)
    scenes = [random_scene(rng, held_out=False) for _ in range(options.prompts)]
    noise = torch.randn(len(scenes), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"{options.model.name}: {options.prompts} training prompts, {options.steps} steps dpmpp_2m/karras")
    for scale in options.scales:
        with torch.no_grad():
            images = render_prompts(model, [s.prompt for s in scenes], noise, options.steps, scale, "dpmpp_2m", "karras")
        predicted = predict(classifier, images)
        right, named = collections.Counter(), collections.Counter()
        for row, scene in enumerate(scenes):
            for head, label in scene.named_labels().items():
                named[f"{scene.kind}:{head}"] += 1
                right[f"{scene.kind}:{head}"] += predicted[head][row] == label
        overall = adherence(classifier, images, scenes).mean().item()
        print(f"scale {scale:g}: adherence {overall:.3f}  "
              + "  ".join(f"{key} {right[key] / named[key]:.2f} ({named[key]})" for key in sorted(named)), flush=True)
    centres = position_probe(model)
    print("high-noise position probe (redness centre, x in pixels; learned ≈ 8.5 / 23.5, ignored ≈ 16 / 16): "
          + ", ".join(f"{where} {centre:.1f}" for where, centre in centres.items()))


if __name__ == "__main__":
    main()
