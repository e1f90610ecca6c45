"""Tiny real models built with ComfyUI's own classes (COMFYUI.md §6): nothing is downloaded.

Shared by the real-host tests, the server test (which runs this file as a script to write a UNet
file that ComfyUI's loaders detect as SD1.5) and ``benchmarks/host_overhead.py``.

    python host_models.py OUT.safetensors     # run with cwd = a ComfyUI checkout
"""

from __future__ import annotations

import os
import sys
import types

import torch


def import_comfy(comfyui_path: str) -> None:
    """Make a ComfyUI checkout importable on this machine (CPU unless CUDA is there)."""
    if comfyui_path not in sys.path:
        sys.path.insert(0, comfyui_path)
    # The registry's torchvision is a CUDA build whose compiled ops do not load next to CPU torch;
    # ComfyUI imports torchvision but does not need them (COMFYUI.md §6).
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True


def load_pack(comfyui_path: str, pack_dir) -> tuple[types.ModuleType, str]:
    """Import ComfyUI with its built-in nodes and load the pack the way ComfyUI loads a custom node.

    Returns ComfyUI's ``nodes`` module and the module name the pack was loaded under.
    """
    import asyncio

    import_comfy(comfyui_path)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(pack_dir))):
        raise RuntimeError(f"ComfyUI could not load the pack at {pack_dir}")
    return nodes, str(pack_dir).replace(".", "_x_")


def _unet_config(model_channels: int, channel_mult: list[int], context_dim: int, heads: dict) -> dict:
    levels = len(channel_mult)
    return {
        "in_channels": 4, "out_channels": 4, "model_channels": model_channels, "num_res_blocks": [1] * levels,
        "channel_mult": channel_mult, "transformer_depth": [1] * levels, "transformer_depth_output": [1] * (2 * levels),
        "transformer_depth_middle": 1, "context_dim": context_dim, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "image_size": 32, "use_spatial_transformer": True,
        "legacy": False, "dtype": torch.float32, **heads,
    }


def tiny_unet_config() -> dict:
    """A shrunken SD1.5 UNet (two levels, 32 channels, context 64): about 1 M parameters, in-process only."""
    return _unet_config(32, [1, 2], 64, {"num_head_channels": 16, "num_heads": -1})


def sd15_detectable_unet_config() -> dict:
    """One level that keeps 320 channels and context 768 (26 M parameters): the loaders detect SD1.5."""
    return _unet_config(320, [1], 768, {"num_heads": 8, "num_head_channels": -1})


def seeded_weights(module: torch.nn.Module, seed: int, attn2_std: float, std: float) -> None:
    """Fill the (uninitialised) weights deterministically.

    Larger cross-attention weights make the prompt matter, so that the cosine of the cond and uncond
    predictions rises over the steps, the regime Adaptive Guidance needs. Good values depend on the
    width: 0.1 for the 32-channel tiny UNet (0.68 → 0.997 over 10 steps), 0.03 for the 320-channel
    one (0.64 → 0.99 over 8 steps); much larger makes cond and uncond unrelated (cosine near 0).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif "norm" in name and parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                scale = attn2_std if ".attn2." in name else std
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


#: the sampling types the tiny UNet can be built with: name → ComfyUI ``ModelType`` member
SAMPLING_TYPES = {"eps": "EPS", "v_prediction": "V_PREDICTION", "flow": "FLOW"}


def tiny_model(seed: int = 0, sampling: str = "eps"):
    """The tiny SD1.5 ``BaseModel`` with seeded weights.

    ``sampling`` picks what the UNet predicts and the host's matching schedule: ``eps`` (SD1.5's
    own: discrete, σ_max ≈ 14.6), ``v_prediction`` (same schedule, SD2-768 style) or ``flow``
    (rectified flow, ``ModelSamplingDiscreteFlow`` with shift 1: σ from 1 to 0, as SD3/Flux).
    """
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SD15(tiny_unet_config())
    if sampling == "eps":
        model = config.get_model({})
    else:
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType[SAMPLING_TYPES[sampling]])
    seeded_weights(model, seed, attn2_std=0.1, std=0.05)
    return model


#: a tiny Flux.1 DiT (two double blocks, one single block, width 64): flow matching, σ from 1 to 0
FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 16,
               "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
               "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
               "guidance_embed": False}


def flux_config() -> dict:
    """:data:`FLUX_CONFIG` as this host's ``FluxParams`` takes it: 0.33 added the required
    ``txt_ids_dims`` (which axes of the text ids carry positions; ``[]`` for Flux.1, what its model
    detection sets), which 0.3.64's ``FluxParams`` does not accept."""
    import dataclasses

    import comfy.ldm.flux.model

    config = dict(FLUX_CONFIG)
    if "txt_ids_dims" in {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []
    return config


def tiny_flux_model(seed: int = 0):
    """The tiny Flux ``BaseModel`` (:data:`FLUX_CONFIG`) with seeded weights."""
    import comfy.supported_models

    model = comfy.supported_models.Flux(flux_config()).get_model({})
    seeded_weights(model, seed, attn2_std=0.1, std=0.05)
    return model


def sd15_detectable_model(seed: int = 0):
    """The SD1.5-detectable ``BaseModel`` with seeded weights."""
    import comfy.supported_models

    model = comfy.supported_models.SD15(sd15_detectable_unet_config()).get_model({})
    seeded_weights(model, seed, attn2_std=0.03, std=0.02)
    return model


def patcher(model):
    """Wrap a ``BaseModel`` the way the loaders do, on the host's device."""
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


#: the VAE weights ComfyUI reads to pick the SD1.x configuration (sd.py, ``VAE.__init__``)
VAE_CONFIG_KEYS = {
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "post_quant_conv.weight": (4, 4, 1, 1),
}


def checkpoint_extras(model, seed: int) -> dict:
    """A full SD1.5 text encoder and VAE with seeded weights, under the checkpoint's key prefixes.

    ComfyUI builds models without initialising their weights, so a checkpoint without them would
    give garbage (NaN) text embeddings and images; seeded small weights give finite, useless ones:
    enough for tests of the UI and the plumbing. Stored in fp16 (about 0.4 GB in all).
    """
    import comfy.sd

    clip = comfy.sd.CLIP(model.model_config.clip_target(), tokenizer_data={})
    seeded_weights(clip.cond_stage_model, seed + 1, attn2_std=0.02, std=0.02)
    vae = comfy.sd.VAE(sd={name: torch.zeros(shape) for name, shape in VAE_CONFIG_KEYS.items()})
    seeded_weights(vae.first_stage_model, seed + 2, attn2_std=0.02, std=0.02)
    extras = {}
    for name, value in clip.cond_stage_model.state_dict().items():
        if name.startswith("clip_l.transformer."):
            extras["cond_stage_model.transformer." + name[len("clip_l.transformer."):]] = value.half().contiguous()
    for name, value in vae.first_stage_model.state_dict().items():
        extras["first_stage_model." + name] = value.half().contiguous()
    return extras


def main(path: str, checkpoint: bool = False, seed: int = 0) -> None:
    """Write the SD1.5-detectable test UNet to ``path``: a diffusion-model file, or with ``checkpoint``
    a checkpoint (``model.diffusion_model.`` keys plus :func:`checkpoint_extras`)."""
    import json

    import_comfy(os.getcwd())
    import comfy.utils

    model = sd15_detectable_model(seed)
    state_dict = {name: value.contiguous() for name, value in model.diffusion_model.state_dict().items()}
    if checkpoint:
        state_dict = {f"model.diffusion_model.{name}": value for name, value in state_dict.items()}
        state_dict.update(checkpoint_extras(model, seed))
    comfy.utils.save_torch_file(state_dict, path)
    sys.stdout.write(json.dumps({"parameters": sum(v.numel() for v in state_dict.values()), "tensors": len(state_dict)}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], checkpoint="--checkpoint" in sys.argv[2:])
