"""LinearAG nodes: calibrate the regression on the user's model and schedule, then use it as a MODEL patch."""

from __future__ import annotations

import logging
import math
import os
import time

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..fastguidance.errors import FastGuidanceError, InvalidInputError
from ..fastguidance.linear_ag import (MAX_WINDOW, POLICY_MODES, LinearAG, LinearAGCalibration, LinearAGCoefficients,
                                      validate_linear_ag, validate_linear_ag_calibration)
from . import model_folders, page_messages
from .engine_patch import install_policy
from .validation import FILE_NAME, CrossRule, FileInput, ValidatedNode
from .model_identity import model_architecture, model_fingerprint

log = logging.getLogger("fastguidance")

_DEFAULT_POLICY = ("alternate", 1, 0.3)


def calibration_report(coefficients: LinearAGCoefficients, path: str, seconds: float) -> str:
    """The calibrate node's text output: what was fitted and how well, per step."""
    info = coefficients.info
    lines = [f"LinearAG calibration saved to {path}",
             f"made for {coefficients.made_for()}, cfg {info.get('cfg')}",
             f"{info['paths']} paths ({info['held_out_paths']} held out), window {info['window']}, "
             f"regularization {info['regularization']}, {seconds:.1f} s",
             "held-out error per model call (‖ĝ−g‖/‖g‖: 0 exact, 1 = as wrong as dropping guidance):"]
    for call, (step, error) in enumerate(coefficients.error_by_step()):
        lines.append(f"  call {call:3d} step {step:3d}: " + ("n/a" if math.isnan(error) else f"{error:.3f}"))
    return "\n".join(lines)


_CALIBRATE_CHECKS = (FILE_NAME, CrossRule(validate_linear_ag_calibration, ("window", "regularization")))
_POLICY_CHECKS = (FileInput("coefficients", model_folders.LINEAR_AG, "make one with LinearAG Calibrate",
                            LinearAGCoefficients.load),
                  CrossRule(validate_linear_ag, ("mode", "after_step", "error_bound")))


class LinearAGCalibrateNode(ValidatedNode):
    CHECKS = _CALIBRATE_CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_LinearAGCalibrate",
            display_name="LinearAG Calibrate (FastGuidance)",
            category="sampling/fastguidance",
            description="Runs full CFG sampling on your model and fits LinearAG's regression (Castillo et al. 2023): "
                        "per step, how to predict the negative-prompt result from the path so far. Saves the "
                        "coefficients to models/fastguidance_linear_ag/ for the LinearAG node. Use the sampler, "
                        "scheduler, steps and cfg you will generate with. Costs runs × one CFG sampling.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate (the one you will use LinearAG with)."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning, like your generations' (a typical prompt)."),
                io.Conditioning.Input("negative", tooltip="Negative (or empty) prompt conditioning, as you will use it."),
                io.Latent.Input("latent_image", tooltip="Size and batch of each calibration run; every image of "
                                                        "the batch is one calibration path."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of the first run; run n uses seed + n."),
                io.Int.Input("runs", default=8, min=1, max=1000,
                             tooltip="Sampling runs to record. Paths = runs × batch size; a few dozen paths are "
                                     "enough for the small regression (every 4th path is held out to measure it)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler you will use LinearAG with: coefficients are per model call."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The scheduler you will use LinearAG with."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="The step count you will use LinearAG with."),
                io.Float.Input("cfg", default=7.0, min=1.01, max=100.0, step=0.1, round=0.01,
                               tooltip="The CFG scale you will use (above 1: at 1 the negative prompt is not evaluated, so there is nothing to learn)."),
                io.Int.Input("window", default=2, min=1, max=MAX_WINDOW,
                             tooltip="How many past model calls the regression reads (their prompt and negative "
                                     "predictions). 2 is a good start; more fits better but needs more paths."),
                io.Float.Input("regularization", default=0.001, min=1e-8, max=10.0, step=0.0001, round=1e-8,
                               tooltip="Ridge weight of the fit. Small (0.001) fits closely; larger pulls the "
                                       "estimate towards 'no guidance' on that step."),
                io.String.Input("filename", default="linear_ag",
                                tooltip="Name of the file in models/fastguidance_linear_ag/ (.safetensors is added)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name. Off: an existing file is never replaced."),
            ],
            outputs=[io.String.Output("report", display_name="report", tooltip="Where the file went and the held-out error of every step.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed: int, runs: int, sampler_name: str,
                scheduler: str, steps: int, cfg: float, window: int, regularization: float, filename: str,
                overwrite: bool) -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        validate_linear_ag_calibration(window, regularization, runs * latent.shape[0])
        path = model_folders.new_file(model_folders.LINEAR_AG, filename, overwrite)
        calibration = LinearAGCalibration(window)
        recording = install_policy(model, calibration.policy(), None)
        progress = comfy.utils.ProgressBar(runs * steps, node_id=cls.hidden.unique_id)
        began = time.perf_counter()
        for run in range(runs):
            comfy.model_management.throw_exception_if_processing_interrupted()
            noise = comfy.sample.prepare_noise(latent, seed + run)
            comfy.sample.sample(recording, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                callback=lambda *_: progress.update(1), disable_pbar=True, seed=seed + run)
        info = {"name": os.path.basename(path), "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg,
                "architecture": model_architecture(model), "model_fingerprint": model_fingerprint(model),
                "latent_shape": list(latent.shape[1:]), "seconds": time.perf_counter() - began}
        try:
            coefficients = calibration.fit(regularization, info)
        except FastGuidanceError as error:
            raise InvalidInputError("runs", runs, f"{error}") from None
        coefficients.save(path, overwrite=overwrite)
        page_messages.file_written(model_folders.LINEAR_AG, path)
        report = calibration_report(coefficients, path, info["seconds"])
        log.info("FastGuidance: %s", report.splitlines()[0])
        return io.NodeOutput(report)


class LinearAGNode(ValidatedNode):
    CHECKS = _POLICY_CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_LinearAG",
            display_name="LinearAG (FastGuidance)",
            category="sampling/fastguidance",
            description="Makes CFG cheaper with any sampler node: on the chosen steps the negative-prompt evaluation "
                        "is replaced by a linear estimate from the path so far (LinearAG, Castillo et al. 2023). "
                        "Needs a calibration file made by 'LinearAG Calibrate' for this model, sampler, scheduler "
                        "and step count.",
            inputs=[
                io.Model.Input("model", tooltip="The model to make cheaper. Connect the output to your sampler."),
                io.Combo.Input("coefficients", options=model_folders.files(model_folders.LINEAR_AG),
                               tooltip="A calibration from models/fastguidance_linear_ag/ (made by LinearAG Calibrate)."),
                io.Combo.Input("mode", options=list(POLICY_MODES), default=_DEFAULT_POLICY[0],
                               tooltip="Which steps are estimated: alternate = every other step (the paper's "
                                       "policy, about 25% fewer evaluations); after_step = every step from "
                                       "after_step on; error_bound = steps whose calibration error is at most "
                                       "error_bound."),
                io.Int.Input("after_step", default=_DEFAULT_POLICY[1], min=1, max=10000,
                             tooltip="For after_step: the first estimated step (0-based; step 0 is always "
                                     "evaluated in full). Lower = faster, less faithful."),
                io.Float.Input("error_bound", default=_DEFAULT_POLICY[2], min=0.0, max=10.0, step=0.01,
                               tooltip="For error_bound: estimate a step only where the calibration's held-out "
                                       "relative error is at most this (0 = never, 1 = also where the estimate "
                                       "is as wrong as no guidance)."),
                io.Boolean.Input("interpolate_sigmas", default=False,
                                 tooltip="Allow a file calibrated for another schedule or step count, picking "
                                         "coefficients by noise level. Off: such a file is refused."),
            ],
            outputs=[io.Model.Output(tooltip="The same model, with the negative-prompt prediction estimated on the chosen steps.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, coefficients: str, mode: str, after_step: int, error_bound: float,
                interpolate_sigmas: bool) -> io.NodeOutput:
        path = model_folders.existing_file(model_folders.LINEAR_AG, coefficients, "coefficients",
                                           "make one with LinearAG Calibrate")
        table = LinearAGCoefficients.load(path)
        made_for = table.info.get("model_fingerprint")
        if made_for and made_for != model_fingerprint(model):
            log.warning("FastGuidance: %s was calibrated on another model (%s, fingerprint %s); the estimates may be "
                        "poor. Calibrate on this model for best results.", coefficients,
                        table.info.get("architecture", "?"), made_for)
        policy = LinearAG(table, mode=mode, after_step=after_step, error_bound=error_bound,
                          interpolate_sigmas=interpolate_sigmas)
        return io.NodeOutput(install_policy(model, policy, cls.hidden.unique_id))
