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
_WAN = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
        "out_dim": 16, "freq_dim": 256, "text_dim": 4096, "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6}
#: the published sizes, as the host's model detection reads them from the checkpoints
WAN_1_3B = {**_WAN, "dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30}
WAN_14B = {**_WAN, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}  # Wan 2.1 14B, each Wan 2.2 A14B model
SD35_LARGE = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 38, "input_size": None,
              "adm_in_channels": 2048, "num_patches": 36864, "pos_embed_max_size": 192,
              "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [], "qk_norm": "rms",
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                                  "out_features": 2432}}}
QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 60,
              "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
              "axes_dims_rope": (16, 56, 56), "patch_size": 2}
#: name → (host class, model config, one sample's latent, (prompt tokens, token width), y width or None)
MODELS = {"SD1.5 512²": ("SD15", SD15, (4, 64, 64), (77, 768), None),
          "SDXL 1024²": ("SDXL", SDXL, (4, 128, 128), (77, 2048), 2816),
          # Wan: 832×480 (480p) and 1280×720 (720p), 81 frames → 21 latent frames; T5 tokens padded to 512
          "Wan 2.1 1.3B 480p×81": ("WAN21_T2V", WAN_1_3B, (16, 21, 60, 104), (512, 4096), None),
          "Wan 2.1 1.3B 480p×33": ("WAN21_T2V", WAN_1_3B, (16, 9, 60, 104), (512, 4096), None),
          "Wan 14B 480p×81": ("WAN21_T2V", WAN_14B, (16, 21, 60, 104), (512, 4096), None),
          "Wan 14B 720p×81": ("WAN21_T2V", WAN_14B, (16, 21, 90, 160), (512, 4096), None),
          "Wan 14B 480p×33": ("WAN21_T2V", WAN_14B, (16, 9, 60, 104), (512, 4096), None),
          # recording smaller than sampling (the trainer's width, height and frames): 416×240, 33 frames
          "Wan 2.1 1.3B 240p×33": ("WAN21_T2V", WAN_1_3B, (16, 9, 30, 52), (512, 4096), None),
          "Wan 14B 240p×33": ("WAN21_T2V", WAN_14B, (16, 9, 30, 52), (512, 4096), None),
          # SD3.5 Large: CLIP-L/G (77) + T5 (256) tokens of width 4096, pooled 2048
          "SD3.5 Large 1024²": ("SD3", SD35_LARGE, (16, 128, 128), (333, 4096), 2048),
          # Qwen-Image: its 1328² default, one frame on the Wan VAE; a 128-token Qwen2.5-VL prompt of width 3584
          "Qwen-Image 1328²": ("QwenImage", QWEN_IMAGE, (16, 1, 166, 166), (128, 3584), None)}
#: the models measured by default (the SD ones as before); ``--models`` picks others
DEFAULT_MODELS = list(MODELS)


def build(host_class: str, config: dict, dtype: torch.dtype, device: str):
    import comfy.model_patcher
    import comfy.supported_models

    model = getattr(comfy.supported_models, host_class)(dict(config, dtype=dtype)).get_model({}, device=device)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def adapted_forward(glue, patched, adapters, latent: tuple, prompt: tuple, y_dim: int | None, device: str, dtype,
                    checkpointing: bool = False):
    x = torch.randn(1, *latent, device=device, dtype=torch.float32)
    sigma = torch.full((1,), 5.0, device=device)
    tokens = torch.randn(1, *prompt, device=device, dtype=dtype)
    kwargs = {} if y_dim is None else {"y": torch.randn(1, y_dim, device=device, dtype=dtype)}
    bound = glue.bind_adapters(adapters, 5.0, sigma, tokens, kwargs, None)
    options = {**patched.model_options["transformer_options"], glue.BOUND_KEY: bound, "cond_or_uncond": [0],
               "sigmas": sigma}
    options.pop("wrappers", None)
    if checkpointing:  # what Train Guidance Adapter's gradient_checkpointing puts in the options
        options[glue.CHECKPOINT_KEY] = glue.block_checkpointing()
    if device == "meta":  # the noise schedule has no meta values: call the UNet itself, as apply_model would
        return patched.model.diffusion_model(x.to(dtype), sigma.to(dtype), context=tokens, transformer_options=options,
                                             **kwargs)
    return patched.model.apply_model(x, sigma, c_crossattn=tokens, transformer_options=options, **kwargs)


def measure_memory(glue, adapters_module, name: str) -> dict:
    """Parameters and saved-activation bytes of one adapted training example (fp16 model on ``meta``).

    For DiTs also what autograd saves inside each block, and the bytes kept by a forward pass with the trainer's
    ``gradient_checkpointing`` (counted the same way: each block's inputs and what lies outside blocks); backward
    then recomputes one block at a time, so a training example needs the counted bytes plus the largest block's.
    """
    host_class, config, latent, prompt, y_dim = MODELS[name]
    model = build(host_class, config, torch.float16, "meta")
    points = glue.attach_points(model)
    spec = adapters_module.AdapterSpec(points, prompt[1], y_dim or prompt[1], "cross_attention", WIDTH)
    adapters = adapters_module.GuidanceAdapters(spec).to("meta")
    patched = glue.attach(model, None)
    saved, attention_maps = [], []
    diffusion_model = model.model.diffusion_model
    blocks_name = glue.DIT_FAMILIES.get(type(diffusion_model).__name__, (None,))[0]
    blocks = list(getattr(diffusion_model, blocks_name)) if blocks_name else []
    per_block = [0] * len(blocks)
    block_inputs: list[int] = []
    current: list[int] = []

    def is_attention_map(tensor) -> bool:
        # [B, heads, L, L or prompt tokens] attention probabilities (self- and cross-attention, the
        # model's and the adapters', and their [B·heads, …] views): saved by SDPA's math kernel (what runs
        # on the meta device), not by the flash / memory-efficient kernels GPUs use
        return tensor.dim() >= 3 and tensor.shape[-2] >= 256 and tensor.shape[-1] in (tensor.shape[-2], prompt[0])

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            size = tensor.numel() * tensor.element_size()
            if is_attention_map(tensor):
                attention_maps.append(size)
            else:
                saved.append(size)
                if current:
                    per_block[current[-1]] += size
        return tensor

    def entering(index):
        def hook(module, args, kwargs):
            current.append(index)
            stream = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            block_inputs.append(stream.numel() * stream.element_size())
        return hook

    def leaving(module, args, output):
        current.pop()

    handles = [h for index, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(entering(index), with_kwargs=True),
                         block.register_forward_hook(leaving))]
    diffusion_model.requires_grad_(False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            adapted_forward(glue, patched, adapters, latent, prompt, y_dim, "meta", torch.float16)
    finally:
        for handle in handles:
            handle.remove()
    base = sum(p.numel() for p in diffusion_model.parameters())
    result = {"base_parameters": base, "adapter_parameters": adapters.count_parameters(), "attach_points": len(points),
              "saved_activation_bytes_per_example": sum(saved),
              "saved_attention_map_bytes_per_example": sum(attention_maps)}
    if blocks:
        kept = []

        def count(tensor):  # counted as above: the adapters' attention maps apart
            if not isinstance(tensor, torch.nn.Parameter) and not is_attention_map(tensor):
                kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            adapted_forward(glue, patched, adapters, latent, prompt, y_dim, "meta", torch.float16, checkpointing=True)
        # SD3's last joint block also saves the text stream; the image stream is what every block passes on
        result.update(blocks=len(blocks), largest_block_saved_bytes=max(per_block),
                      saved_outside_blocks_bytes=sum(saved) - sum(per_block),
                      checkpointed_saved_bytes_per_example=sum(kept),
                      checkpointed_bytes_per_example=sum(kept) + max(per_block))
    return result


def measure_cpu_times(glue, adapters_module, repeats: int) -> dict:
    """SD1.5 at 512², batch 1, fp32 on this CPU: forward, CFG step (batch 2) and training step (forward + backward)."""
    host_class, config, latent, (_, tokens_dim), _ = MODELS["SD1.5 512²"]
    side = latent[-1]
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
        output = adapted_forward(glue, patched, adapters, latent, (77, tokens_dim), None, "cpu", torch.float32)
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


#: a small Wan 2.1 for the CPU timing of gradient checkpointing (host classes, seeded weights): 6 blocks of
#: width 256 on a 16×5×24×24 latent (720 tokens), 32 prompt tokens of width 256
SMALL_WAN = {"dim": 256, "ffn_dim": 1024, "num_heads": 4, "num_layers": 6, "text_dim": 256, "text_len": 32}
SMALL_WAN_LATENT, SMALL_WAN_PROMPT = (16, 5, 24, 24), (32, 256)


def measure_checkpointing_cpu(glue, adapters_module, repeats: int, batch: int = 2) -> dict:
    """On this CPU, fp32, a small Wan 2.1 (:data:`SMALL_WAN`), batch ``batch``: per training step (adapted forward,
    backward, AdamW) with and without gradient checkpointing, the time (median of ``repeats``), the bytes autograd
    keeps from forward to backward (counted as the trainer's copying hooks save them) and the adapters' gradients
    (the same up to float summation order)."""
    import dataclasses

    family = dataclasses.replace(host_models.family("wan21"), config={**host_models.family("wan21").config, **SMALL_WAN},
                                 latent_shape=SMALL_WAN_LATENT, context_dim=SMALL_WAN_PROMPT[1],
                                 tokens=SMALL_WAN_PROMPT[0])
    model = host_models.patcher(host_models.family_model(family, seed=0))
    diffusion_model = model.model.diffusion_model
    diffusion_model.requires_grad_(False)
    points = glue.attach_points(model)
    torch.manual_seed(0)
    adapters = adapters_module.GuidanceAdapters(adapters_module.AdapterSpec(points, SMALL_WAN_PROMPT[1],
                                                                            SMALL_WAN_PROMPT[1], "cross_attention", WIDTH))
    patched = glue.attach(model, None)
    optimizer = torch.optim.SGD(adapters.parameters(), lr=0.0)  # the step's cost, weights kept for the comparison
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *SMALL_WAN_LATENT, generator=generator)
    tokens = torch.randn(batch, *SMALL_WAN_PROMPT, generator=generator)
    sigma = torch.full((batch,), 0.7)
    target = torch.randn(batch, *SMALL_WAN_LATENT, generator=generator)

    def train_step(checkpointing: bool, kept: list | None = None):
        optimizer.zero_grad(set_to_none=True)
        bound = glue.bind_adapters(adapters, 5.0, sigma, tokens, {}, None)
        options = {**patched.model_options["transformer_options"], glue.BOUND_KEY: bound, "cond_or_uncond": [0],
                   "sigmas": sigma, "optimized_attention_override": glue.differentiable_attention}
        options.pop("wrappers", None)
        if checkpointing:
            options[glue.CHECKPOINT_KEY] = glue.block_checkpointing()

        def pack(tensor):  # the trainer's saved_activations_copied, counting what it keeps
            if isinstance(tensor, torch.nn.Parameter):
                return tensor
            if kept is not None:
                kept.append(tensor.numel() * tensor.element_size())
            return tensor.clone()

        with glue.host_training_mode():  # 0.33's differentiable rope, as the trainer sets it
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                output = patched.model.apply_model(x, sigma, c_crossattn=tokens, transformer_options=options)
            loss = (output.float() - target).square().mean()
            with glue.saved_activations_copied():
                loss.backward()
        optimizer.step()
        return float(loss.detach()), [p.grad.clone() for p in adapters.parameters()]

    result = {"threads": torch.get_num_threads(), "batch": batch, "latent": list(SMALL_WAN_LATENT),
              "model": SMALL_WAN, "base_parameters": sum(p.numel() for p in diffusion_model.parameters()),
              "adapter_parameters": adapters.count_parameters()}
    gradients = {}
    for checkpointing in (False, True):
        kept: list[int] = []
        loss, gradients[checkpointing] = train_step(checkpointing, kept)
        name = "checkpointed" if checkpointing else "plain"
        result[f"{name}_kept_bytes"] = sum(kept)
        result[f"{name}_loss"] = loss
        result[f"{name}_train_step_s"] = timed(lambda: train_step(checkpointing), repeats)
    result["time_ratio"] = result["checkpointed_train_step_s"] / result["plain_train_step_s"]
    result["kept_ratio"] = result["checkpointed_kept_bytes"] / result["plain_kept_bytes"]
    result["largest_gradient_difference"] = max((a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)
                                                for a, b in zip(gradients[False], gradients[True]))
    return result


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_estimate(memory: dict, batch: int, gpu_gb: int = 24, bytes_per_weight: float = 2) -> dict:
    """Memory of training on a ``gpu_gb`` GPU with fp16 weights, or fp8 (``bytes_per_weight`` 1), see the module
    docstring; with the trainer's per-block gradient checkpointing too where the model is a DiT (its counted bytes
    plus the largest block's, recomputed in backward)."""
    weights = bytes_per_weight * memory["base_parameters"]
    adapters = 4 * 4 * memory["adapter_parameters"]  # weights, gradients, two AdamW moments, fp32
    activations = batch * memory["saved_activation_bytes_per_example"]  # flash / memory-efficient attention
    total = 2 * weights + adapters + activations
    room = gpu_gb * GB * 0.9 - 2 * weights - adapters  # 10% for workspace
    per_example = memory["saved_activation_bytes_per_example"]
    estimate = {"gpu_gb": gpu_gb, "bytes_per_weight": bytes_per_weight, "batch": batch, "weights_gb": weights / GB,
                "training_copy_gb": weights / GB, "adapters_gb": adapters / GB, "activations_gb": activations / GB,
                "total_gb": total / GB, "largest_batch": max(0, int(room // per_example))}
    if "checkpointed_bytes_per_example" in memory:
        estimate["largest_batch_checkpointed"] = max(0, int(room // memory["checkpointed_bytes_per_example"]))
    return estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="training batch of the GPU estimate (the node's default)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the memory measurements (fast)")
    parser.add_argument("--checkpointing-cpu", action="store_true",
                        help="only the CPU time and kept bytes of a training step with and without gradient "
                             "checkpointing on a small Wan 2.1")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS), metavar="NAME",
                        help=f"models to measure (default all): {', '.join(MODELS)}")
    args = parser.parse_args()
    host_models.import_comfy(os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args as host_args

    host_args.use_pytorch_cross_attention = True  # what GPUs run (torch's SDPA), not the CPU's sub-quadratic default
    nodes, pack_module = host_models.load_pack(os.environ["COMFYUI_PATH"], PACK_DIR)
    glue = sys.modules[pack_module + ".nodes.adapter_patch"]
    adapters_module = sys.modules[pack_module + ".fastguidance.guidance_adapters.adapters"]
    results = {}
    if args.checkpointing_cpu:
        results["small Wan 2.1, gradient checkpointing"] = measure_checkpointing_cpu(glue, adapters_module, args.repeats)
        args.models = []
    for name in args.models:
        print(f"measuring {name}", file=sys.stderr)
        memory = measure_memory(glue, adapters_module, name)
        results[name] = {"measured": memory, "gpu_estimate": gpu_estimate(memory, args.batch),
                         "estimates": [gpu_estimate(memory, 1, gpu_gb, width) for gpu_gb in (24, 80)
                                       for width in (2, 1)]}
    if not args.skip_cpu and "SD1.5 512²" in args.models:
        results["SD1.5 512²"]["cpu"] = measure_cpu_times(glue, adapters_module, args.repeats)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
