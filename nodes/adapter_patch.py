"""AGD in the host: where adapters attach, how they run on the conditional pass, how they are trained.

Attach points (COMFYUI.md §4):
- SD1.x / SD2.x / SDXL UNets: every cross-attention output, through ``attn2_output_patch``; named
  ``input.3.0`` = (block kind, block id, transformer index within the block), as the host names them;
- DiTs whose blocks the host offers as ``patches_replace["dit"]`` entries ``("double_block", i)`` with the
  image stream under ``"img"`` and the call's ``transformer_options`` (:data:`DIT_FAMILIES`): Flux-family
  double blocks, Wan 2.1/2.2 blocks (5-D video latents, flattened to tokens by the host), SD3.x joint blocks
  and Qwen-Image transformer blocks: the image stream after every block (a patch already in a slot is
  chained); named ``double_block.i``, as the host keys them.

At run time an ``APPLY_MODEL`` wrapper binds the adapters once per model call (the conditioner
reads ``ω``, the sigma, the prompt tokens and the model's pooled vector ``y`` where it has one) and
passes the bound object to the attach points in a copy of ``transformer_options``. The adapters act
on the conditional rows only; an uncond in the same batch stays the plain model. Adapter weights
live in their own ModelPatcher, returned by the patches' ``models()``, so the host loads and offloads
them with the model (nothing here moves them); they run in the model's dtype where it is bf16 or fp16.
The patch objects are shared, not copied, when a MODEL is cloned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from typing import Any, Iterator

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..fastguidance.guidance_adapters.training import recomputed_in_backward
from ..fastguidance.guidance_adapters.adapters import GuidanceAdapters, adapter_row_scale, prompt_vector
from ..fastguidance.errors import InvalidInputError
from ..fastguidance.guidance_adapters.policy import AdapterGuidance
from .engine_patch import install_policy
from .model_identity import model_architecture
from .shared_across_clones import SharedAcrossClones

log = logging.getLogger("fastguidance")

#: transformer_options key of the adapters of a patched model (:class:`AdapterSettings`)
SETTINGS_KEY = "fastguidance_agd"
#: transformer_options key of the adapters bound for the current model call
BOUND_KEY = "fastguidance_agd_bound"
#: transformer_options key, per run: ω read from the sampler's cfg
OMEGA_KEY = "fastguidance_agd_omega"
#: transformer_options key, training only: ``run(block, args) → out`` that runs a DiT block with gradient
#: checkpointing (absent when sampling, and when training without it)
CHECKPOINT_KEY = "fastguidance_agd_checkpoint"
#: key of the pack's APPLY_MODEL and OUTER_SAMPLE wrappers for adapters
WRAPPER_KEY = "fastguidance_agd"
#: DiT families by the host's class of their diffusion model → (attribute listing the blocks that
#: ``patches_replace["dit"][("double_block", i)]`` replaces, attribute giving the image stream's width).
#: Only classes whose block loop passes ``"img"`` and ``"transformer_options"`` to the patch on both
#: supported hosts (read in comfy/ldm/wan/model.py, comfy/ldm/modules/diffusionmodules/mmdit.py and
#: comfy/ldm/qwen_image/model.py of 0.3.64 and 0.33): Wan's S2V, VACE and Animate variants add streams or
#: other patch arguments and are not listed. Flux-family models are found by their ``double_blocks``.
DIT_FAMILIES = {
    "WanModel": ("blocks", "dim"),  # Wan 2.1 T2V/I2V, Wan 2.2 A14B (both models) and TI2V 5B
    "OpenAISignatureMMDITWrapper": ("joint_blocks", "hidden_size"),  # SD3 / SD3.5
    "QwenImageTransformer2DModel": ("transformer_blocks", "inner_dim"),  # Qwen-Image (and its Edit models)
}
SUPPORTED = ("SD1.x, SD2.x and SDXL UNets (cross-attention outputs); Flux-family DiTs, Wan 2.1/2.2, SD3.x and "
             "Qwen-Image (the image stream after every double, joint or transformer block)")


def attach_points(model: Any) -> dict[str, int]:
    """Attach point name → channels of the host model, or an error naming an unsupported architecture."""
    diffusion_model = model.model.diffusion_model
    points: dict[str, int] = {}
    dit = DIT_FAMILIES.get(type(diffusion_model).__name__)
    video = any(hasattr(module, "time_stack") for module in diffusion_model.modules())  # SVD: names would collide
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks") and not video:
        middle = [diffusion_model.middle_block] if getattr(diffusion_model, "middle_block", None) is not None else []
        for kind, blocks in (("input", diffusion_model.input_blocks), ("middle", middle),
                             ("output", diffusion_model.output_blocks)):
            for block_id, block in enumerate(blocks):
                for layer in block:
                    for index, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                        if getattr(transformer, "attn2", None) is not None:
                            points[f"{kind}.{block_id}.{index}"] = transformer.attn2.to_out[0].out_features
    elif hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "hidden_size"):
        points = {f"double_block.{i}": int(diffusion_model.hidden_size) for i in range(len(diffusion_model.double_blocks))}
    elif dit is not None:
        blocks, width = dit
        points = {f"double_block.{i}": int(getattr(diffusion_model, width))
                  for i in range(len(getattr(diffusion_model, blocks)))}
    if not points:
        raise InvalidInputError("model", model_architecture(model),
                                f"guidance adapters attach to {SUPPORTED}; this model has no such attach point")
    return points


def base_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its manual-cast dtype where weights are stored in another)."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()


def adapter_dtype(model: Any) -> torch.dtype:
    """The dtype the adapters run in on ``model``: its compute dtype where that is bf16 or fp16 (within the
    tolerance ``tests/test_adapters.py`` states: ``test_adapters_in_half_precision_stay_close_to_fp32``), else
    fp32. The conditioner stays fp32 in every case (``GuidanceAdapters.compute_in``)."""
    dtype = base_dtype(model)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def is_dit(points: dict[str, int]) -> bool:
    return next(iter(points)).startswith("double_block.")


class _AdapterPatch(SharedAcrossClones):
    """Shared by every clone of a MODEL (not deep-copied); tells the host about the adapters' ModelPatcher."""

    def __init__(self, weights: comfy.model_patcher.ModelPatcher | None):
        self.weights = weights

    def models(self) -> list:
        return [self.weights] if self.weights is not None else []

    def to(self, device_or_dtype: Any) -> "_AdapterPatch":
        return self


class AttentionOutputPatch(_AdapterPatch):
    """``attn2_output_patch``: ``n → n + adapter(n)`` where the call has bound adapters."""

    def __call__(self, n: torch.Tensor, extra_options: dict) -> torch.Tensor:
        bound = extra_options.get(BOUND_KEY)
        if bound is None:
            return n
        block = extra_options["block"]
        return bound(f"{block[0]}.{block[1]}.{extra_options.get('block_index', 0)}", n)


class DoubleBlockPatch(_AdapterPatch):
    """``patches_replace["dit"][("double_block", i)]``: the block (or the patch that was there), then the adapter."""

    def __init__(self, weights, index: int, previous: Any = None):
        super().__init__(weights)
        self.index, self.previous = index, previous

    def models(self) -> list:
        return super().models() + (self.previous.models() if hasattr(self.previous, "models") else [])

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        checkpointed = options.get(CHECKPOINT_KEY)
        if checkpointed is not None:  # training with gradient checkpointing: the block's activations recomputed
            # in backward, after the host's loop has moved on: the block and options as they are now
            extra = {**extra, "original_block": frozen_closure(extra["original_block"])}
            args = {**args, "transformer_options": dict(options)}
            out = checkpointed(lambda block_args: self._block(block_args, extra), args)
        else:
            out = self._block(args, extra)
        bound = options.get(BOUND_KEY)
        if bound is None:
            return out
        return {**out, "img": bound(f"double_block.{self.index}", out["img"])}

    def _block(self, args: dict, extra: dict) -> dict:
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)


def frozen_closure(function: Any) -> Any:
    """``function`` with the variables it closes over fixed at their current values.

    The hosts' ``block_wrap`` closes over the loop variable ``block`` (and the loop's other locals): called
    later, as a recomputation in the backward pass is, it would run whatever block the loop reached last
    (Flux: a single-stream block). Not a closure: returned as it is."""
    closure = getattr(function, "__closure__", None)
    if not closure:
        return function
    cells = tuple(types.CellType(cell.cell_contents) if _filled(cell) else types.CellType() for cell in closure)
    return types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__, cells)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class AdapterSettings(SharedAcrossClones):
    """What a MODEL with adapters carries: the adapters' ModelPatcher, ω (None: the sampler's cfg), strength."""

    weights: comfy.model_patcher.ModelPatcher
    omega: float | None
    strength: float
    omega_range: tuple[float, float] | None = None


def attach(model: Any, weights: comfy.model_patcher.ModelPatcher | None) -> Any:
    """A clone of ``model`` whose attach points run the adapters bound for a call (no adapter is bound yet)."""
    points = attach_points(model)
    patched = model.clone()
    if is_dit(points):
        replace = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
        for index in range(len(points)):
            previous = replace.get(("double_block", index))
            patched.set_model_patch_replace(DoubleBlockPatch(weights, index, previous), "dit", "double_block", index)
    else:
        patched.set_model_attn2_output_patch(AttentionOutputPatch(weights))
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, adapter_apply_model)
    return patched


def has_adapters(model: Any) -> bool:
    return SETTINGS_KEY in model.model_options.get("transformer_options", {})


def install_adapters(model: Any, adapters: GuidanceAdapters, omega: float | None, strength: float,
                     omega_range: tuple[float, float] | None, node_id: str | None,
                     compute_dtype: torch.dtype | None = None) -> Any:
    """The MODEL whose every model call is one adapted, guided evaluation (engine action ``ADAPTER``).

    The adapters run in ``compute_dtype`` (default :func:`adapter_dtype`: the model's own where it is bf16 or
    fp16), cast once here. Their weights get their own ModelPatcher, of the class the host's loaders and its
    own patch models use (``comfy.model_patcher.CoreModelPatcher``: ``ModelPatcherDynamic`` on 0.33 with an
    NVIDIA GPU, which puts plain modules' weights on the device whole at every load; a ``ModelPatcher``
    elsewhere): reported through the patches' ``models()``, the host loads, offloads and accounts for them
    with the model."""
    if has_adapters(model):
        raise InvalidInputError("model", "already has guidance adapters",
                                "connect the model before its first Load Guidance Adapter node")
    adapters.compute_in(compute_dtype or adapter_dtype(model))
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    weights = patcher_class(adapters, load_device=model.load_device, offload_device=model.offload_device)
    patched = attach(model, weights)
    patched.model_options["transformer_options"][SETTINGS_KEY] = AdapterSettings(weights, omega, strength, omega_range)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, adapter_outer_sample)
    return install_policy(patched, AdapterGuidance(omega, strength), node_id)


def adapter_outer_sample(executor, *args, **kwargs):
    """``OUTER_SAMPLE`` wrapper: where ω is the sampler's cfg, read it from the guider for this run."""
    guider = executor.class_obj
    settings: AdapterSettings | None = guider.model_options.get("transformer_options", {}).get(SETTINGS_KEY)
    if settings is None or settings.omega is not None:
        return executor(*args, **kwargs)
    cfg = getattr(guider, "cfg", None)
    if cfg is None:
        raise InvalidInputError("use_sampler_cfg", True, f"the guider {type(guider).__name__} has no cfg (BasicGuider, "
                                "as Flux workflows use): turn off use_sampler_cfg on Load Guidance Adapter and set "
                                "guidance_scale")
    warn_outside_range(float(cfg), settings.omega_range)
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][OMEGA_KEY] = float(cfg)
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original


def warn_outside_range(omega: float, omega_range: tuple[float, float] | None) -> None:
    if omega_range is not None and not omega_range[0] <= omega <= omega_range[1]:
        log.warning("FastGuidance [agd]: guidance scale %.2f is outside the range the adapters were trained on "
                    "(%.2f–%.2f); expect results unlike CFG", omega, *omega_range)


def conditional_rows(cond_or_uncond: list[int] | None, batch: int, strength: float) -> list[float]:
    """Per-row adapter scale of a model call: ``strength`` on cond rows, 0 on uncond rows.

    ``cond_or_uncond`` is the host's list of the call's chunks (0 = cond, 1 = uncond); a call without
    it is all cond.
    """
    if not cond_or_uncond:
        return [float(strength)] * batch
    per_chunk = batch // len(cond_or_uncond)
    return [float(strength) if kind == 0 else 0.0 for kind in cond_or_uncond for _ in range(per_chunk)]


def bind_adapters(adapters: GuidanceAdapters, omega: float | torch.Tensor, sigma: torch.Tensor, c_crossattn: torch.Tensor,
                  kwargs: dict, row_scale: torch.Tensor | float | None):
    """The adapters of one model call: ω, σ, prompt tokens and the pooled vector (``y``) where the model has one.

    Nothing crosses between host and device here when the inputs are on the adapters' device (the
    host's case): ω is filled on the device, ``row_scale`` is a number or a tensor already there
    (:func:`~fastguidance.guidance_adapters.adapters.adapter_row_scale`); the ``to(device)`` calls are no-ops then.
    """
    device = next(adapters.parameters()).device
    omega_rows = omega.to(device).float() if torch.is_tensor(omega) else torch.full((sigma.shape[0],), float(omega), device=device)
    tokens = c_crossattn.to(device)
    pooled = kwargs.get("y")
    return adapters.bind(omega_rows, sigma.to(device), tokens, prompt_vector(tokens, None if pooled is None else pooled.to(device)),
                         row_scale=row_scale.to(device) if torch.is_tensor(row_scale) else row_scale)


def adapter_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """``APPLY_MODEL`` wrapper: bind the adapters for this call (cond rows only) and pass them to the attach points."""
    settings: AdapterSettings | None = transformer_options.get(SETTINGS_KEY)
    omega = None if settings is None else transformer_options.get(OMEGA_KEY, settings.omega)
    if settings is None or omega is None or settings.strength == 0.0 or BOUND_KEY in transformer_options \
            or c_crossattn is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    cond_or_uncond = transformer_options.get("cond_or_uncond")
    if not any(conditional_rows(cond_or_uncond, x.shape[0], settings.strength)):  # uncond only: the plain model
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    adapters: GuidanceAdapters = settings.weights.model
    if any(parameter.device != x.device for parameter in adapters.parameters()):
        # the host places the adapters (their ModelPatcher is reported through the patches' models()); a
        # partial load (low VRAM, --novram) leaves some or all plain modules on its offload device: use a
        # copy for this call, as the host copies the weights of layers it could not load, and leave the
        # module where the host's accounting says it is
        adapters = adapters.copy_on(x.device)
    bound = bind_adapters(adapters, omega, t, c_crossattn, kwargs,
                          adapter_row_scale(cond_or_uncond, x.shape[0], settings.strength, x.device))
    return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, BOUND_KEY: bound}, **kwargs)


@contextlib.contextmanager
def trainable_weights(module: torch.nn.Module) -> Iterator[int]:
    """Let autograd flow *through* a frozen model without training it.

    The host loads models under ``torch.inference_mode()``; such tensors cannot be saved for
    backward, and training adapters needs gradients through every later block of the frozen base.
    Inference-tensor parameters and buffers are swapped for normal copies while the context is
    open (the model's values never change) and swapped back afterwards; parameters that would
    collect gradients are frozen meanwhile. Yields the bytes copied, the extra memory training
    needs on top of the loaded model.
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    frozen: list[torch.nn.Parameter] = []
    copied = 0
    try:  # restore whatever was swapped, also when a copy fails half-way (out of memory)
        with torch.inference_mode(False):
            for submodule in module.modules():
                for is_parameter, table in ((True, submodule._parameters), (False, submodule._buffers)):
                    for name, tensor in list(table.items()):
                        if tensor is None:
                            continue
                        if tensor.is_inference():
                            copy = tensor.detach().clone()
                            swapped.append((table, name, tensor))
                            table[name] = torch.nn.Parameter(copy, requires_grad=False) if is_parameter else copy
                            copied += copy.numel() * copy.element_size()
                        elif is_parameter and tensor.requires_grad:
                            tensor.requires_grad_(False)
                            frozen.append(tensor)
        yield copied
    finally:
        for table, name, tensor in swapped:
            table[name] = tensor
        for parameter in frozen:
            parameter.requires_grad_(True)


def block_checkpointing():
    """What ``CHECKPOINT_KEY`` holds while training with gradient checkpointing: a DiT block run by
    :func:`~fastguidance.guidance_adapters.training.recomputed_in_backward`, recomputed under the same copies of saved
    activations as the forward pass (:func:`saved_activations_copied`: the host's blocks update in place)."""
    return lambda run, args: recomputed_in_backward(run, args, saved_activations_copied)


def _copy_unless_parameter(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.nn.Parameter) else tensor.clone()


def differentiable_attention(func, *args, **kwargs):
    """``optimized_attention_override`` for training: torch's SDPA, which has a backward pass (some
    optimised kernels a user may have enabled, such as SageAttention, do not)."""
    import comfy.ldm.modules.attention

    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


@contextlib.contextmanager
def host_training_mode() -> Iterator[None]:
    """Tell the host that gradients will flow through its model: ``comfy.model_management.in_training``.

    Hosts from 0.33 pick differentiable implementations only while the flag is set (their own
    trainer, ``comfy_extras/nodes_train.py``, sets it): Flux's rope otherwise runs a kernel with no
    autograd formula ("Trying to backward through comfy_kitchen.apply_rope.default"). The previous
    value is restored on the way out, also on interruption; hosts without the flag (0.3.64) are left
    untouched.
    """
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def saved_activations_copied() -> contextlib.AbstractContextManager:
    """Autograd keeps copies of the activations it saves, so the host's in-place updates cannot corrupt them.

    The host's Flux blocks update their streams in place (``txt += …``, ``x += …``) after layers
    that saved them for backward; once adapters make those streams require gradients, autograd
    refuses ("modified by an inplace operation"). Copying saved activations (never the weights)
    gives exactly the out-of-place gradients at the cost of more activation memory; UNets do not need it.
    """
    return torch.autograd.graph.saved_tensors_hooks(_copy_unless_parameter, lambda tensor: tensor)
