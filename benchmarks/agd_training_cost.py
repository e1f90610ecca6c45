"""What training guidance adapters costs on SD1.5 and SDXL: measured parts and the estimate built from them.

Run with ComfyUI's Python environment (numbers go to the README):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/agd_training_cost.py

The full-size SD1.5 and SDXL UNets are built with ComfyUI's own classes (nothing is downloaded) and
the adapters attached through the pack's own host glue (``nodes/adapter_patch.py``). Measured:

1. parameter counts of the UNet and of the adapters (cross-attention kind, the node's default width 160);
2. the activation memory one training example needs: the bytes autograd saves for backward in one
   adapted forward pass (counted with ``saved_tensors_hooks``, model in fp16 on the ``meta`` device,
   so SDXL at 1024² is measured without allocating it);
3. on this machine's CPU, SD1.5 at 512², batch 1, fp32: the time of one forward pass, of one CFG
   step (cond + uncond) and of one training step (adapted forward + backward through the frozen
   UNet); their ratio is what turns a GPU's sampling speed into training time.

The estimate for a 24 GB GPU adds, for fp16 weights: the loaded weights, the training copy of them
(inference tensors, see ``trainable_weights``), adapters with gradients and AdamW moments (fp32),
and batch × the saved activations; it is an estimate, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "tests" / "comfy"))
import host_models  # noqa: E402
from host_overhead import timed  # noqa: E402  (one median timer for the benchmarks)

GB = 1 << 30
WIDTH = 160  # Train Guidance Adapter's default adapter_width
SD15 = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
        "context_dim": 768, "num_heads": 8, "num_head_channels": -1, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
        "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
        "context_dim": 2048, "num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True,
        "adm_in_channels": 2816, "num_classes": "sequential", "use_spatial_transformer": True, "legacy": False, "image_size": 32,
        "use_temporal_attention": False, "use_temporal_resblock": False}
#: name → (host class, UNet config, latent side, token width, y width or None)
MODELS = {"SD1.5 512²": ("SD15", SD15, 64, 768, None), "SDXL 1024²": ("SDXL", SDXL, 128, 2048, 2816)}


def build(host_class: str, config: dict, dtype: torch.dtype, device: str):
    import comfy.model_patcher
    import comfy.supported_models

    model = getattr(comfy.supported_models, host_class)(dict(config, dtype=dtype)).get_model({}, device=device)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def adapted_forward(glue, patched, adapters, side: int, tokens_dim: int, y_dim: int | None, device: str, dtype):
    x = torch.randn(1, 4, side, side, device=device, dtype=torch.float32)
    sigma = torch.full((1,), 5.0, device=device)
    tokens = torch.randn(1, 77, tokens_dim, device=device, dtype=dtype)
    kwargs = {} if y_dim is None else {"y": torch.randn(1, y_dim, device=device, dtype=dtype)}
    bound = glue.bind_adapters(adapters, 5.0, sigma, tokens, kwargs, None)
    options = {**patched.model_options["transformer_options"], glue.BOUND_KEY: bound, "cond_or_uncond": [0],
               "sigmas": sigma}
    options.pop("wrappers", None)
    if device == "meta":  # the noise schedule has no meta values: call the UNet itself, as apply_model would
        return patched.model.diffusion_model(x.to(dtype), sigma.to(dtype), context=tokens, transformer_options=options,
                                             **kwargs)
    return patched.model.apply_model(x, sigma, c_crossattn=tokens, transformer_options=options, **kwargs)


def measure_memory(glue, adapters_module, name: str) -> dict:
    """Parameters and saved-activation bytes of one adapted training example (fp16 model on ``meta``)."""
    host_class, config, side, tokens_dim, y_dim = MODELS[name]
    model = build(host_class, config, torch.float16, "meta")
    points = glue.attach_points(model)
    spec = adapters_module.AdapterSpec(points, tokens_dim, y_dim or tokens_dim, "cross_attention", WIDTH)
    adapters = adapters_module.GuidanceAdapters(spec).to("meta")
    patched = glue.attach(model, None)
    saved, attention_maps = [], []

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            size = tensor.numel() * tensor.element_size()
            saved.append(size)
            # [B, heads, L, L] attention probabilities: saved by SDPA's math kernel (what runs on the meta
            # device), not by the flash / memory-efficient kernels GPUs use
            if tensor.dim() == 4 and tensor.shape[-1] == tensor.shape[-2] >= 256:
                attention_maps.append(size)
        return tensor

    model.model.diffusion_model.requires_grad_(False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        adapted_forward(glue, patched, adapters, side, tokens_dim, y_dim, "meta", torch.float16)
    base = sum(p.numel() for p in model.model.diffusion_model.parameters())
    return {"base_parameters": base, "adapter_parameters": adapters.count_parameters(), "attach_points": len(points),
            "saved_activation_bytes_per_example": sum(saved) - sum(attention_maps),
            "saved_attention_map_bytes_per_example": sum(attention_maps)}


def measure_cpu_times(glue, adapters_module, repeats: int) -> dict:
    """SD1.5 at 512², batch 1, fp32 on this CPU: forward, CFG step (batch 2) and training step (forward + backward)."""
    host_class, config, side, tokens_dim, _ = MODELS["SD1.5 512²"]
    model = build(host_class, config, torch.float32, "cpu")
    host_models.seeded_weights(model.model, 0, attn2_std=0.02, std=0.02)
    model.model.diffusion_model.requires_grad_(False)
    adapters = adapters_module.GuidanceAdapters(
        adapters_module.AdapterSpec(glue.attach_points(model), tokens_dim, tokens_dim, "cross_attention", WIDTH))
    patched = glue.attach(model, None)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
    x = torch.randn(1, 4, side, side)
    tokens = torch.randn(1, 77, tokens_dim)

    def forward(batch: int):
        with torch.no_grad():
            model.model.apply_model(x.repeat(batch, 1, 1, 1), torch.full((batch,), 5.0),
                                    c_crossattn=tokens.repeat(batch, 1, 1))

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        output = adapted_forward(glue, patched, adapters, side, tokens_dim, None, "cpu", torch.float32)
        output.float().square().mean().backward()
        optimizer.step()

    def median_seconds(fn) -> float:
        fn()  # warm-up
        return timed(fn, repeats)

    forward_s = median_seconds(lambda: forward(1))
    cfg_step_s = median_seconds(lambda: forward(2))
    train_s = median_seconds(train_step)
    return {"threads": torch.get_num_threads(), "forward_s": forward_s, "cfg_step_s": cfg_step_s,
            "train_step_s": train_s, "train_over_forward": train_s / forward_s,
            "train_over_cfg_step": train_s / cfg_step_s, "peak_process_bytes": _peak_rss()}


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_estimate(memory: dict, batch: int) -> dict:
    """Memory of training on a GPU with fp16 weights (see the module docstring)."""
    weights = 2 * memory["base_parameters"]
    adapters = 4 * 4 * memory["adapter_parameters"]  # weights, gradients, two AdamW moments, fp32
    activations = batch * memory["saved_activation_bytes_per_example"]  # flash / memory-efficient attention
    total = 2 * weights + adapters + activations
    per_example = memory["saved_activation_bytes_per_example"]
    fits = max(0, int((24 * GB * 0.9 - 2 * weights - adapters) // per_example))  # 10% for workspace
    return {"batch": batch, "weights_gb": weights / GB, "training_copy_gb": weights / GB, "adapters_gb": adapters / GB,
            "activations_gb": activations / GB, "total_gb": total / GB, "largest_batch_in_24gb": fits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="training batch of the GPU estimate (the node's default)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the memory measurements (fast)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    host_models.import_comfy(os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args as host_args

    host_args.use_pytorch_cross_attention = True  # what GPUs run (torch's SDPA), not the CPU's sub-quadratic default
    nodes, pack_module = host_models.load_pack(os.environ["COMFYUI_PATH"], PACK_DIR)
    glue = sys.modules[pack_module + ".nodes.adapter_patch"]
    adapters_module = sys.modules[pack_module + ".fastguidance.adapters"]
    results = {}
    for name in MODELS:
        print(f"measuring {name}", file=sys.stderr)
        memory = measure_memory(glue, adapters_module, name)
        results[name] = {"measured": memory, "gpu_estimate": gpu_estimate(memory, args.batch)}
    if not args.skip_cpu:
        results["SD1.5 512²"]["cpu"] = measure_cpu_times(glue, adapters_module, args.repeats)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
