"""AdaDiff nodes: predict the step count from the prompt, and train the predictor on the user's model."""

from __future__ import annotations

import logging
import os
import time

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..fastguidance.errors import InvalidInputError
from ..fastguidance.metrics import ssim
from ..fastguidance.step_predictor import (StepPredictor, conditioning_features, latent_fidelity, load_step_predictor,
                                           parse_step_options, save_step_predictor, train_step_policy)
from . import model_folders, page_messages
from .trainers import curve_image, prompt_lines
from .validation import FILE_NAME, CrossRule, FileInput, ValidatedNode
from .model_identity import model_architecture, model_fingerprint, require_same_model

log = logging.getLogger("fastguidance")


def features_of(conditioning: list) -> torch.Tensor:
    """AdaDiff features of every prompt row of a CONDITIONING (token mean + pooled_output where present)."""
    rows = []
    for tokens, extras in conditioning:
        pooled = extras.get("pooled_output") if isinstance(extras, dict) else None
        if pooled is not None and pooled.shape[0] != tokens.shape[0]:
            pooled = pooled.expand(tokens.shape[0], -1) if pooled.shape[0] == 1 else None
        rows.append(conditioning_features(tokens, pooled))
    if not rows:
        raise InvalidInputError("positive", "empty", "connect a prompt's CONDITIONING (e.g. from CLIP Text Encode)")
    widths = {row.shape[1] for row in rows}
    if len(widths) != 1:
        raise InvalidInputError("positive", sorted(widths), "combine conditionings of one model family only")
    return torch.cat(rows)


_LOAD_CHECKS = (FileInput("predictor", model_folders.STEP_PREDICTORS, "train one with Train Step Predictor",
                          load_step_predictor),)
_TRAIN_CHECKS = (FILE_NAME, CrossRule(parse_step_options, ("step_options",)), CrossRule(prompt_lines, ("prompts",)))


class StepPredictorNode(ValidatedNode):
    CHECKS = _LOAD_CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_StepPredictor",
            display_name="Step Predictor (FastGuidance)",
            category="sampling/fastguidance",
            description="Chooses how many sampling steps this prompt needs (AdaDiff, Zhang et al. 2023): simple "
                        "prompts get fewer steps, complex ones more. Connect 'steps' to KSampler's steps (convert "
                        "the widget to an input) or 'sigmas' to SamplerCustomAdvanced. Needs a predictor trained "
                        "for this model by 'Train Step Predictor'.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt conditioning the steps are chosen for."),
                io.Combo.Input("predictor", options=model_folders.files(model_folders.STEP_PREDICTORS),
                               tooltip="A predictor from models/fastguidance_step_predictors/ (made by Train "
                                       "Step Predictor for this model)."),
                io.Model.Input("model", tooltip="The model you sample with: needed for the sigmas output and to "
                                                "warn when the predictor was trained on another model."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                               tooltip="Scheduler of the sigmas output (use your sampler's)."),
                io.Boolean.Input("allow_other_model", default=False, optional=True,
                                 tooltip="Use a predictor trained on another model of the same family (with a "
                                         "warning). Off: such a predictor is refused."),
            ],
            outputs=[
                io.Int.Output("steps", display_name="steps",
                              tooltip="The chosen step count. With several prompts in the conditioning: the "
                                      "largest of their choices, so that no prompt gets fewer than it needs."),
                io.Sigmas.Output("sigmas", display_name="sigmas", tooltip="The schedule for that step count."),
            ],
        )

    @classmethod
    def execute(cls, positive, predictor: str, model, scheduler: str, allow_other_model: bool = False) -> io.NodeOutput:
        path = model_folders.existing_file(model_folders.STEP_PREDICTORS, predictor, "predictor",
                                           "train one with Train Step Predictor")
        network, metadata = load_step_predictor(path)
        require_same_model(model, metadata, "predictor", predictor, f"model ({metadata.get('architecture', '?')}, ",
                           "train one for this model with Train Step Predictor", allow_other_model,
                           "its step choices may not fit this one")
        choices = network.choose(features_of(positive))
        steps = max(choices)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        text = f"{steps} steps" + (f" (largest of {choices})" if len(choices) > 1 else "")
        log.info("FastGuidance [adadiff]: %s", text)
        return io.NodeOutput(steps, sigmas, ui={"text": [text]})


class TrainStepPredictorNode(ValidatedNode):
    CHECKS = _TRAIN_CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_TrainStepPredictor",
            display_name="Train Step Predictor (FastGuidance)",
            category="sampling/fastguidance",
            description="Trains AdaDiff's step predictor on your model (policy gradient): for your prompts it tries "
                        "the step options, scores each image against the max-steps image of the same seed "
                        "(SSIM, on decoded images when a VAE is connected, else on latents) and learns which "
                        "count each kind of prompt needs. Saves models/fastguidance_step_predictors/<filename>. "
                        "Costs one max-steps sampling per prompt plus iterations × batch samplings.",
            inputs=[
                io.Model.Input("model", tooltip="The model the predictor is for."),
                io.Clip.Input("clip", tooltip="The text encoder of that model."),
                io.String.Input("prompts", multiline=True,
                                default="a cat\na red car parked on a street at night, rain, neon reflections\n"
                                        "a portrait of an old fisherman, detailed wrinkles, soft window light",
                                tooltip="Training prompts, one per line: a few dozen of the kinds you use."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt used for every sample."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m",
                               tooltip="The sampler you will use."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                               tooltip="The scheduler you will use."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The CFG scale you will use."),
                io.String.Input("step_options", default="10, 20, 30, 40, 50",
                                tooltip="The step counts to choose from, comma-separated (the paper's: 10, 20, "
                                        "30, 40, 50). The largest is the quality reference."),
                io.Float.Input("cost_weight", default=0.3, min=0.0, max=10.0, step=0.01,
                               tooltip="λ: how much a step costs against quality (reward = SSIM − λ·steps/max). "
                                       "0 = quality only (always the most steps); larger = fewer steps."),
                io.Int.Input("iterations", default=60, min=1, max=10000,
                             tooltip="Policy-gradient updates. Each samples 'batch' prompts once."),
                io.Int.Input("batch", default=8, min=1, max=256, tooltip="Prompts sampled per update."),
                io.Int.Input("width", default=512, min=96, max=4096, step=8,
                             tooltip="Image width of the samples (at least 96: SSIM needs 11×11 latents)."),
                io.Int.Input("height", default=512, min=96, max=4096, step=8,
                             tooltip="Image height of the samples (at least 96)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the noise of each prompt and the policy's exploration."),
                io.String.Input("filename", default="step_predictor",
                                tooltip="File name in models/fastguidance_step_predictors/ (.safetensors added)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name. Off: an existing file is never replaced."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: score decoded images (closer to what you see) instead of latents."),
            ],
            outputs=[io.Image.Output("reward_curve", display_name="reward_curve",
                                     tooltip="Mean reward per iteration (it should rise)."),
                     io.String.Output("report", display_name="report",
                                      tooltip="Where the file went and the steps it chooses for the training prompts.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, prompts: str, negative: str, sampler_name: str, scheduler: str, cfg: float,
                step_options: str, cost_weight: float, iterations: int, batch: int, width: int, height: int,
                seed: int, filename: str, overwrite: bool, vae=None) -> io.NodeOutput:
        options = parse_step_options(step_options)
        lines = prompt_lines(prompts)
        path = model_folders.new_file(model_folders.STEP_PREDICTORS, filename, overwrite)
        name = os.path.basename(path)
        began = time.perf_counter()
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(line)) for line in lines]
        negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
        features = torch.cat([features_of(cond) for cond in conds])
        latent_channels = model.get_model_object("latent_format").latent_channels
        empty = torch.zeros(1, latent_channels, height // 8, width // 8)
        progress = comfy.utils.ProgressBar(len(lines) + iterations * batch, node_id=cls.hidden.unique_id)

        def render(index: int, steps: int) -> torch.Tensor:
            comfy.model_management.throw_exception_if_processing_interrupted()
            # sampling never needs gradients, also while the predictor trains with them enabled
            with torch.inference_mode():
                noise = comfy.sample.prepare_noise(empty, seed + index)
                latent = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, conds[index],
                                             negative_cond, empty, disable_pbar=True, seed=seed + index)
                images = latent.float() if vae is None else vae.decode(latent).movedim(-1, 1).float()[:, :3]
            progress.update(1)
            return images

        references = [render(index, max(options)) for index in range(len(lines))]

        def quality_of(rows: torch.Tensor, steps: list[int]) -> torch.Tensor:
            scores: list[float] = []
            for row, chosen in zip(rows.tolist(), steps):
                candidate = references[row] if chosen == max(options) else render(row, chosen)
                if vae is None:
                    scores.append(float(latent_fidelity(candidate, references[row])[0]))
                else:
                    scores.append(float(ssim(candidate.clamp(0, 1), references[row].clamp(0, 1))[0]))
            return torch.tensor(scores)

        with torch.inference_mode(False), torch.enable_grad():
            predictor = StepPredictor(features.shape[1], options)
            training = train_step_policy(predictor, features.clone(), quality_of, iterations, batch=batch,
                                         cost_weight=cost_weight, seed=seed)
        predictor.eval()
        chosen = predictor.choose(features.clone())
        info = {"name": name, "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg, "cost_weight": cost_weight,
                "iterations": iterations, "batch": batch, "prompts": len(lines), "width": width, "height": height,
                "quality": "SSIM of decoded images" if vae is not None else "SSIM of latents",
                "architecture": model_architecture(model), "model_fingerprint": model_fingerprint(model),
                "conditioning_width": features.shape[1], "reward_curve": training.reward,
                "steps_curve": training.steps, "seconds": time.perf_counter() - began}
        save_step_predictor(predictor, path, info, overwrite=overwrite)
        page_messages.file_written(model_folders.STEP_PREDICTORS, path)
        mean_steps = sum(chosen) / len(chosen)
        report = (f"Step predictor saved to {path}\noptions {list(options)}, λ {cost_weight}, {iterations} iterations, "
                  f"{info['seconds']:.0f} s\nchosen for the training prompts: mean {mean_steps:.1f} steps "
                  f"({100 * (1 - mean_steps / max(options)):.0f}% fewer than {max(options)})\n"
                  + "\n".join(f"  {steps:3d}  {line}" for steps, line in zip(chosen, lines)))
        log.info("FastGuidance: %s", report.splitlines()[0])
        return io.NodeOutput(curve_image(training.reward, "mean reward (quality − λ·steps/max)", "Step predictor training",
                                          f"mean steps {training.steps[-1]:.1f}"), report)
