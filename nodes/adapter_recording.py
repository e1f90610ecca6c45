"""AGD recording: CFG-guided trajectories of the user's model, the examples the adapters are trained on.

Each trajectory is one CFG sampling run (the stock ``comfy.sample.sample``) of a clone of the model with two
hooks: an ``APPLY_MODEL`` wrapper that keeps the conditioning the model saw (once per prompt) and a post-CFG
function that stores, per model call, the sampler's input, σ and CFG's prediction in noise space
(:class:`~fastguidance.guidance_adapters.training.TrajectoryStore`). Training is ``adapter_training.py``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import torch

from ..fastguidance.errors import FastGuidanceError, InvalidInputError
from ..fastguidance.guidance import noise_of
from ..fastguidance.guidance_adapters.training import TrajectoryStore
from .model_identity import model_architecture, model_fingerprint
from .shared_across_clones import SharedAcrossClones

log = logging.getLogger("fastguidance")

#: latent downscale ratios of 0.3.64's latent formats, which do not carry them (0.33's have
#: ``spacial_downscale_ratio`` / ``temporal_downscale_ratio``); the values its empty-latent nodes use
_SPATIAL_RATIOS = {"Wan22": 16, "LTXV": 32, "HunyuanImage21": 32, "HunyuanVideo15": 16}
_TEMPORAL_RATIOS = {"Mochi": 6, "LTXV": 8, "Cosmos1CV8x8x8": 8}
#: image models whose latent format is a video VAE's (3-D): one frame, whatever ``frames`` says (read in
#: comfy/supported_models.py of both hosts)
_IMAGE_MODELS_WITH_VIDEO_LATENTS = {"QwenImage", "CosmosT2IPredict2", "Anima", "Krea2", "JoyImage"}


def latent_sample_shape(model, width: int, height: int, frames: int) -> tuple[int, ...]:
    """One sample's latent for ``width`` × ``height`` pixels (× ``frames`` for video models), as the host's
    empty-latent nodes make it and the sampler receives it: ``(C, H, W)`` for images, ``(C, T, H, W)`` for
    video (Wan 2.1: 16 channels, 8× smaller; Wan 2.2 5B: 48 channels, 16× smaller; ``T = (frames − 1) / 4 + 1``)
    and ``(C, 1, H, W)`` for image models on a video VAE (Qwen-Image: the sampler adds that axis,
    ``comfy.sample.fix_empty_latent_channels``)."""
    latent_format = model.get_model_object("latent_format")
    name = type(latent_format).__name__
    spatial = getattr(latent_format, "spacial_downscale_ratio", None) or _SPATIAL_RATIOS.get(name, 8)
    size = (max(1, height // spatial), max(1, width // spatial))
    config = getattr(model.model, "model_config", None)
    image_model = any(cls.__name__ in _IMAGE_MODELS_WITH_VIDEO_LATENTS for cls in type(config).__mro__)
    if getattr(latent_format, "latent_dimensions", 2) == 3:
        temporal = getattr(latent_format, "temporal_downscale_ratio", None) or _TEMPORAL_RATIOS.get(name, 4)
        return (latent_format.latent_channels, 1 if image_model else (frames - 1) // temporal + 1, *size)
    return (latent_format.latent_channels, *size)


def require_same_family(model, earlier_model) -> None:
    """The model that samples the unrecorded first steps must make the latents ``model`` continues from."""
    ours, theirs = model.get_model_object("latent_format"), earlier_model.get_model_object("latent_format")
    if type(ours) is not type(theirs):
        raise InvalidInputError("earlier_model", model_architecture(earlier_model),
                                f"it makes {type(theirs).__name__} latents and model ({model_architecture(model)}) "
                                f"{type(ours).__name__} latents: connect the model your workflow samples the first "
                                "steps with (Wan 2.2: the high-noise model)")


def recording_identity(sample_shape: tuple, frames: int, segment: tuple[int, int], steps: int,
                       earlier_model) -> dict:
    """What the recording inputs added after the node first shipped contribute to a file's metadata and a
    checkpoint's identity: only what differs from recording every step of an image (so a checkpoint written
    before these inputs existed still resumes)."""
    identity: dict = {}
    if len(sample_shape) == 4:
        identity.update(frames=frames, latent_shape=list(sample_shape))
    if segment != (0, steps):
        identity["recorded_steps"] = list(segment)
    if earlier_model is not None:
        identity["earlier_model_fingerprint"] = model_fingerprint(earlier_model)
    return identity


class _Recorder(SharedAcrossClones):
    """Collects one CFG trajectory: the conditioning the model saw (once) and, per call, input, σ and CFG's noise."""

    def __init__(self):
        self.conditioning: dict[str, Any] | None = None
        self.examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        chunks = transformer_options.get("cond_or_uncond") or [0]
        if self.conditioning is None and 0 in chunks:
            per_chunk = x.shape[0] // len(chunks)
            rows = slice(chunks.index(0) * per_chunk, chunks.index(0) * per_chunk + 1)

            def cond_row(value):
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == x.shape[0]:
                    return value[rows].detach().cpu()
                return value

            self.conditioning = {"c_concat": cond_row(c_concat), "c_crossattn": cond_row(c_crossattn),
                                 "kwargs": {key: cond_row(value) for key, value in kwargs.items()}}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def post_cfg(self, args: dict) -> torch.Tensor:
        x, sigma, denoised = args["input"], args["sigma"], args["denoised"]
        noise = noise_of(x, denoised, sigma)  # CFG's prediction in noise space
        self.examples.append((x.detach().cpu(), sigma.detach().float().cpu(), noise.detach().cpu()))
        return denoised


def record_trajectories(model, clip, lines: list[str], negative: str, omega_range: tuple[float, float],
                        trajectories: int, steps: int, sampler_name: str, scheduler: str, sample_shape: tuple,
                        seed: int, progress, segment: tuple[int, int] = (0, 10000),
                        earlier_model=None) -> tuple[list[dict], TrajectoryStore]:
    """CFG sampling of the prompts (cycled) at seeded random ω; every model call of the steps in ``segment``
    (``[start, end)``) becomes one example. The steps before ``start`` are sampled, with CFG at the same ω and
    unrecorded, by ``earlier_model`` (else ``model``), and continued as KSamplerAdvanced continues a latent:
    no new noise."""
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(line)) for line in lines]
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    conditioning: list[dict | None] = [None] * len(lines)
    rng = random.Random(seed)
    empty = torch.zeros(1, *sample_shape)
    store: TrajectoryStore | None = None
    dropped = 0

    def callback(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.update(1)

    try:
        for index in range(trajectories):
            comfy.model_management.throw_exception_if_processing_interrupted()
            prompt = index % len(lines)
            omega = rng.uniform(*omega_range)
            recorder = _Recorder()
            recording = model.clone()
            recording.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "fastguidance_record",
                                           recorder.apply_model)
            recording.set_model_sampler_post_cfg_function(recorder.post_cfg)
            noise = comfy.sample.prepare_noise(empty, seed + index)
            start = empty
            if segment[0] > 0:
                start = comfy.sample.sample(earlier_model or model, noise, steps, omega, sampler_name, scheduler,
                                            conds[prompt], negative_cond, empty, last_step=segment[0],
                                            callback=callback, disable_pbar=True, seed=seed + index)
                noise = torch.zeros_like(noise)
            comfy.sample.sample(recording, noise, steps, omega, sampler_name, scheduler, conds[prompt], negative_cond,
                                start, start_step=segment[0], last_step=segment[1], callback=callback,
                                disable_pbar=True, seed=seed + index)
            if recorder.conditioning is None or not recorder.examples:
                raise FastGuidanceError("the sampler never called the model with the prompt: nothing to record")
            if conditioning[prompt] is None:
                conditioning[prompt] = recorder.conditioning
            if store is None:  # the first trajectory tells how many model calls a trajectory makes
                store = TrajectoryStore(trajectories * len(recorder.examples), sample_shape)
            for x, sigma, target in recorder.examples:
                if store.append(x, sigma, omega, prompt, target) < x.shape[0]:
                    dropped += 1
    except BaseException:  # interrupted or failed: no temporary trajectory files are left behind
        if store is not None:
            store.close()
        raise
    if dropped:
        log.warning("FastGuidance [agd]: %d model calls beyond the first trajectory's count were not stored "
                    "(an adaptive sampler makes a varying number of calls)", dropped)
    return conditioning, store
