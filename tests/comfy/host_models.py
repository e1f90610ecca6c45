"""Tiny real models built with ComfyUI's own classes (COMFYUI.md §6): nothing is downloaded.

Shared by the real-host tests, the server test (which runs this file as a script to write a UNet
file that ComfyUI's loaders detect as SD1.5) and ``benchmarks/host_overhead.py``.

    python host_models.py OUT.safetensors     # run with cwd = a ComfyUI checkout
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Callable

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


# -- every family that samples with CFG (issue 18 §2) ------------------------------------------------------------


@dataclass(frozen=True)
class Workflow:
    """What a family's usual ComfyUI workflow samples with, read from the host's own workflow templates
    (``comfyui_workflow_templates`` of the pinned frontend; ``template`` names the file and the package)."""

    sampler: str
    scheduler: str
    steps: int
    cfg: float
    template: str
    note: str = ""


def _cond_tokens(batch: int, tokens: int, width: int, generator, scale: float):
    return torch.randn(batch, tokens, width, generator=generator) * scale


@dataclass(frozen=True)
class Family:
    """A model family built tiny with the host's own classes: ``comfy.supported_models.<model_class>(config)``.

    ``accepts`` names the host class whose constructor (or parameter dataclass) lists the settings this host
    takes: settings an older host does not know (0.3.64's Lumina 2 has no ``rope_theta``) are left out, and
    are at their host default there. ``extras`` gives the conditioning entries the family's ``extra_conds``
    reads besides the token embeddings (pooled outputs, masks), per prompt.
    """

    key: str
    name: str
    model_class: str
    config: dict
    latent_shape: tuple  # one sample: (channels, [frames,] height, width)
    usual: Workflow
    context_dim: int = 64
    tokens: int = 8
    accepts: str | None = None
    extras: Callable[[int, torch.Generator], dict] | None = None
    weight_std: tuple[float, float] = (0.1, 0.05)  # (cross-attention, other) std of the seeded weights
    two_models: bool = False  # the usual workflow samples a high-noise model, then a low-noise one

    @property
    def video(self) -> bool:
        return len(self.latent_shape) == 4


class FamilyClip:
    """Enough of a text encoder for the adapter trainer: seeded tokens of the family's width (and its pooled
    vector), the same for the same text; the empty (negative) prompt gets small tokens."""

    def __init__(self, family: Family):
        self.family = family

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        generator = torch.Generator().manual_seed(sum(map(ord, text)) % 10_000)
        tokens = torch.randn(1, self.family.tokens, self.family.context_dim, generator=generator) * (3.0 if text else 0.1)
        return [[tokens, self.family.extras(self.family.tokens, generator) if self.family.extras else {}]]


class FamilyUnavailable(RuntimeError):
    """This host cannot build the family (its class is missing): the message says what is missing."""


def _resolve(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def host_config(family: Family) -> dict:
    """``family.config`` restricted to what this host's classes accept (:class:`Family`)."""
    import dataclasses
    import inspect

    config = dict(family.config)
    if family.accepts is None:
        return config
    target = _resolve(family.accepts)
    if dataclasses.is_dataclass(target):
        known = {field.name for field in dataclasses.fields(target)}
    else:
        known = set(inspect.signature(target.__init__).parameters)
    return {name: value for name, value in config.items() if name in known or name == "image_model"}


def family_model(family: Family, seed: int = 0):
    """The family's tiny ``BaseModel`` with seeded weights; :class:`FamilyUnavailable` when this host lacks it."""
    import comfy.supported_models

    model_class = getattr(comfy.supported_models, family.model_class, None)
    if model_class is None:
        raise FamilyUnavailable(f"this ComfyUI has no comfy.supported_models.{family.model_class}")
    model = model_class(host_config(family)).get_model({})
    seeded_weights(model, seed, attn2_std=family.weight_std[0], std=family.weight_std[1])
    _seeded_stored_buffers(model.diffusion_model, seed, family.weight_std[1])
    return model


def _seeded_stored_buffers(module: torch.nn.Module, seed: int, std: float) -> None:
    """Fill the buffers a checkpoint stores (SD3's ``pos_embed``): the host creates them with ``torch.empty``,
    so without this they hold whatever memory they got (NaN on some runs, finite on others)."""
    stored = set(module.state_dict())
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in stored and buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * std)


def family_conds(family: Family, seed: int = 1, positive_scale: float = 3.0):
    """CONDITIONING pair (positive, negative) of batch 1 in the shapes the family's model reads."""
    generator = torch.Generator().manual_seed(seed)
    pair = []
    for scale in (positive_scale, 0.1):
        tokens = _cond_tokens(1, family.tokens, family.context_dim, generator, scale)
        extras = family.extras(family.tokens, generator) if family.extras else {}
        pair.append([[tokens, extras]])
    return pair[0], pair[1]


def family_latent(family: Family, batch: int = 1) -> dict:
    """An empty LATENT of the family's shape (4-D images, 5-D video)."""
    return {"samples": torch.zeros(batch, *family.latent_shape)}


def _pooled(width: int):
    return lambda tokens, generator: {"pooled_output": torch.randn(1, width, generator=generator)}


def _text_mask(tokens, generator):
    return {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}


def _hidream_extras(tokens, generator):
    return {"pooled_output": torch.randn(1, 32, generator=generator),
            "conditioning_llama3": torch.randn(1, 2, tokens, 64, generator=generator)}


_TEMPLATES_033 = "comfyui_workflow_templates 0.11.44 (0.33.0)"
_TEMPLATES_0364 = "comfyui_workflow_templates 0.1.95 (0.3.64)"
_SMALL_UNET = _unet_config(32, [1, 2], 64, {"num_head_channels": 16, "num_heads": -1})
_LUMINA = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 64, "n_layers": 1,
           "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [8, 12, 12],
           "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0, "multiple_of": 16}
_WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2,
        "in_dim": 16, "out_dim": 16, "text_dim": 64, "text_len": 16, "patch_size": (1, 2, 2), "freq_dim": 256,
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}

#: the families whose usual workflows sample with CFG, each built tiny (sizes chosen to be the smallest the
#: host's classes accept: Z-Image's modulation needs width 256, SDXL's 64 channels per attention head)
FAMILIES: tuple[Family, ...] = (
    Family("sd15", "SD 1.x", "SD15", _SMALL_UNET, (4, 8, 8), tokens=77,
           usual=Workflow("euler", "normal", 20, 8.0, f"default.json, {_TEMPLATES_0364}")),
    Family("sdxl", "SDXL", "SDXL",
           {**_unet_config(64, [1, 2], 64, {}), "adm_in_channels": 2816,
            "use_linear_in_transformer": True, "num_classes": "sequential"},
           (4, 8, 8), tokens=77, extras=_pooled(1280),
           usual=Workflow("euler", "normal", 25, 8.0, f"sdxl_simple_example.json, {_TEMPLATES_033}",
                          "base 20 steps then refiner 5 (KSamplerAdvanced)")),
    Family("sd3", "SD3.x (MMDiT)", "SD3",
           {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
            "adm_in_channels": 32, "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
            "x_block_self_attn_layers": [], "qk_norm": "rms"},
           (16, 8, 8), extras=_pooled(32),
           usual=Workflow("euler", "sgm_uniform", 20, 4.01, f"sd3.5_simple_example.json, {_TEMPLATES_033}")),
    Family("flux", "Flux.1 with cfg > 1", "Flux", {**FLUX_CONFIG, "txt_ids_dims": []}, (16, 8, 8), accepts="comfy.ldm.flux.model.FluxParams",
           extras=_pooled(FLUX_CONFIG["vec_in_dim"]),
           usual=Workflow("euler", "simple", 20, 1.0, f"flux_dev_full_text_to_image.json, {_TEMPLATES_033}",
                          "dev is guidance-distilled (cfg 1, FluxGuidance 3.5); cfg > 1 is true CFG on "
                          "de-distilled or base Flux")),
    Family("chroma", "Chroma", "Chroma",
           {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 64,
            "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
            "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 128,
            "n_layers": 2, "txt_ids_dims": [], "vec_in_dim": None},
           (16, 8, 8), accepts="comfy.ldm.chroma.model.ChromaParams",
           extras=lambda tokens, generator: {"pooled_output": None},  # 0.3.64's Flux.encode_adm reads the key
           usual=Workflow("euler", "beta", 26, 3.5, f"image_chroma_text_to_image.json, {_TEMPLATES_033}",
                          "CFGGuider + SamplerCustomAdvanced")),
    Family("wan21", "Wan 2.1 (T2V)", "WAN21_T2V", _WAN, (16, 3, 8, 8),
           usual=Workflow("uni_pc", "simple", 30, 6.0, f"text_to_video_wan.json, {_TEMPLATES_033}")),
    Family("wan22_a14b", "Wan 2.2 A14B (high/low-noise models)", "WAN21_T2V", _WAN, (16, 3, 8, 8), two_models=True,
           usual=Workflow("euler", "simple", 20, 3.5, f"video_wan2_2_14B_t2v.json, {_TEMPLATES_0364}",
                          "two KSamplerAdvanced, steps 0–10 high-noise model, 10–20 low-noise model "
                          "(0.33's template: 4-step LoRA at cfg 1)")),
    Family("wan22_5b", "Wan 2.2 TI2V 5B", "WAN22_T2V", {**_WAN, "in_dim": 48, "out_dim": 48}, (48, 3, 8, 8),
           usual=Workflow("uni_pc", "simple", 20, 5.0, f"video_wan2_2_5B_ti2v.json, {_TEMPLATES_033}")),
    Family("hunyuan_video", "HunyuanVideo", "HunyuanVideo",
           {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
            "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
            "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
            "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False},
           (16, 3, 8, 8), accepts="comfy.ldm.hunyuan_video.model.HunyuanVideoParams", extras=_pooled(32),
           usual=Workflow("euler", "simple", 20, 1.0, f"hunyuan_video_text_to_video.json, {_TEMPLATES_033}",
                          "guidance-distilled (BasicGuider, FluxGuidance 6); cfg > 1 is true CFG")),
    Family("hunyuan_video_15", "HunyuanVideo 1.5", "HunyuanVideo15",
           {"image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32, "vec_in_dim": None,
            "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 1, 1],
            "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
            "use_cond_type_embedding": True, "vision_in_dim": 32, "meanflow_sum": False},
           (32, 3, 8, 8), accepts="comfy.ldm.hunyuan_video.model.HunyuanVideoParams",
           extras=lambda tokens, generator: {"pooled_output": None},  # no pooled vector (vec_in_dim None)
           usual=Workflow("euler", "simple", 20, 6.0, f"video_hunyuan_video_1.5_720p_t2v.json, {_TEMPLATES_033}",
                          "CFGGuider + SamplerCustomAdvanced")),
    Family("ltxv", "LTX-Video", "LTXV",
           {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
            "num_attention_heads": 2, "caption_channels": 64, "num_layers": 1},
           (128, 2, 4, 4), extras=_text_mask,
           usual=Workflow("euler", "LTXVScheduler", 30, 3.0, f"ltxv_text_to_video.json, {_TEMPLATES_033}",
                          "SamplerCustom")),
    Family("qwen_image", "Qwen-Image", "QwenImage",
           {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
            "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
            "axes_dims_rope": (8, 12, 12), "patch_size": 2},
           (16, 8, 8),
           usual=Workflow("euler", "simple", 20, 2.5, f"image_qwen_image.json, {_TEMPLATES_0364}",
                          "2512: 50 steps cfg 4; Lightning LoRA: cfg 1")),
    Family("lumina2", "Lumina 2", "Lumina2", _LUMINA, (16, 8, 8), accepts="comfy.ldm.lumina.model.NextDiT",
           extras=_text_mask,
           usual=Workflow("res_multistep", "simple", 30, 4.0, f"image_netayume_lumina_t2i.json, {_TEMPLATES_033}")),
    Family("z_image", "Z-Image", "ZImage",
           {**_LUMINA, "dim": 256, "axes_dims": [32, 48, 48], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
            "z_image_modulation": True, "time_scale": 1000.0},
           (16, 8, 8), accepts="comfy.ldm.lumina.model.NextDiT", extras=_text_mask,
           usual=Workflow("res_multistep", "simple", 25, 4.0, f"image_z_image.json, {_TEMPLATES_033}",
                          "Turbo: 8 steps at cfg 1")),
    Family("hidream", "HiDream I1", "HiDream",
           {"image_model": "hidream", "in_channels": 16, "out_channels": 16, "patch_size": 2, "num_layers": 1,
            "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [64, 64],
            "text_emb_dim": 32, "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8],
            "max_resolution": [128, 128], "llama_layers": [0, 1]},
           (16, 8, 8), extras=_hidream_extras,
           usual=Workflow("uni_pc", "simple", 50, 5.0, f"hidream_i1_full.json, {_TEMPLATES_033}",
                          "Full; Dev and Fast: cfg 1")),
)


def family(key: str) -> Family:
    return next(f for f in FAMILIES if f.key == key)


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
