"""FastGuidance Tune and Load FastGuidance Preset: search each method's cheapest setting on the user's
model (the core's :func:`fastguidance.tune.tune`), save it as a preset, and apply a saved preset.

The node samples through the host's public sampling (``comfy.sample.sample``, what KSampler runs) on
the model patched with :func:`install_policy`, so a trial gives exactly the picture the returned
MODEL gives in a KSampler with the same seed. Evaluations per image come from what the runs record:
the engine's run of each trial (received through ``engine_patch.RUN_OBSERVER_KEY``) and, for the
plain-CFG reference, a ``CALC_COND_BATCH`` wrapper that counts the conditionings evaluated.
"""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..fastguidance.engine import GuidanceRun
from ..fastguidance.errors import FastGuidanceError, InvalidInputError
from ..fastguidance.linear_ag import LinearAG, LinearAGCoefficients, ScheduleMismatchError
from ..fastguidance.charts import tradeoff_chart
from ..fastguidance.tune import (DEFAULT_TARGET, MAX_TARGET, MIN_TARGET, TuneResult, adaptive_guidance_method,
                                 bisection_trials, compress_guidance_method, linear_ag_method, load_preset,
                                 policy_from_settings, preset_mismatch, save_preset, tune)
from . import model_folders, page_messages
from .engine_patch import ENGINE_KEY, RUN_OBSERVER_KEY, install_policy
from .model_identity import model_architecture, model_fingerprint
from .validation import FILE_NAME, CrossRule, FileInput, check_inputs, validate

log = logging.getLogger("fastguidance")

#: the linear_ag_calibration choice that leaves LinearAG out of the search
NO_CALIBRATION = "none"
#: key of the plain-CFG reference's counting wrapper, and of Load Preset's schedule check
COUNT_KEY = "fastguidance_tune_count"
PRESET_CHECK_KEY = "fastguidance_preset"
MIN_STEPS, MAX_STEPS = 2, 10000
MAX_CFG = 100.0


class _RunRecorder:
    """Receives the finished engine runs of one trial (``RUN_OBSERVER_KEY``); shared, not copied, on clone."""

    def __init__(self) -> None:
        self.runs: list[GuidanceRun] = []

    def __deepcopy__(self, memo: dict) -> "_RunRecorder":
        return self

    def __call__(self, run: GuidanceRun) -> None:
        self.runs.append(run)


class _EvaluationCounter:
    """``CALC_COND_BATCH`` wrapper: model evaluations per image, one per conditioning evaluated per call
    (plain CFG: cond and uncond, 2 per model call; a ``None`` slot, as at cfg 1, costs nothing)."""

    def __init__(self) -> None:
        self.evaluations = 0

    def __deepcopy__(self, memo: dict) -> "_EvaluationCounter":
        return self

    def __call__(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        self.evaluations += sum(1 for cond in conds if cond is not None)
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)


class _ScheduleCheck:
    """``OUTER_SAMPLE`` wrapper of a loaded preset: refuses a run of another step count before it samples."""

    def __init__(self, preset: str, steps: int) -> None:
        self.preset, self.steps = preset, steps

    def __deepcopy__(self, memo: dict) -> "_ScheduleCheck":
        return self

    def __call__(self, executor, *args, **kwargs):
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        steps = len(sigmas) - 1
        if steps != self.steps:
            raise InvalidInputError("steps", steps, f"the preset {self.preset} was tuned for {self.steps} steps: set "
                                                    f"the sampler's steps to {self.steps}, tune again for {steps} steps, "
                                                    "or turn on allow_other_schedule in Load FastGuidance Preset")
        return executor(*args, **kwargs)


def _cfg_guides(cfg: float) -> None:
    if cfg == 1.0:
        raise InvalidInputError("cfg", cfg, "at cfg 1 the negative prompt is never evaluated, so there is nothing "
                                            "to make cheaper: use the CFG scale you generate with (e.g. 7)")


def _some_method(tune_ag: bool, tune_compg: bool, linear_ag_calibration: str) -> None:
    if not tune_ag and not tune_compg and linear_ag_calibration == NO_CALIBRATION:
        raise InvalidInputError("tune_ag", False, "turn on tune_ag or tune_compg, or pick a linear_ag_calibration: "
                                                  "there is no method to tune")


_TUNE_CHECKS = (FILE_NAME, CrossRule(_cfg_guides, ("cfg",)),
                FileInput("linear_ag_calibration", model_folders.LINEAR_AG, "made by LinearAG Calibrate",
                          LinearAGCoefficients.load, other_choices=(NO_CALIBRATION,)),
                CrossRule(_some_method, ("tune_ag", "tune_compg", "linear_ag_calibration")))


def _load_calibration(model, name: str, steps: int, sampler_name: str, scheduler: str) -> LinearAGCoefficients:
    """The LinearAG calibration the user picked, refused before any sampling when its schedule differs."""
    path = model_folders.existing_file(model_folders.LINEAR_AG, name, "linear_ag_calibration",
                                       "make one with LinearAG Calibrate")
    coefficients = LinearAGCoefficients.load(path)
    made_for = coefficients.info.get("model_fingerprint")
    if made_for and made_for != model_fingerprint(model):
        log.warning("FastGuidance: %s was calibrated on another model (fingerprint %s); its estimates may be poor "
                    "and LinearAG may not reach the target", name, made_for)
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas
    try:
        GuidanceRun((LinearAG(coefficients, mode="error_bound"),), sigmas, 1)  # its start() compares schedules
    except ScheduleMismatchError:
        raise InvalidInputError("linear_ag_calibration", name,
                                f"it was calibrated for {coefficients.made_for()}, not {steps} steps of {sampler_name} / "
                                f"{scheduler}: calibrate with these settings (LinearAG Calibrate), or choose none") from None
    return coefficients


def _fix_latent(model, latent: dict) -> torch.Tensor:
    """``latent["samples"]`` as KSampler prepares it (empty latents get the model's channel count)."""
    ratios = [latent.get("downscale_ratio_spacial"), latent.get("downscale_ratio_temporal")]
    if any(ratio is not None for ratio in ratios):  # only ComfyUI 0.33 sets (and takes) them
        return comfy.sample.fix_empty_latent_channels(model, latent["samples"], *ratios)
    return comfy.sample.fix_empty_latent_channels(model, latent["samples"])


class _Trials:
    """Samples the latent batch once per trial, exactly as KSampler would with the same seed."""

    def __init__(self, model, positive, negative, latent: dict, seed: int, sampler_name: str, scheduler: str,
                 steps: int, cfg: float, vae, progress: comfy.utils.ProgressBar):
        self.model, self.positive, self.negative, self.vae = model, positive, negative, vae
        self.seed, self.sampler_name, self.scheduler, self.steps, self.cfg = seed, sampler_name, scheduler, steps, cfg
        self.latent_image = _fix_latent(model, latent)
        self.batch_index = latent.get("batch_index")
        self.noise_mask = latent.get("noise_mask")
        self.progress = progress
        self.done = 0  # samplings finished

    def sample(self, policies) -> tuple[torch.Tensor, list[float]]:
        """One sampling with ``policies`` (none: plain CFG): what is compared, and evaluations per image."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        recorder, counter = _RunRecorder(), _EvaluationCounter()
        if policies:
            patched = self.model
            for policy in policies:
                patched = install_policy(patched, policy, None)
            patched.model_options["transformer_options"][RUN_OBSERVER_KEY] = recorder
        else:
            patched = self.model.clone()
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, COUNT_KEY, counter)
        noise = comfy.sample.prepare_noise(self.latent_image, self.seed, self.batch_index)
        samples = comfy.sample.sample(patched, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                      self.positive, self.negative, self.latent_image, denoise=1.0,
                                      noise_mask=self.noise_mask, callback=self._step, disable_pbar=True, seed=self.seed)
        batch = samples.shape[0]
        if policies:
            if not recorder.runs:
                raise FastGuidanceError("the guidance engine did not run during a tuning trial: a node that replaces "
                                        "the model's sampler_calc_cond_batch_function is on the model; connect Tune "
                                        "to the model before it")
            evaluations = [float(count) for count in recorder.runs[-1].evaluations_per_sample()]
        else:
            evaluations = [float(counter.evaluations)] * batch
        self.done += 1
        return self.compared(samples), evaluations

    def compared(self, samples: torch.Tensor) -> torch.Tensor:
        """What fidelity is measured on: decoded images ``[N, 3, H, W]`` in [0, 1] (video: every frame), or latents."""
        if self.vae is None:
            return samples
        images = self.vae.decode(samples)
        if images.dim() == 5:
            images = images.reshape(-1, *images.shape[-3:])
        return images[..., :3].movedim(-1, 1).float().clamp(0.0, 1.0)

    def _step(self, step: int, *_args) -> None:
        self.progress.update_absolute(self.done * self.steps + min(step + 1, self.steps))


def chart_image(result: TuneResult) -> torch.Tensor:
    """The trade-off chart of a search as an IMAGE ``[1, H, W, 3]``."""
    series = {method: [(trial.evaluations, trial.worst) for trial in result.trials if trial.method == method]
              for method in result.methods}
    chosen = {method: (trial.evaluations, trial.worst, f"{result.methods[method].setting} {trial.value:g}")
              for method, trial in result.best.items() if trial is not None}
    winner = result.winner
    title = "FastGuidance Tune: " + ("no method met the target" if winner is None else
                                     f"{winner.method} ({result.cfg_evaluations / winner.evaluations:.2f}x fewer evaluations)")
    image = tradeoff_chart(series, result.target, reference=(result.cfg_evaluations, 1.0), chosen=chosen, title=title)
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


class TuneNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_Tune",
            display_name="FastGuidance Tune",
            category="sampling/fastguidance",
            description="Finds, on your model, prompts and schedule, the most aggressive setting of each method "
                        "(Adaptive Guidance's threshold, Compress Guidance's guided steps, LinearAG's error bound) "
                        "that keeps every image within an SSIM target of the plain-CFG image of the same seed, "
                        "returns the model with the cheapest one installed and saves it as a preset for 'Load "
                        "FastGuidance Preset'. Costs one plain-CFG sampling plus about 5 to 6 samplings per method "
                        "(a bisection over its settings), each of the whole latent batch.",
            inputs=[
                io.Model.Input("model", tooltip="The model to tune, before any FastGuidance node (Tune compares "
                                                "against plain CFG and installs the method itself)."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning: one prompt, or a batch with one prompt "
                                                          "per image of the latent batch. Typical prompts of yours."),
                io.Conditioning.Input("negative", tooltip="Negative (or empty) prompt conditioning, as you generate."),
                io.Latent.Input("latent", tooltip="Size and batch of every trial: each image of the batch is compared "
                                                  "with its plain-CFG image, and the worst one decides."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of every trial (the same for all, as in a KSampler). Keep the "
                                     "control on fixed: another seed tunes again (turn on overwrite to replace "
                                     "the preset)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler you generate with: the setting found is for it."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The scheduler you generate with."),
                io.Int.Input("steps", default=20, min=MIN_STEPS, max=MAX_STEPS,
                             tooltip=f"The step count you generate with ({MIN_STEPS} to {MAX_STEPS}). A preset "
                                     "refuses other step counts unless allowed."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01,
                               tooltip="The CFG scale you generate with (not 1: at cfg 1 there is no negative-prompt "
                                       "evaluation to skip)."),
                io.Float.Input("target", default=DEFAULT_TARGET, min=MIN_TARGET, max=MAX_TARGET, step=0.005,
                               round=0.001,
                               tooltip=f"Fidelity target, {MIN_TARGET} to {MAX_TARGET}: the SSIM every image must keep "
                                       "to the plain-CFG image of the same seed. 0.95 (default): close to plain "
                                       "CFG; 0.98: nearly identical, smaller savings; 1.0: identical (plain CFG)."),
                io.Boolean.Input("tune_ag", default=True,
                                 tooltip="Search Adaptive Guidance's threshold (denoised cosine, convergence 0.5)."),
                io.Boolean.Input("tune_compg", default=True,
                                 tooltip="Search Compress Guidance's number of guided steps (skew 1, compress)."),
                io.String.Input("filename", default="preset",
                                tooltip="Name of the preset file in models/fastguidance_presets/ (.safetensors is "
                                        "added)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a preset of the same name. Off: an existing file is never replaced "
                                         "(checked before tuning)."),
                io.Combo.Input("linear_ag_calibration",
                               options=[NO_CALIBRATION] + model_folders.files(model_folders.LINEAR_AG),
                               default=NO_CALIBRATION, optional=True,
                               tooltip="Also search LinearAG's error bound with this calibration (made by LinearAG "
                                       "Calibrate for this sampler, scheduler and steps). none: LinearAG is not tuned."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: compare decoded images (what you see). Without it the latents are "
                                     "compared, which needs latents of at least 11×11."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the cheapest setting that met the target installed (unchanged "
                                        "when no method met it). Sample it with the same sampler, scheduler, steps "
                                        "and cfg."),
                io.String.Output("report", display_name="report",
                                 tooltip="Each method's setting found, its evaluations and worst SSIM, and the choice."),
                io.Image.Output("chart", display_name="chart",
                                tooltip="Model evaluations per image against worst SSIM for every trial, one colour "
                                        "per method, the target as a dashed line."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return validate(cls, values, *_TUNE_CHECKS)

    @classmethod
    def execute(cls, model, positive, negative, latent, seed: int, sampler_name: str, scheduler: str, steps: int,
                cfg: float, target: float, tune_ag: bool, tune_compg: bool, filename: str, overwrite: bool,
                linear_ag_calibration: str = NO_CALIBRATION, vae=None) -> io.NodeOutput:
        check_inputs(cls, locals(), *_TUNE_CHECKS)
        if model.model_options.get("transformer_options", {}).get(ENGINE_KEY) is not None:
            raise InvalidInputError("model", "a model with a FastGuidance patch",
                                    "connect the model before any FastGuidance node: Tune compares against plain CFG "
                                    "and installs the method it finds itself")
        path = model_folders.new_file(model_folders.PRESETS, filename, overwrite)
        height, width = latent["samples"].shape[-2:]
        if vae is None and min(height, width) < 11:
            raise InvalidInputError("latent", f"{height}×{width} latent", "SSIM needs latents of at least 11×11 (88×88 "
                                                                         "pixels for SD): use a larger latent, or "
                                                                         "connect the vae to compare decoded images")
        methods = []
        if tune_ag:
            methods.append(adaptive_guidance_method())
        if tune_compg:
            methods.append(compress_guidance_method(steps))
        if linear_ag_calibration != NO_CALIBRATION:
            methods.append(linear_ag_method(_load_calibration(model, linear_ag_calibration, steps, sampler_name,
                                                              scheduler)))
        samplings = 1 + sum(bisection_trials(len(method.candidates)) for method in methods)
        progress = comfy.utils.ProgressBar(samplings * steps, node_id=cls.hidden.unique_id)
        trials = _Trials(model, positive, negative, latent, seed, sampler_name, scheduler, steps, cfg, vae, progress)
        result = tune(trials.sample, methods, target,
                      progress=lambda done, total: progress.update_absolute(done * steps, total * steps))
        made_for = {"name": os.path.basename(path), "architecture": model_architecture(model),
                    "model_fingerprint": model_fingerprint(model), "sampler": sampler_name, "scheduler": scheduler,
                    "steps": steps, "cfg": cfg, "seed": seed, "images": int(latent["samples"].shape[0]),
                    "compared": "latents" if vae is None else "decoded images",
                    "linear_ag_calibration": None if linear_ag_calibration == NO_CALIBRATION else linear_ag_calibration}
        save_preset(path, result, made_for, overwrite=overwrite)
        page_messages.file_written(model_folders.PRESETS, path)
        text = result.text() + f"\n  preset saved to {path}"
        log.info("%s", text)
        winner = result.winner
        tuned = model if winner is None else install_policy(model, result.policy_of(winner), None)
        return io.NodeOutput(tuned, text, chart_image(result), ui=ui.PreviewText(text))


def preset_summary(name: str, metadata: dict) -> str:
    """One paragraph saying what a preset applies and what it was tuned for."""
    made_for = (f"tuned for {metadata.get('architecture', '?')} {metadata.get('model_fingerprint')}, "
                f"{metadata.get('sampler')} / {metadata.get('scheduler')}, {metadata.get('steps')} steps, "
                f"cfg {metadata.get('cfg')}, target SSIM {metadata.get('target')}")
    if metadata["method"] == "none":
        return f"{name}: plain CFG (no method met the target when tuned): the model is unchanged; {made_for}"
    settings = ", ".join(f"{key} {value}" for key, value in metadata["settings"].items())
    evaluations, cfg_evaluations = metadata.get("evaluations"), metadata.get("cfg_evaluations")
    saving = (f"; {evaluations:g} of {cfg_evaluations:g} model evaluations per image "
              f"({cfg_evaluations / evaluations:.2f}x fewer), worst SSIM {metadata.get('ssim_min', 0):.4f}"
              if isinstance(evaluations, (int, float)) and isinstance(cfg_evaluations, (int, float)) and evaluations
              else "")
    return f"{name}: {metadata['method']} {settings}{saving}; {made_for}"


_PRESET_CHECKS = (FileInput("preset", model_folders.PRESETS, "make one with FastGuidance Tune", load_preset),)


class LoadPresetNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_LoadPreset",
            display_name="Load FastGuidance Preset",
            category="sampling/fastguidance",
            description="Applies a preset saved by FastGuidance Tune to a MODEL: the method and setting it found for "
                        "this model, sampler, scheduler, steps and cfg. A preset made for another model is refused, "
                        "and so is a sampling run with another step count, unless allowed. A preset in which no "
                        "method met the target returns the model unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model the preset was tuned on. Connect the output to your sampler."),
                io.Combo.Input("preset", options=model_folders.files(model_folders.PRESETS),
                               tooltip="A preset from models/fastguidance_presets/ (made by FastGuidance Tune)."),
                io.Boolean.Input("allow_other_model", default=False,
                                 tooltip="Use a preset tuned on another model (with a warning). Off: refused."),
                io.Boolean.Input("allow_other_schedule", default=False,
                                 tooltip="Let the sampler run another step count than the preset was tuned for. Off: "
                                         "such a run stops with an error before it samples."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the preset's method installed."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="What the preset applies, its savings and what it was tuned for."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return validate(cls, values, *_PRESET_CHECKS)

    @classmethod
    def execute(cls, model, preset: str, allow_other_model: bool, allow_other_schedule: bool) -> io.NodeOutput:
        check_inputs(cls, locals(), *_PRESET_CHECKS)
        path = model_folders.existing_file(model_folders.PRESETS, preset, "preset", "make one with FastGuidance Tune")
        metadata = load_preset(path)
        mismatch = preset_mismatch(metadata, model_fingerprint(model), {})
        if mismatch is not None:
            if not allow_other_model:
                raise InvalidInputError("preset", preset, f"{mismatch}: tune this model with FastGuidance Tune, or "
                                                          "turn on allow_other_model")
            log.warning("FastGuidance: preset %s: %s; its setting may not keep the target on this model", preset, mismatch)
        summary = preset_summary(preset, metadata)
        log.info("FastGuidance [preset]: %s", summary)
        method = metadata["method"]
        if method == "none":
            return io.NodeOutput(model, summary)
        coefficients = None
        if method == "linear_ag":
            calibration = metadata.get("linear_ag_calibration")
            remedy = (f"the preset needs the LinearAG calibration {calibration}: put it back in "
                      f"models/{model_folders.LINEAR_AG}/, or tune again")
            if not isinstance(calibration, str) or not calibration:
                raise InvalidInputError("preset", preset, remedy)
            coefficients = LinearAGCoefficients.load(
                model_folders.existing_file(model_folders.LINEAR_AG, calibration, "preset", remedy))
        patched = install_policy(model, policy_from_settings(method, metadata["settings"], coefficients), None)
        steps = metadata.get("steps")
        if not allow_other_schedule and isinstance(steps, int):
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PRESET_CHECK_KEY,
                                         _ScheduleCheck(preset, steps))
        return io.NodeOutput(patched, summary)
