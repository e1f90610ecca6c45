"""AGD nodes: train guidance adapters on the user's model, and load them for single-pass guided sampling."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..fastguidance.guidance_adapters.training import (DistillationTrainer, TrainingSettings, TrajectoryStore,
                                                       format_bytes, require_room_for_trajectories, train_on_store,
                                                       trajectory_bytes)
from ..fastguidance.guidance_adapters.adapters import (ADAPTER_KINDS, AdapterSpec, GuidanceAdapters, load_adapters,
                                                       save_adapters)
from ..fastguidance.errors import FastGuidanceError, InvalidInputError
from ..fastguidance.guidance import noise_of
from . import model_folders, page_messages
from .adapter_patch import (BOUND_KEY, CHECKPOINT_KEY, attach, block_checkpointing, attach_points, bind_adapters,
                            differentiable_attention, has_adapters, host_training_mode, install_adapters, is_dit,
                            saved_activations_copied, trainable_weights, warn_outside_range)
from .trainers import curve_image, prompt_lines
from .validation import FILE_NAME, CrossRule, FileInput, check_inputs, validate
from .model_identity import model_architecture, model_fingerprint, require_same_model

log = logging.getLogger("fastguidance")

CHECKPOINT_SUFFIX = ".checkpoint"  # not .safetensors: checkpoints never show up in the loader's list
#: defaults of the trainer's inputs added after it first shipped; start 0 and end 10000 record every step, as
#: the node did before them, frames only concern video models, which it did not support then, and training
#: without gradient checkpointing is what it always did
RECORDING_DEFAULTS = {"frames": 33, "start_at_step": 0, "end_at_step": 10000, "gradient_checkpointing": False}
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


class LoadGuidanceAdapterNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_LoadGuidanceAdapter",
            display_name="Load Guidance Adapter (FastGuidance)",
            category="sampling/fastguidance",
            description="Adapter Guidance Distillation (Jensen et al. 2025): small adapters trained on your model make "
                        "one model evaluation return the CFG result, so every step costs one evaluation instead of "
                        "two. Use the output MODEL with the stock KSampler or SamplerCustomAdvanced. The adapters "
                        "come from 'Train Guidance Adapter' for this model.",
            inputs=[
                io.Model.Input("model", tooltip="The model the adapters were trained for."),
                io.Combo.Input("adapter", options=model_folders.files(model_folders.ADAPTERS),
                               tooltip="An adapter file from models/fastguidance_adapters/."),
                io.Boolean.Input("use_sampler_cfg", default=True,
                                 tooltip="On: the guidance scale is the sampler's cfg (the negative prompt is not "
                                         "evaluated; the adapters learned its effect). Off: use guidance_scale below."),
                io.Float.Input("guidance_scale", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="The guidance scale ω when use_sampler_cfg is off. Stay inside the range the "
                                       "adapters were trained on (shown in the log; default training range 1–8)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scales the adapters' output. 1 = as trained; 0 = adapters off, which gives "
                                       "exactly the unguided (cfg 1) result at one evaluation per step."),
                io.Boolean.Input("allow_other_model", default=False, optional=True,
                                 tooltip="Use adapters trained on another model of the same architecture (for "
                                         "example before a LoRA), with a warning. Off: they are refused."),
            ],
            outputs=[io.Model.Output(tooltip="The model with adapters: one evaluation per step, guided.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return validate(cls, values, *_LOAD_CHECKS)

    @classmethod
    def execute(cls, model, adapter: str, use_sampler_cfg: bool, guidance_scale: float, strength: float,
                allow_other_model: bool = False) -> io.NodeOutput:
        check_inputs(cls, locals(), *_LOAD_CHECKS)
        path = model_folders.existing_file(model_folders.ADAPTERS, adapter, "adapter",
                                           "train adapters with Train Guidance Adapter")
        adapters, metadata = load_adapters(path)
        check_made_for(model, adapter, metadata, adapters.spec.attach_points, allow_other_model)
        omega_range = tuple(metadata["omega_range"]) if metadata.get("omega_range") else None
        omega = None if use_sampler_cfg else float(guidance_scale)
        if omega is not None:
            warn_outside_range(omega, omega_range)
        log.info("FastGuidance [agd]: %s (%d parameters, trained for ω %s) at %s, strength %.2f", adapter,
                 adapters.count_parameters(), omega_range, "the sampler's cfg" if omega is None else f"ω {omega:.2f}",
                 strength)
        return io.NodeOutput(install_adapters(model, adapters, omega, strength, omega_range, cls.hidden.unique_id))


def check_made_for(model, adapter: str, metadata: dict, file_points: dict, allow_other_model: bool) -> None:
    """Refuse adapters made for another architecture or attach-point set; another fingerprint only on request."""
    architecture = model_architecture(model)
    if metadata.get("architecture") != architecture:
        raise InvalidInputError("adapter", adapter, f"it was trained for a {metadata.get('architecture')} model and "
                                                    f"this model is {architecture}: train adapters for this model")
    points = attach_points(model)
    if dict(file_points) != points:
        missing = sorted(set(points) ^ set(file_points))[:4]
        raise InvalidInputError("adapter", adapter, f"it was made for other attach points ({len(file_points)} in the "
                                                    f"file, {len(points)} in this model; differing: {missing} or "
                                                    "their widths): train adapters for this model")
    recorded = metadata.get("recorded_steps")
    part = f"steps {recorded[0]}–{recorded[1]} of {metadata.get('trajectory_steps')}, " \
        if isinstance(recorded, list) and len(recorded) == 2 else ""
    # Wan 2.2's high- and low-noise models share architecture and attach points: the fingerprint tells them apart
    require_same_model(model, metadata, "adapter", adapter, f"{architecture} model ({part}", "train adapters for this model",
                       allow_other_model, "results may differ from CFG")


class _Recorder:
    """Collects one CFG trajectory: the conditioning the model saw (once) and, per call, input, σ and CFG's noise."""

    def __init__(self):
        self.conditioning: dict[str, Any] | None = None
        self.examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __deepcopy__(self, memo: dict) -> "_Recorder":
        return self

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


class TrainGuidanceAdapterNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_TrainGuidanceAdapter",
            display_name="Train Guidance Adapter (FastGuidance)",
            category="sampling/fastguidance",
            description="Trains AGD guidance adapters (Jensen et al. 2025) on your model: samples your prompts with "
                        "CFG at random guidance scales, records every step, and teaches small adapters (about 1–5% "
                        "of the model) to give the CFG result in one evaluation. Saves "
                        "models/fastguidance_adapters/<filename>; use it with Load Guidance Adapter. Interrupting "
                        "keeps a checkpoint: run again with resume on to continue.",
            inputs=[
                io.Model.Input("model", tooltip="The model to train adapters for (its weights stay unchanged)."),
                io.Clip.Input("clip", tooltip="The text encoder of that model."),
                io.String.Input("prompts", multiline=True,
                                default="a cat sitting on a windowsill\na red car parked on a street at night, rain\n"
                                        "a portrait of an old fisherman, soft window light\na bowl of fruit on a table",
                                tooltip="Training prompts, one per line: dozens of the kinds you use (more prompts "
                                        "generalise better)."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="The negative prompt the adapters learn to imply, so it need not be evaluated when sampling."),
                io.Float.Input("omega_min", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Lowest guidance scale ω of the training trajectories."),
                io.Float.Input("omega_max", default=8.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Highest guidance scale ω. Each trajectory draws ω uniformly in [min, max]; "
                                       "use the adapters inside this range."),
                io.Int.Input("trajectories", default=64, min=1, max=100000,
                             tooltip="CFG sampling runs recorded (prompts are cycled). Each costs steps × 2 "
                                     "evaluations; every step becomes one training example."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps per trajectory."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler of the trajectories (use the one you will sample with)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Scheduler of the trajectories."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width of the trajectories."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height of the trajectories."),
                io.Int.Input("train_steps", default=1000, min=1, max=1000000,
                             tooltip="Optimiser steps (AdamW, warm-up then cosine decay)."),
                io.Int.Input("batch", default=4, min=1, max=256,
                             tooltip="Examples per optimiser step. Memory grows with it (gradients flow through "
                                     "the whole model)."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1e-1, step=1e-5, round=1e-6,
                               tooltip="Peak learning rate (1e-4 … 3e-3 is typical)."),
                io.Combo.Input("kind", options=list(ADAPTER_KINDS), default="cross_attention",
                               tooltip="cross_attention: attends to the prompt tokens (the paper's choice for "
                                       "text-to-image models). offset: one learned offset per block (smaller; the "
                                       "paper's choice for class-conditional DiTs)."),
                io.Int.Input("adapter_width", default=160, min=8, max=1024, step=4,
                             tooltip="Hidden width of each adapter (a multiple of 4). 160 gives about 1% of SD1.5's "
                                     "parameters and 3% of SDXL's (the paper: 1–5%); larger = more to learn with."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the trajectories' noise and ω, the initialisation and the batches."),
                io.String.Input("filename", default="guidance_adapter",
                                tooltip="File name in models/fastguidance_adapters/ (.safetensors added)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name. Off: an existing file is never replaced."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the checkpoint an interrupted run of the same inputs left "
                                         "(the trajectories are recorded again, identically, from the seed)."),
                # inputs added after the node first shipped: optional, and their defaults do what saved
                # workflows without them did (RECORDING_DEFAULTS), so those load and run unchanged
                io.Int.Input("frames", default=RECORDING_DEFAULTS["frames"], min=1, max=1025, step=4, optional=True,
                             tooltip="Video models (Wan…): frames of the recorded samplings, 1–1025 (33). Record "
                                     "fewer frames and a smaller width and height than you sample at to make "
                                     "recording and training cheaper (the README says what it costs); image "
                                     "models ignore it."),
                io.Int.Input("start_at_step", default=RECORDING_DEFAULTS["start_at_step"], min=0, max=10000,
                             optional=True,
                             tooltip="First recorded step, 0–10000 (0), as in KSamplerAdvanced. Wan 2.2's "
                                     "low-noise model: the step where your workflow switches to it (10 of 20); "
                                     "the steps before are sampled by earlier_model, unrecorded."),
                io.Int.Input("end_at_step", default=RECORDING_DEFAULTS["end_at_step"], min=0, max=10000,
                             optional=True,
                             tooltip="Recording stops at this step, 0–10000 (10000: to the end), as in "
                                     "KSamplerAdvanced. Wan 2.2's high-noise model: the step where your workflow "
                                     "switches to the low-noise model (10 of 20)."),
                io.Boolean.Input("gradient_checkpointing", default=RECORDING_DEFAULTS["gradient_checkpointing"],
                                 optional=True,
                                 tooltip="On or off (off). On: DiTs (Wan, SD3, Qwen-Image; Flux's double blocks) "
                                         "keep only each block's input for the backward pass and recompute the "
                                         "block there: far less activation memory (the README's cost table) for "
                                         "about one more forward pass per training step; same adapters. UNets "
                                         "(SD1.x/SDXL) train without it. Sampling is unchanged either way."),
                io.Model.Input("earlier_model", optional=True,
                               tooltip="Samples the steps before start_at_step (with CFG, not recorded): Wan 2.2's "
                                       "high-noise model when training the low-noise one. Unconnected: the "
                                       "model itself samples them."),
            ],
            outputs=[io.Image.Output("loss_curve", display_name="loss_curve",
                                     tooltip="Distillation loss per step (it should fall)."),
                     io.String.Output("report", display_name="report",
                                      tooltip="Where the file went, its size, the final loss, time and memory.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return validate(cls, values, *_TRAIN_CHECKS)

    @classmethod
    def execute(cls, model, clip, prompts: str, negative: str, omega_min: float, omega_max: float, trajectories: int,
                steps: int, sampler_name: str, scheduler: str, width: int, height: int, train_steps: int, batch: int,
                learning_rate: float, kind: str, adapter_width: int, seed: int, filename: str, overwrite: bool,
                resume: bool, frames: int = RECORDING_DEFAULTS["frames"],
                start_at_step: int = RECORDING_DEFAULTS["start_at_step"],
                end_at_step: int = RECORDING_DEFAULTS["end_at_step"], earlier_model=None,
                gradient_checkpointing: bool = RECORDING_DEFAULTS["gradient_checkpointing"]) -> io.NodeOutput:
        check_inputs(cls, locals(), *_TRAIN_CHECKS)
        began = time.perf_counter()
        if has_adapters(model):
            raise InvalidInputError("model", "has guidance adapters", "connect the model without Load Guidance Adapter")
        points = attach_points(model)
        lines = prompt_lines(prompts)
        path = model_folders.new_file(model_folders.ADAPTERS, filename, overwrite)
        checkpoint_path = path[: -len(".safetensors")] + CHECKPOINT_SUFFIX
        if os.path.exists(checkpoint_path) and not resume:
            raise InvalidInputError("resume", False, f"{checkpoint_path} holds an interrupted training of this name: turn "
                                                     "on resume to continue it, or delete that file to start again")
        settings = TrainingSettings(train_steps, batch, learning_rate, warmup=max(1, min(100, train_steps // 20)),
                                    seed=seed % (1 << 31))
        node_id = cls.hidden.unique_id
        if earlier_model is not None:
            require_same_family(model, earlier_model)
        sample_shape = latent_sample_shape(model, width, height, frames)
        segment = (start_at_step, min(end_at_step, steps))
        recorded_steps = segment[1] - segment[0]
        estimate = trajectory_bytes(trajectories * recorded_steps, sample_shape)
        require_room_for_trajectories(trajectories * recorded_steps, sample_shape, "trajectories", trajectories)
        _show(node_id, f"Recording {trajectories} CFG trajectories × {recorded_steps} steps of "
                       f"{'×'.join(map(str, sample_shape))} latents: about {format_bytes(estimate)} of training data "
                       f"({'on disk' if estimate > (1 << 30) else 'in memory'}), then {train_steps} training steps.")
        progress = comfy.utils.ProgressBar(trajectories * segment[1] + train_steps, node_id=node_id)

        conditioning, store = _record_trajectories(model, clip, lines, negative, (omega_min, omega_max), trajectories,
                                                   steps, sampler_name, scheduler, sample_shape, seed, progress,
                                                   segment, earlier_model)
        collected = time.perf_counter() - began
        recording = recording_identity(sample_shape, frames, segment, steps, earlier_model)
        try:
            first = conditioning[0]
            pooled = first["kwargs"].get("y")
            text_dim = first["c_crossattn"].shape[-1]
            spec = AdapterSpec(points, text_dim, pooled.shape[-1] if pooled is not None else text_dim, kind, adapter_width)
            identity = {"spec": spec.to_dict(), "model_fingerprint": model_fingerprint(model), "prompts": lines,
                        "negative": negative, "omega_range": [omega_min, omega_max], "trajectories": trajectories,
                        "steps": steps, "sampler": sampler_name, "scheduler": scheduler, "width": width,
                        "height": height, **recording}
            adapters, trainer, memory = _train(model, spec, settings, store, conditioning, checkpoint_path, identity,
                                               resume, progress, gradient_checkpointing)
        finally:
            store.close()
        info = {"architecture": model_architecture(model), "model_fingerprint": identity["model_fingerprint"],
                "latent_shape": list(sample_shape),
                "omega_range": [omega_min, omega_max], "prompts": len(lines), "negative": negative,
                "trajectories": trajectories, "trajectory_steps": steps, "trajectory_examples": len(store),
                "trajectory_bytes": trajectory_bytes(len(store), sample_shape), "sampler": sampler_name,
                "scheduler": scheduler, "width": width, "height": height,
                **recording,
                "train_steps": train_steps, "batch": batch,
                **({"gradient_checkpointing": True} if gradient_checkpointing and is_dit(points) else {}),
                "learning_rate": learning_rate, "seed": seed, "final_loss": trainer.final_loss(),
                "loss_every_50": [sum(trainer.losses[i:i + 50]) / len(trainer.losses[i:i + 50])
                                  for i in range(0, len(trainer.losses), 50)],
                "collect_seconds": collected, "seconds": time.perf_counter() - began, **memory,
                "base_parameters": sum(p.numel() for p in model.model.diffusion_model.parameters())}
        save_adapters(adapters, path, info, overwrite=overwrite)
        page_messages.file_written(model_folders.ADAPTERS, path)
        if os.path.exists(checkpoint_path):
            os.remove(checkpoint_path)
        share = adapters.count_parameters() / info["base_parameters"]
        report = (f"Guidance adapters saved to {path}\n{adapters.count_parameters():,} parameters ({100 * share:.2f}% of "
                  f"the model), {len(points)} attach points, {kind}\n{len(store)} trajectory steps "
                  f"({format_bytes(info['trajectory_bytes'])}) recorded in {collected:.0f} s; {train_steps} training "
                  f"steps; final loss {info['final_loss']:.5f} (first {trainer.losses[0]:.5f}); total "
                  f"{info['seconds']:.0f} s; {memory['memory_note']}")
        log.info("FastGuidance: %s", report.replace("\n", "; "))
        return io.NodeOutput(curve_image(trainer.losses, "distillation loss (MSE to CFG)", "Guidance adapter training",
                                         f"final {info['final_loss']:.4f}", x_label="step"), report)


def _omega_order(omega_min: float, omega_max: float) -> None:
    if omega_min > omega_max:
        raise InvalidInputError("omega_min", omega_min, f"use a value no larger than omega_max ({omega_max})")


def _adapter_width_fits(adapter_width: int, kind: str) -> None:
    if kind == "cross_attention" and adapter_width % 4:
        raise InvalidInputError("adapter_width", adapter_width, "use a multiple of 4 (the adapters' heads)")


def _segment_order(start_at_step: int, end_at_step: int, steps: int) -> None:
    if start_at_step >= min(end_at_step, steps):
        raise InvalidInputError("start_at_step", start_at_step, f"record at least one step: use a value below "
                                                                f"end_at_step ({end_at_step}) and steps ({steps})")


_LOAD_CHECKS = (FileInput("adapter", model_folders.ADAPTERS, "train adapters with Train Guidance Adapter", load_adapters),)
_TRAIN_CHECKS = (FILE_NAME, CrossRule(prompt_lines, ("prompts",)), CrossRule(_omega_order, ("omega_min", "omega_max")),
                 CrossRule(_adapter_width_fits, ("adapter_width", "kind")),
                 CrossRule(_segment_order, ("start_at_step", "end_at_step", "steps")))


def _show(node_id: str | None, text: str) -> None:
    """Text on the node while it runs (and in the log)."""
    log.info("FastGuidance: %s", text)
    try:
        from server import PromptServer

        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass


def _record_trajectories(model, clip, lines: list[str], negative: str, omega_range: tuple[float, float],
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


def _train(model, spec: AdapterSpec, settings: TrainingSettings, store: TrajectoryStore, conditioning: list[dict],
           checkpoint_path: str, identity: dict, resume: bool, progress,
           gradient_checkpointing: bool = False) -> tuple[GuidanceAdapters, DistillationTrainer, dict]:
    """Distil the stored trajectories into new adapters; checkpoints on interruption and every tenth of the run.

    ``gradient_checkpointing``: DiT blocks recompute their activations in the backward pass
    (:func:`~fastguidance.guidance_adapters.training.recomputed_in_backward` through ``CHECKPOINT_KEY``); UNets ignore it."""
    # the whole model on the device and everything else (text encoder, VAE) off it, as the host's own trainer does
    comfy.model_management.load_models_gpu([model], memory_required=1e20, force_full_load=True)
    device = model.load_device
    with torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(settings.seed)
        adapters = GuidanceAdapters(spec).to(device)
        # fp16 models: the loss is scaled so that gradients flowing back through fp16 activations do not underflow
        half = base_dtype(model) == torch.float16 and device.type == "cuda"
        trainer = DistillationTrainer(adapters, settings, scaler=torch.amp.GradScaler("cuda") if half else None)
        if resume and os.path.exists(checkpoint_path):
            trainer.resume(checkpoint_path, identity)
            log.info("FastGuidance [agd]: resumed %s at step %d of %d", checkpoint_path, trainer.step, settings.steps)
            progress.update(trainer.step)
        patched = attach(model, None)
        base_options = patched.model_options["transformer_options"]
        if gradient_checkpointing and is_dit(spec.attach_points):
            base_options = {**base_options, CHECKPOINT_KEY: block_checkpointing()}
        elif gradient_checkpointing:
            log.info("FastGuidance [agd]: gradient_checkpointing applies to DiT blocks; this UNet trains without it")
        base_model = patched.model

        def predict(x, sigma, omega, prompt):
            comfy.model_management.throw_exception_if_processing_interrupted()
            outputs = torch.empty_like(x, device=device)
            groups: dict[tuple, list[int]] = {}
            for row, index in enumerate(prompt.tolist()):
                groups.setdefault(tuple(conditioning[index]["c_crossattn"].shape), []).append(row)
            for rows in groups.values():  # prompts of one token length run as one batch
                chosen = [conditioning[i] for i in prompt[rows].tolist()]
                x_rows, sigma_rows = x[rows].to(device), sigma[rows].to(device)
                c_crossattn = torch.cat([c["c_crossattn"] for c in chosen]).to(device)
                kwargs = {key: (torch.cat([c["kwargs"][key] for c in chosen]).to(device)
                                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 1 else value)
                          for key, value in chosen[0]["kwargs"].items()}
                c_concat = chosen[0]["c_concat"]
                if torch.is_tensor(c_concat):
                    c_concat = torch.cat([c["c_concat"] for c in chosen]).to(device)
                bound = bind_adapters(adapters, omega[rows], sigma_rows, c_crossattn, kwargs, None)
                options = {**base_options, BOUND_KEY: bound, "cond_or_uncond": [0], "sigmas": sigma_rows,
                           "optimized_attention_override": differentiable_attention}
                denoised = base_model.apply_model(x_rows, sigma_rows, c_concat=c_concat, c_crossattn=c_crossattn,
                                                  transformer_options=options, **kwargs)
                outputs[rows] = noise_of(x_rows, denoised, sigma_rows).float()
            return outputs

        def checkpoint(current: DistillationTrainer) -> None:
            current.save(checkpoint_path, identity)

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        in_place_safe = saved_activations_copied() if is_dit(spec.attach_points) else contextlib.nullcontext()
        with trainable_weights(base_model.diffusion_model) as copied, in_place_safe, host_training_mode():
            try:
                train_on_store(trainer, store, predict, progress=lambda step, total, loss: progress.update(1),
                               checkpoint=checkpoint, checkpoint_every=max(50, settings.steps // 10))
            except comfy.model_management.InterruptProcessingException:
                checkpoint(trainer)
                log.info("FastGuidance [agd]: interrupted at step %d; checkpoint kept in %s (run again with resume on)",
                         trainer.step, checkpoint_path)
                raise
            except torch.cuda.OutOfMemoryError:
                checkpoint(trainer)
                raise InvalidInputError("batch", settings.batch, f"training ran out of GPU memory at step {trainer.step}: "
                                        "lower batch (or width and height; DiTs: turn on gradient_checkpointing), then run again "
                                        "with resume on "
                                        f"(checkpoint kept in {checkpoint_path})") from None
    adapters.cpu().eval().requires_grad_(False)
    memory = {"weights_copied_bytes": copied}
    if device.type == "cuda":
        memory["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        memory["memory_note"] = f"peak GPU memory {format_bytes(memory['peak_gpu_bytes'])}"
    else:
        memory["peak_process_bytes"] = _peak_process_bytes()
        memory["memory_note"] = f"peak process memory {format_bytes(memory['peak_process_bytes'])}"
    return adapters, trainer, memory


def base_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its manual-cast dtype where weights are stored in another)."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()


def _peak_process_bytes() -> int:
    """Peak resident memory of the process (Unix: ru_maxrss; elsewhere the current size, via psutil)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().rss
