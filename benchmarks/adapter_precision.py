"""How far guidance adapters run in a half-precision model's dtype move its sampling, beside how far the model's
own precision moves it (issue 28, "Precision"). Real host, tiny models, CPU.

The host's tiny SD1.5 UNet (tests/comfy/host_models.py, seeded) is built in fp32, bf16 and fp16; seeded
cross-attention adapters (width 16, output projections ×20 so that what they add is well above rounding) are
installed with ω 5; KSampler (euler, normal, cfg 6, seeded noise) samples with 1 and with 6 steps. Per dtype,
as fractions of what the adapters change (``‖adapters on − adapters off‖``, model in that dtype, fp32 adapters):

- **adapters in the dtype**: ``‖adapters in the model's dtype − adapters in fp32‖`` (what the pack does now,
  its conditioner and adapter attention in fp32, against what it did before);
- **model in the dtype**: ``‖model in the dtype − model in fp32‖``, both with fp32 adapters (what running the
  model in that dtype costs at all);
- and their ratio.

    OMP_NUM_THREADS=1 COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/adapter_precision.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK / "tests" / "comfy"))

import host_models  # noqa: E402


def main() -> None:
    nodes, pack = host_models.load_pack(os.environ["COMFYUI_PATH"], PACK)
    import comfy.sample
    import comfy.supported_models

    adapters_core = sys.modules[pack + ".fastguidance.guidance_adapters.adapters"]
    adapter_patch = sys.modules[pack + ".nodes.adapter_patch"]
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 64, generator=generator) * 3.0, {}]]
    negative = [[torch.randn(1, 77, 64, generator=generator) * 0.1, {}]]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def model_in(dtype):
        model = comfy.supported_models.SD15({**host_models.tiny_unet_config(), "dtype": dtype}).get_model({})
        host_models.seeded_weights(model, 0, attn2_std=0.1, std=0.05)
        return host_models.patcher(model)

    def with_adapters(model, strength=1.0, compute_dtype=None):
        torch.manual_seed(0)
        spec = adapters_core.AdapterSpec(adapter_patch.attach_points(model), 64, 0, "cross_attention", 16)
        adapters = adapters_core.GuidanceAdapters(spec).eval().requires_grad_(False)
        with torch.no_grad():
            for adapter in adapters.adapters.values():
                adapter.out.weight.mul_(20.0)
        return adapter_patch.install_adapters(model, adapters, 5.0, strength, None, None, compute_dtype=compute_dtype)

    def sample(model, steps):
        return comfy.sample.sample(model, noise, steps, 6.0, "euler", "normal", positive, negative,
                                   torch.zeros_like(noise), disable_pbar=True, seed=3)

    fp32_model = model_in(torch.float32)
    print("| steps | dtype | adapters in the dtype | model in the dtype | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for steps in (1, 6):
        reference = sample(with_adapters(fp32_model), steps)
        for dtype in (torch.bfloat16, torch.float16):
            model = model_in(dtype)
            full = sample(with_adapters(model, compute_dtype=torch.float32), steps)
            effect = (full - sample(with_adapters(model, strength=0.0), steps)).norm()
            adapters_cost = (sample(with_adapters(model), steps) - full).norm() / effect
            model_cost = (full - reference).norm() / effect
            print(f"| {steps} | {str(dtype).removeprefix('torch.')} | {adapters_cost:.3f} | {model_cost:.3f} | "
                  f"{adapters_cost / model_cost:.2f} |")


if __name__ == "__main__":
    main()
