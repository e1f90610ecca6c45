"""AGD training: the node that records CFG trajectories of the user's model (``adapter_recording.py``) and
distils them into guidance adapters through the frozen model, with checkpoints to resume from."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Iterator

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..fastguidance.errors import InvalidInputError
from ..fastguidance.guidance import noise_of
from ..fastguidance.guidance_adapters.adapters import ADAPTER_KINDS, AdapterSpec, GuidanceAdapters, save_adapters
from ..fastguidance.guidance_adapters.training import (DistillationTrainer, TrainingSettings, TrajectoryStore,
                                                       format_bytes, require_room_for_trajectories, train_on_store,
                                                       trajectory_bytes)
from . import model_folders, page_messages
from .adapter_patch import (BOUND_KEY, CHECKPOINT_KEY, attach, attach_points, base_dtype, bind_adapters,
                            block_checkpointing, differentiable_attention, has_adapters, host_training_mode, is_dit,
                            saved_activations_copied, trainable_weights)
from .adapter_recording import latent_sample_shape, record_trajectories, recording_identity, require_same_family
from .model_identity import model_architecture, model_fingerprint
from .trainers import curve_image, prompt_lines
from .validation import FILE_NAME, CrossRule, ValidatedNode

log = logging.getLogger("fastguidance")

CHECKPOINT_SUFFIX = ".checkpoint"  # not .safetensors: checkpoints never show up in the loader's list
#: defaults of the trainer's inputs added after it first shipped; start 0 and end 10000 record every step, as
#: the node did before them, frames only concern video models, which it did not support then, and training
#: without gradient checkpointing is what it always did
RECORDING_DEFAULTS = {"frames": 33, "start_at_step": 0, "end_at_step": 10000, "gradient_checkpointing": False}


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


_TRAIN_CHECKS = (FILE_NAME, CrossRule(prompt_lines, ("prompts",)), CrossRule(_omega_order, ("omega_min", "omega_max")),
                 CrossRule(_adapter_width_fits, ("adapter_width", "kind")),
                 CrossRule(_segment_order, ("start_at_step", "end_at_step", "steps")))


class TrainGuidanceAdapterNode(ValidatedNode):
    CHECKS = _TRAIN_CHECKS

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
    def execute(cls, model, clip, prompts: str, negative: str, omega_min: float, omega_max: float, trajectories: int,
                steps: int, sampler_name: str, scheduler: str, width: int, height: int, train_steps: int, batch: int,
                learning_rate: float, kind: str, adapter_width: int, seed: int, filename: str, overwrite: bool,
                resume: bool, frames: int = RECORDING_DEFAULTS["frames"],
                start_at_step: int = RECORDING_DEFAULTS["start_at_step"],
                end_at_step: int = RECORDING_DEFAULTS["end_at_step"], earlier_model=None,
                gradient_checkpointing: bool = RECORDING_DEFAULTS["gradient_checkpointing"]) -> io.NodeOutput:
        began = time.perf_counter()
        if has_adapters(model):
            raise InvalidInputError("model", "has guidance adapters", "connect the model without Load Guidance Adapter")
        require_loadable_again(model)
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

        conditioning, store = record_trajectories(model, clip, lines, negative, (omega_min, omega_max), trajectories,
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
            adapters, trainer, memory = train_adapters(model, spec, settings, store, conditioning, checkpoint_path,
                                                       identity, resume, progress, gradient_checkpointing)
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


def _show(node_id: str | None, text: str) -> None:
    """Text on the node while it runs (and in the log)."""
    log.info("FastGuidance: %s", text)
    try:
        from server import PromptServer

        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass


def train_adapters(model, spec: AdapterSpec, settings: TrainingSettings, store: TrajectoryStore,
                   conditioning: list[dict], checkpoint_path: str, identity: dict, resume: bool, progress,
                   gradient_checkpointing: bool = False) -> tuple[GuidanceAdapters, DistillationTrainer, dict]:
    """Distil the stored trajectories into new adapters; checkpoints on interruption and every tenth of the run.

    ``gradient_checkpointing``: DiT blocks recompute their activations in the backward pass
    (:func:`~fastguidance.guidance_adapters.training.recomputed_in_backward` through ``CHECKPOINT_KEY``); UNets ignore it."""
    with patcher_to_train_through(model) as (base, reloaded), torch.inference_mode(False), torch.enable_grad():
        device = base.load_device
        torch.manual_seed(settings.seed)
        adapters = GuidanceAdapters(spec).to(device)
        # fp16 models: the loss is scaled so that gradients flowing back through fp16 activations do not underflow
        half = base_dtype(base) == torch.float16 and device.type == "cuda"
        trainer = DistillationTrainer(adapters, settings, scaler=torch.amp.GradScaler("cuda") if half else None)
        if resume and os.path.exists(checkpoint_path):
            trainer.resume(checkpoint_path, identity)
            log.info("FastGuidance [agd]: resumed %s at step %d of %d", checkpoint_path, trainer.step, settings.steps)
            progress.update(trainer.step)
        patched = attach(base, None)
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
    memory = {"weights_copied_bytes": copied, **({"model_reloaded_bytes": reloaded} if reloaded else {})}
    if device.type == "cuda":
        memory["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        memory["memory_note"] = f"peak GPU memory {format_bytes(memory['peak_gpu_bytes'])}"
    else:
        memory["peak_process_bytes"] = _peak_process_bytes()
        memory["memory_note"] = f"peak process memory {format_bytes(memory['peak_process_bytes'])}"
    if reloaded:
        memory["memory_note"] += f"; the model loaded again for training (dynamic VRAM): {format_bytes(reloaded)}"
    return adapters, trainer, memory


@contextlib.contextmanager
def patcher_to_train_through(model) -> Iterator[tuple[Any, int]]:
    """The ModelPatcher whose model the adapters are trained through, loaded whole on its device with everything
    else (text encoder, VAE) off it, as the host's trainers do; and the bytes of the model loaded again for
    it (0: none).

    - A plain ``ModelPatcher`` (0.3.64; 0.33 on a CPU, or started with ``--disable-dynamic-vram``): the
      user's own, as 0.3.64's trainer (``comfy_extras/nodes_train.py``: ``model.clone()``) trains through it.
      Its weights are resident once loaded and the training changes none of them (:func:`trainable_weights`
      copies those made under inference mode for the duration and puts them back).
    - A ``ModelPatcherDynamic`` (0.33 on NVIDIA GPUs; ``comfy/model_patcher.py``): its ``load`` streams the
      weights (``comfy/ops.py``, ``cast_modules_with_vbar``: each layer's weight is a view of VRAM that
      ``uncast_bias_weight`` hands back to the allocator, ``vbar_unpin``, once the layer's forward is done),
      so a weight autograd keeps for the backward pass may be evicted and overwritten before it runs; and
      the views made while recording (under inference mode) are inference tensors, which autograd refuses
      to keep. The host's own trainer does not train through the user's patcher either: it trains on
      ``model.clone(force_deepcopy=True)``, the model loaded again from its file (``cached_patcher_init``)
      under ``torch.inference_mode(False)``. Here the copy is ``model.clone(disable_dynamic=True)``, the
      host's ``get_non_dynamic_delegate`` without keeping it: loaded again the same way, and a plain
      ModelPatcher, so that ``force_full_load`` keeps every weight resident until the backward pass (the
      host's ``force_deepcopy`` clone keeps the dynamic class: ``clone`` swaps in ``ModelPatcher`` only with
      ``disable_dynamic``). It costs the model's size in RAM a second time, and VRAM for the whole model
      while training; it is unloaded and dropped when training ends, also on interruption.
    """
    if not streams_weights(model):
        comfy.model_management.load_models_gpu([model], memory_required=1e20, force_full_load=True)
        yield model, 0
        return
    require_loadable_again(model)
    with torch.inference_mode(False):  # the copy's weights are made trainable as they are, as the host's trainer's
        copy = model.clone(disable_dynamic=True)
        comfy.model_management.load_models_gpu([copy], memory_required=1e20, force_full_load=True)
    try:
        yield copy, copy.model_size()
    finally:
        loaded = comfy.model_management.current_loaded_models
        comfy.model_management.free_memory(1e30, copy.load_device, keep_loaded=[entry for entry in loaded
                                                                               if entry.model is not copy])


def _peak_process_bytes() -> int:
    """Peak resident memory of the process (Unix: ru_maxrss; elsewhere the current size, via psutil)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().rss

def streams_weights(model) -> bool:
    """Whether ``model`` is a ``ModelPatcherDynamic`` (0.33 on NVIDIA GPUs), whose weights are streamed."""
    return hasattr(model, "is_dynamic") and model.is_dynamic()


def require_loadable_again(model) -> None:
    """A model that streams its weights is trained through a copy loaded again from its file
    (:func:`patcher_to_train_through`): refused, before any work, where the host cannot do that."""
    if streams_weights(model) and getattr(model, "cached_patcher_init", None) is None:
        raise InvalidInputError("model", model_architecture(model),
                                "it streams its weights (dynamic VRAM) and came from a loader ComfyUI cannot load "
                                "again, so training cannot load a copy that keeps them: load it with ComfyUI's own "
                                "loader (Load Checkpoint, Load Diffusion Model), or start ComfyUI with "
                                "--disable-dynamic-vram")
