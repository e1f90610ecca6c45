"""What FastGuidance Tune should compare for a segment that hands over before the last step.

A first segment (Wan 2.2's high-noise expert, an SDXL base) returns a latent that still holds its
leftover noise, the same in every trial of a seed. This measures, on the bundled reference model,
how a guidance setting applied to the first half of the schedule (steps 0–10 of 20) changes three
things against plain CFG, as the worst SSIM over the prompts:

- the handed-over latent itself (:func:`fastguidance.tune.fidelity` on latents),
- its one-step denoised estimate: one plain-CFG Euler step from the handover's sigma to 0, decoded
  (what Tune compares, ``nodes/tune.py`` ``_Trials.denoised_estimate``),
- the final picture: the second segment (steps 10–20) sampled with plain CFG from the handover.

    .venv/bin/python benchmarks/tune_handover.py

16 prompts of the reference model's training combinations (seeded), Euler, karras, scale 5, CPU.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastguidance.adaptive_guidance import AdaptiveGuidance  # noqa: E402
from fastguidance.compress_guidance import CompressGuidance  # noqa: E402
from fastguidance.research.reference.model import to_image  # noqa: E402
from fastguidance.research.reference.scenes import random_scene  # noqa: E402
from fastguidance.research.reference.weights import load_model  # noqa: E402
from fastguidance.research.sampling import sample  # noqa: E402
from fastguidance.schedules import make_sigmas  # noqa: E402
from fastguidance.tune import fidelity  # noqa: E402

PROMPTS, STEPS, HANDOVER, SCALE = 16, 20, 10, 5.0
SETTINGS = {"compg 8": CompressGuidance(guided_steps=8), "compg 5": CompressGuidance(guided_steps=5),
            "compg 3": CompressGuidance(guided_steps=3), "compg 1": CompressGuidance(guided_steps=1),
            "ag 0.9995": AdaptiveGuidance(threshold=0.9995), "ag 0.99": AdaptiveGuidance(threshold=0.99),
            "ag 0.9": AdaptiveGuidance(threshold=0.9)}


@torch.no_grad()
def main() -> None:
    model = load_model()
    rng = random.Random(123)
    prompts = [random_scene(rng, held_out=False).prompt for _ in range(PROMPTS)]
    noise = torch.randn(PROMPTS, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    cond, uncond = model.encode(prompts), model.encode([""])
    sigmas = make_sigmas(model.schedule, "karras", STEPS)
    first, second = sigmas[: HANDOVER + 1], sigmas[HANDOVER:]
    handover_sigma = float(second[0])

    def handover(policies):
        return sample(model, noise, first, cond, uncond, SCALE, "euler", policies,
                      percent_to_sigma=model.schedule.percent_to_sigma).latent

    def from_handover(latent, schedule):  # the core sampler scales its input by the first sigma: undo it
        return sample(model, latent / handover_sigma, schedule, cond, uncond, SCALE, "euler").latent

    def estimate(latent):
        return to_image(from_handover(latent, torch.tensor([handover_sigma, 0.0])))

    def final(latent):
        return to_image(from_handover(latent, second))

    reference = handover([])
    reference_estimate, reference_final = estimate(reference), final(reference)
    print(f"steps 0–{HANDOVER} of {STEPS} with the setting, then plain CFG; worst SSIM to plain CFG over {PROMPTS} prompts")
    print("setting | handed-over latent | its denoised estimate | final picture")
    for name, policy in SETTINGS.items():
        latent = handover([policy])
        print(f"{name} | {min(fidelity(latent, reference)):.4f} | {min(fidelity(estimate(latent), reference_estimate)):.4f}"
              f" | {min(fidelity(final(latent), reference_final)):.4f}")


if __name__ == "__main__":
    main()
