"""FastGuidance Tune and Load FastGuidance Preset: search each method's cheapest setting on the user's
model (the core's :func:`fastguidance.tune.tune`), save it as a preset, and apply a saved preset.

The node samples through the host's public sampling (``comfy.sample.sample``, what KSampler and
KSamplerAdvanced run) on the model patched with :func:`install_policy`, so a trial gives exactly the
picture the returned MODEL gives in a KSampler with the same seed (or in a KSamplerAdvanced for the
same segment of the schedule). Evaluations per image come from what the runs record: the engine's
run of each trial (received through ``engine_patch.RUN_OBSERVER_KEY``) and, for the plain-CFG
reference, a ``CALC_COND_BATCH`` wrapper that counts the conditionings evaluated.

A re-queue with unchanged inputs costs nothing: ComfyUI's cache answers it while it holds the node's
outputs, and otherwise (another workflow ran, the server restarted, the cache was freed) the preset
written for the same inputs is read back (:func:`_inputs_identity`, stored in the preset) instead of
sampling again. A preset of that name made for other inputs is never replaced unless ``overwrite``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io, ui
from comfy_execution.graph_utils import is_link

from ..fastguidance.engine import GuidanceRun
from ..fastguidance.errors import FastGuidanceError, InvalidInputError, TensorFileError
from ..fastguidance.fingerprint import weights_fingerprint
from ..fastguidance.linear_ag import LinearAG, LinearAGCoefficients, ScheduleMismatchError
from ..fastguidance.tensorfile import interpreting
from ..fastguidance.tune import (DEFAULT_TARGET, MAX_TARGET, MIN_TARGET, TuneMethod, TuneResult,
                                 adaptive_guidance_method, bisection_trials, compress_guidance_method, content_digest,
                                 input_differences, linear_ag_method, load_preset, policy_from_settings,
                                 preset_mismatch, save_preset, tradeoff_figure, tune)
from ..fastguidance.validation import portable_file_name
from . import model_folders, page_messages
from .engine_patch import ENGINE_KEY, RUN_OBSERVER_KEY, install_policy
from .model_identity import model_architecture, model_fingerprint
from .validation import FILE_NAME, CrossRule, FileInput, ValidatedNode
from .shared_across_clones import SharedAcrossClones

log = logging.getLogger("fastguidance")

#: the linear_ag_calibration choice that leaves LinearAG out of the search
NO_CALIBRATION = "none"
#: key of the plain-CFG reference's counting wrapper, and of Load Preset's schedule check
COUNT_KEY = "fastguidance_tune_count"
PRESET_CHECK_KEY = "fastguidance_preset"
MIN_STEPS, MAX_STEPS = 2, 10000
MAX_CFG = 100.0
#: KSamplerAdvanced's segment defaults: the whole schedule (what a Tune saved before these inputs existed runs)
WHOLE_SCHEDULE = {"start_at_step": 0, "end_at_step": 10000}
#: what each entry of a preset's record of its inputs is, for the message when they differ
INPUT_LABELS = {"model": "the model's weights", "positive": "the positive conditioning",
                "negative": "the negative conditioning", "latent": "the latent", "vae": "the vae",
                "calibration": "the LinearAG calibration file's content",
                "search": "the settings searched (another version of FastGuidance)",
                "nodes_before": "the nodes before Tune (a loader, a LoRA, a patch node…)"}


class _RunRecorder(SharedAcrossClones):
    """Receives the finished engine runs of one trial (``RUN_OBSERVER_KEY``); shared, not copied, on clone."""

    def __init__(self) -> None:
        self.runs: list[GuidanceRun] = []

    def __call__(self, run: GuidanceRun) -> None:
        self.runs.append(run)


class _EvaluationCounter(SharedAcrossClones):
    """``CALC_COND_BATCH`` wrapper: model evaluations per image, one per conditioning evaluated per call
    (plain CFG: cond and uncond, 2 per model call; a ``None`` slot, as at cfg 1, costs nothing)."""

    def __init__(self) -> None:
        self.evaluations = 0

    def __call__(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        self.evaluations += sum(1 for cond in conds if cond is not None)
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)


def schedule_sigmas(model, sampler_name: str, scheduler: str, steps: int, segment: tuple[int, int]) -> torch.Tensor:
    """The sigmas a KSampler (a KSamplerAdvanced for ``segment`` = (start_at_step, end_at_step)) samples
    with this model's sampling (its shift included), on the CPU."""
    sigmas = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                     denoise=1.0, model_options=model.model_options).sigmas
    return sigmas[segment[0]: segment[1] + 1]


def _same_sampler(a, b) -> bool:
    """Whether two host samplers run the same sampling function (closures compared by name)."""
    function_a, function_b = getattr(a, "sampler_function", None), getattr(b, "sampler_function", None)
    if function_a is None or function_b is None:
        return False
    return ((function_a.__module__, function_a.__qualname__) == (function_b.__module__, function_b.__qualname__)
            and getattr(a, "inpaint_options", None) == getattr(b, "inpaint_options", None))


def _sampler_name(sampler) -> str:
    """KSampler's name of a host sampler object, or what it is when it is none of them."""
    for name in comfy.samplers.KSampler.SAMPLERS:
        if _same_sampler(comfy.samplers.sampler_object(name), sampler):
            return name
    function = getattr(sampler, "sampler_function", None)
    return f"a sampler that is not one of KSampler's ({getattr(function, '__qualname__', type(sampler).__name__)})"


def _segment_text(metadata: dict) -> str:
    steps = metadata["steps"]
    start, end = metadata.get("start_at_step", 0), metadata.get("end_at_step", steps)
    return f"{steps} steps" if (start, end) == (0, steps) else f"steps {start}–{end} of {steps}"


class _PresetCheck(SharedAcrossClones):
    """``OUTER_SAMPLE`` wrapper of a loaded preset: refuses, before it samples, a run with another sampler,
    schedule (scheduler, step count, KSamplerAdvanced segment, denoise) or cfg than the preset was tuned for."""

    def __init__(self, preset: str, metadata: dict) -> None:
        self.preset, self.metadata = preset, metadata

    def __call__(self, executor, *args, **kwargs):
        sampler = args[2] if len(args) > 2 else kwargs["sampler"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        differences = self.differences(executor.class_obj, sampler, sigmas)
        if differences:
            name, value = differences[0][:2]
            raise InvalidInputError(name, value, f"the preset {self.preset} was tuned for "
                                                 + "; ".join(difference[2] for difference in differences)
                                                 + ": sample with its settings (summary of Load FastGuidance Preset), "
                                                   "tune again for yours, or turn on allow_other_schedule in Load "
                                                   "FastGuidance Preset")
        return executor(*args, **kwargs)

    def sigmas_for(self, guider, scheduler: str, segment: tuple[int, int]) -> torch.Tensor:
        return schedule_sigmas(guider.model_patcher, self.metadata["sampler"], scheduler, self.metadata["steps"],
                               segment).float()

    @staticmethod
    def same_sigmas(actual: torch.Tensor, expected: torch.Tensor) -> bool:
        if float(actual[-1]) == 0.0:  # KSamplerAdvanced without leftover noise ends on 0: the same steps
            expected = torch.cat([expected[:-1], expected.new_zeros(1)])
        return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-4, atol=1e-6)

    def differences(self, guider, sampler, sigmas: torch.Tensor) -> list[tuple[str, object, str]]:
        """(input, this run's value, what the preset was tuned for) of each setting that differs."""
        metadata, found = self.metadata, []
        steps = metadata["steps"]
        segment = (metadata.get("start_at_step", 0), metadata.get("end_at_step", steps))
        run_steps = len(sigmas) - 1
        if run_steps != segment[1] - segment[0]:
            found.append(("steps", run_steps, _segment_text(metadata)))
        elif "sampler" in metadata and "scheduler" in metadata:
            expected = self.sigmas_for(guider, metadata["scheduler"], segment)
            actual = sigmas.detach().float().cpu()  # once per run, before it samples
            if not self.same_sigmas(actual, expected):
                known = [name for name in comfy.samplers.KSampler.SCHEDULERS
                         if self.same_sigmas(actual, self.sigmas_for(guider, name, segment))]  # for the message
                found.append(("scheduler", known[0] if known else
                              f"another schedule (sigmas {float(actual[0]):.4g} to {float(actual[-1]):.4g})",
                              f"the scheduler {metadata['scheduler']} over {_segment_text(metadata)} (or another "
                              "denoise or model sampling shift)"))
        if "sampler" in metadata and not _same_sampler(sampler, comfy.samplers.sampler_object(metadata["sampler"])):
            found.append(("sampler_name", _sampler_name(sampler), f"sampler {metadata['sampler']}"))
        cfg = getattr(guider, "cfg", None)  # CFGGuider's scale; a guider without one is not checked
        if "cfg" in metadata and isinstance(cfg, (int, float)) and abs(cfg - metadata["cfg"]) > 1e-6:
            found.append(("cfg", cfg, f"cfg {metadata['cfg']:g}"))
        return found


def _cfg_guides(cfg: float) -> None:
    if cfg == 1.0:
        raise InvalidInputError("cfg", cfg, "at cfg 1 the negative prompt is never evaluated, so there is nothing "
                                            "to make cheaper: use the CFG scale you generate with (e.g. 7)")


def _segment_steps(start_at_step: int, end_at_step: int, steps: int) -> None:
    if min(end_at_step, steps) - start_at_step < MIN_STEPS:
        raise InvalidInputError("start_at_step", start_at_step,
                                f"tune at least {MIN_STEPS} steps: use a start_at_step at most "
                                f"{min(end_at_step, steps) - MIN_STEPS} (end_at_step {end_at_step}, steps {steps})")


def _some_method(tune_ag: bool, tune_compg: bool, linear_ag_calibration: str) -> None:
    if not tune_ag and not tune_compg and linear_ag_calibration == NO_CALIBRATION:
        raise InvalidInputError("tune_ag", False, "turn on tune_ag or tune_compg, or pick a linear_ag_calibration: "
                                                  "there is no method to tune")


_TUNE_CHECKS = (FILE_NAME, CrossRule(_cfg_guides, ("cfg",)),
                FileInput("linear_ag_calibration", model_folders.LINEAR_AG, "made by LinearAG Calibrate",
                          LinearAGCoefficients.load, other_choices=(NO_CALIBRATION,)),
                CrossRule(_some_method, ("tune_ag", "tune_compg", "linear_ag_calibration")),
                CrossRule(_segment_steps, ("start_at_step", "end_at_step", "steps")))


def _load_calibration(model, name: str, steps: int, sampler_name: str, scheduler: str,
                      segment: tuple[int, int]) -> tuple[LinearAGCoefficients, str]:
    """The LinearAG calibration the user picked (and its file's path), refused before any sampling when its
    schedule differs from the one sampled (a segment's, for a KSamplerAdvanced segment)."""
    path = model_folders.existing_file(model_folders.LINEAR_AG, name, "linear_ag_calibration",
                                       "make one with LinearAG Calibrate")
    coefficients = LinearAGCoefficients.load(path)
    made_for = coefficients.info.get("model_fingerprint")
    if made_for and made_for != model_fingerprint(model):
        log.warning("FastGuidance: %s was calibrated on another model (fingerprint %s); its estimates may be poor "
                    "and LinearAG may not reach the target", name, made_for)
    sigmas = schedule_sigmas(model, sampler_name, scheduler, steps, segment)
    try:
        GuidanceRun((LinearAG(coefficients, mode="error_bound"),), sigmas, 1)  # its start() compares schedules
    except ScheduleMismatchError:
        sampled = f"{steps} steps" if segment == (0, steps) else f"steps {segment[0]}–{segment[1]} of {steps}"
        raise InvalidInputError("linear_ag_calibration", name,
                                f"it was calibrated for {coefficients.made_for()}, not {sampled} of {sampler_name} / "
                                f"{scheduler}: calibrate with these settings (LinearAG Calibrate), or choose none") from None
    return coefficients, path


def _empty_noise(latent_image: torch.Tensor) -> torch.Tensor:
    """KSamplerAdvanced's noise with add_noise disabled (``prepare_empty_noise`` exists only in ComfyUI 0.33,
    which also handles nested latents there)."""
    empty = getattr(comfy.sample, "prepare_empty_noise", None)
    return empty(latent_image) if empty is not None else torch.zeros_like(latent_image, device="cpu")


def _fix_latent(model, latent: dict) -> torch.Tensor:
    """``latent["samples"]`` as KSampler prepares it (empty latents get the model's channel count)."""
    ratios = [latent.get("downscale_ratio_spacial"), latent.get("downscale_ratio_temporal")]
    if any(ratio is not None for ratio in ratios):  # only ComfyUI 0.33 sets (and takes) them
        return comfy.sample.fix_empty_latent_channels(model, latent["samples"], *ratios)
    return comfy.sample.fix_empty_latent_channels(model, latent["samples"])


class _Trials:
    """Samples the latent batch once per trial, exactly as KSampler would with the same seed, or as
    KSamplerAdvanced would for a segment of the schedule (``segment`` = (start_at_step, end_at_step))."""

    def __init__(self, model, positive, negative, latent: dict, seed: int, sampler_name: str, scheduler: str,
                 steps: int, cfg: float, vae, progress: comfy.utils.ProgressBar, segment: tuple[int, int]):
        self.model, self.positive, self.negative, self.vae = model, positive, negative, vae
        self.seed, self.sampler_name, self.scheduler, self.steps, self.cfg = seed, sampler_name, scheduler, steps, cfg
        self.latent_image = _fix_latent(model, latent)
        self.batch_index = latent.get("batch_index")
        self.noise_mask = latent.get("noise_mask")
        self.progress = progress
        self.segment = segment
        self.sampled_steps = segment[1] - segment[0]
        #: a segment that hands over before the last step: from its last sigma to 0 (:meth:`denoised_estimate`)
        self.to_zero = None
        if segment[1] < steps:
            handover = schedule_sigmas(model, sampler_name, scheduler, steps, (segment[1], segment[1]))
            self.to_zero = torch.cat([handover, handover.new_zeros(1)])
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
        start, end = self.segment
        if start > 0:  # a later segment samples on from what the earlier one returned (add_noise disabled)
            noise = _empty_noise(self.latent_image)
        else:
            noise = comfy.sample.prepare_noise(self.latent_image, self.seed, self.batch_index)
        # the whole schedule exactly as KSampler; a segment as KSamplerAdvanced (leftover noise returned
        # when it ends before the last step, for the next segment)
        segment = {} if self.segment == (0, self.steps) else {"start_step": start, "last_step": end}
        samples = comfy.sample.sample(patched, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                      self.positive, self.negative, self.latent_image, denoise=1.0,
                                      noise_mask=self.noise_mask, callback=self._step, disable_pbar=True, seed=self.seed,
                                      **segment)
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
        """What fidelity is measured on: decoded images ``[N, 3, H, W]`` in [0, 1] (video: every frame), or latents.

        A segment that hands over before the last step is compared through its one-step denoised estimate
        (:meth:`denoised_estimate`): its leftover noise, the same in every trial, would hide the differences.
        """
        if self.to_zero is not None:
            samples = self.denoised_estimate(samples)
        if self.vae is None:
            return samples
        images = self.vae.decode(samples)
        if images.dim() == 5:
            images = images.reshape(-1, *images.shape[-3:])
        return images[..., :3].movedim(-1, 1).float().clamp(0.0, 1.0)

    def denoised_estimate(self, samples: torch.Tensor) -> torch.Tensor:
        """The picture a handed-over latent points to: one plain-CFG Euler step of the untouched model from
        the handover's sigma to 0 (its guided denoised prediction), the same measurement for every trial."""
        return comfy.sample.sample_custom(self.model, torch.zeros_like(samples), self.cfg,
                                          comfy.samplers.sampler_object("euler"), self.to_zero, self.positive,
                                          self.negative, samples, noise_mask=self.noise_mask, disable_pbar=True,
                                          seed=self.seed)

    def _step(self, step: int, *_args) -> None:
        self.progress.update_absolute(self.done * self.sampled_steps + min(step + 1, self.sampled_steps))


def _nodes_before(dynprompt, node_id: str | None) -> list | None:
    """The nodes before Tune as the prompt describes them: each one's class and widget values, a link as
    its source's place in a walk from Tune (sorted input names, breadth first) and its output slot, as
    ComfyUI's own cache key does, so equal graphs give equal lists whatever their node ids. ``None``
    outside a prompt (Tune called directly)."""
    if dynprompt is None or node_id is None or not dynprompt.has_node(node_id):
        return None
    place, order, described = {node_id: 0}, [node_id], []
    for current in order:  # grows while walking
        if not dynprompt.has_node(current):
            described.append(["missing"])
            continue
        node = dynprompt.get_node(current)
        entry = [node["class_type"]]
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            if is_link(value):
                if value[0] not in place:
                    place[value[0]] = len(order)
                    order.append(value[0])
                entry.append([name, "link", place[value[0]], value[1]])
            elif current != node_id:  # Tune's own widgets are recorded one by one
                entry.append([name, value])
        described.append(entry)
    return described


def _inputs_identity(model, positive, negative, latent: dict, vae, settings: dict, methods: list[TuneMethod],
                     calibration_path: str | None, nodes_before: list | None) -> dict:
    """What a search is made for, stored in its preset: ``settings`` (the widget values but filename and
    overwrite) as they are, and a digest of each input (the model's weights, the conditioning and latent
    tensors, the vae's weights, the calibration file, the settings searched, the nodes before Tune).
    The nodes before Tune catch what the tensors do not show: a LoRA's strength, a patch node's settings."""
    first_stage = getattr(vae, "first_stage_model", None)
    return {
        **settings,
        "model": model_fingerprint(model),
        "positive": content_digest(positive),
        "negative": content_digest(negative),
        "latent": content_digest({key: latent[key] for key in ("samples", "noise_mask", "batch_index") if key in latent}),
        "vae": None if vae is None else (weights_fingerprint(first_stage.state_dict().items()) if first_stage is not None
                                         else content_digest(vae)),
        "calibration": None if calibration_path is None else content_digest(Path(calibration_path).read_bytes()),
        "search": content_digest([[method.method, method.setting, list(method.candidates), method.fixed]
                                  for method in methods]),
        "nodes_before": None if nodes_before is None else content_digest(nodes_before),
    }


def _describe_differences(metadata: dict, inputs: dict, differences: list[str]) -> str:
    stored = metadata.get("inputs")
    if not isinstance(stored, dict):
        return "it has no record of its inputs (made by an earlier version of FastGuidance)"
    return ", ".join(INPUT_LABELS[name] if name in INPUT_LABELS else
                     f"{name} {stored.get(name)!r} (this run: {inputs[name]!r})" for name in differences)


def _read_back(path: str, filename: str, inputs: dict, methods: list[TuneMethod], overwrite: bool) -> TuneResult | None:
    """The search a preset at ``path`` holds when it was made for these same ``inputs``; ``None`` when it
    was not and ``overwrite`` is on (tune again and replace it); otherwise refused, saying what differs."""
    stem, folder = os.path.basename(path), f"models/{model_folders.PRESETS}"
    try:
        metadata = load_preset(path)
    except TensorFileError as error:
        if overwrite:
            return None
        raise InvalidInputError("filename", filename, f"{stem} already exists in {folder} and is not a preset this "
                                                      f"version reads ({error}): choose another name or turn on "
                                                      "overwrite") from None
    differences = input_differences(metadata, inputs)
    if not differences:
        with interpreting(path, "preset"):
            return TuneResult.from_dict(metadata, methods)
    if overwrite:
        return None
    hint = (" (a seed that changes on every run, as with the seed's control after generate on randomize, tunes "
            "again every time: set it to fixed)" if "seed" in differences else "")
    raise InvalidInputError("filename", filename, f"{stem} already exists in {folder}, made for other inputs: "
                                                  f"{_describe_differences(metadata, inputs, differences)}{hint}: "
                                                  "choose another name or turn on overwrite to tune again and replace it")


def chart_image(result: TuneResult) -> torch.Tensor:
    """The trade-off chart of a search (:func:`fastguidance.tune.tradeoff_figure`) as an IMAGE ``[1, H, W, 3]``."""
    return torch.from_numpy(np.asarray(tradeoff_figure(result).convert("RGB"), dtype=np.float32) / 255.0)[None]


class TuneNode(ValidatedNode):
    CHECKS = _TUNE_CHECKS

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
                        "(a bisection over its settings), each of the whole latent batch; a run with the same inputs "
                        "again reads that preset back instead (no sampling). With start_at_step / end_at_step it "
                        "tunes one KSamplerAdvanced segment (a Wan 2.2 expert's steps).",
            inputs=[
                io.Model.Input("model", tooltip="The model to tune, before any FastGuidance node (Tune compares "
                                                "against plain CFG and installs the method itself)."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning: one prompt, or a batch with one prompt "
                                                          "per image of the latent batch. Typical prompts of yours."),
                io.Conditioning.Input("negative", tooltip="Negative (or empty) prompt conditioning, as you generate."),
                io.Latent.Input("latent", tooltip="Size and batch of every trial: each image of the batch is compared "
                                                  "with its plain-CFG image, and the worst one decides."),
                # "fixed" (io.ControlAfterGenerate.fixed on 0.33, a plain string on 0.3.64, which lacks the
                # enum): frontends that read it start new nodes on fixed; True meant randomize, a new seed and
                # a whole new search on every Queue
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate="fixed",
                             tooltip="Noise seed of every trial (the same for all, as in a KSampler). Keep the "
                                     "control after generate on fixed: a run with the same inputs reads the preset "
                                     "back, while another seed is a new search (refused while the preset exists, "
                                     "unless overwrite is on)."),
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
                                 tooltip="Replace a preset of the same name made for other inputs. Off: such a file "
                                         "is never replaced (checked before tuning). A preset made for these same "
                                         "inputs is read back either way, not tuned again."),
                io.Combo.Input("linear_ag_calibration",
                               options=[NO_CALIBRATION] + model_folders.files(model_folders.LINEAR_AG),
                               default=NO_CALIBRATION, optional=True,
                               tooltip="Also search LinearAG's error bound with this calibration (made by LinearAG "
                                       "Calibrate for this sampler, scheduler and steps). none: LinearAG is not tuned."),
                # added after the node first shipped: optional, and their defaults (the whole schedule) do what
                # saved workflows without them did
                io.Int.Input("start_at_step", default=WHOLE_SCHEDULE["start_at_step"], min=0, max=MAX_STEPS,
                             optional=True,
                             tooltip="First step of the segment to tune, 0–10000 (0), as in KSamplerAdvanced. Above 0 "
                                     "(Wan 2.2's low-noise model: 10 of 20) the latent must be what the earlier "
                                     "segment returned: no noise is added to it (add_noise disabled)."),
                io.Int.Input("end_at_step", default=WHOLE_SCHEDULE["end_at_step"], min=0, max=MAX_STEPS,
                             optional=True,
                             tooltip="The segment ends at this step, 0–10000 (10000: the last), as in "
                                     "KSamplerAdvanced. Before the last step (Wan 2.2's high-noise model: 10 of 20) "
                                     "its leftover noise is returned for the next segment, and what is compared is "
                                     "the picture that latent points to (one denoising step of plain CFG)."),
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
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed: int, sampler_name: str, scheduler: str, steps: int,
                cfg: float, target: float, tune_ag: bool, tune_compg: bool, filename: str, overwrite: bool,
                linear_ag_calibration: str = NO_CALIBRATION, vae=None,
                start_at_step: int = WHOLE_SCHEDULE["start_at_step"],
                end_at_step: int = WHOLE_SCHEDULE["end_at_step"]) -> io.NodeOutput:
        if model.model_options.get("transformer_options", {}).get(ENGINE_KEY) is not None:
            raise InvalidInputError("model", "a model with a FastGuidance patch",
                                    "connect the model before any FastGuidance node: Tune compares against plain CFG "
                                    "and installs the method it finds itself")
        height, width = latent["samples"].shape[-2:]
        if vae is None and min(height, width) < 11:
            raise InvalidInputError("latent", f"{height}×{width} latent", "SSIM needs latents of at least 11×11 (88×88 "
                                                                         "pixels for SD): use a larger latent, or "
                                                                         "connect the vae to compare decoded images")
        segment = (start_at_step, min(end_at_step, steps))
        methods, calibration_path = [], None
        if tune_ag:
            methods.append(adaptive_guidance_method())
        if tune_compg:
            methods.append(compress_guidance_method(segment[1] - segment[0]))
        if linear_ag_calibration != NO_CALIBRATION:
            coefficients, calibration_path = _load_calibration(model, linear_ag_calibration, steps, sampler_name,
                                                               scheduler, segment)
            methods.append(linear_ag_method(coefficients))
        settings = {"seed": seed, "sampler": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg,
                    "target": target, "tune_ag": tune_ag, "tune_compg": tune_compg,
                    "linear_ag_calibration": None if linear_ag_calibration == NO_CALIBRATION else linear_ag_calibration,
                    "start_at_step": segment[0], "end_at_step": segment[1]}
        inputs = _inputs_identity(model, positive, negative, latent, vae, settings, methods, calibration_path,
                                  _nodes_before(cls.hidden.dynprompt, cls.hidden.unique_id))
        stem = portable_file_name(filename)
        try:
            existing = model_folders.existing_file(model_folders.PRESETS, stem, "filename", "")
        except InvalidInputError:
            existing = None
        result = None if existing is None else _read_back(existing, filename, inputs, methods, overwrite)
        if result is not None:
            text = (result.text() + f"\n  read back from the preset {existing}, tuned for these same inputs: "
                                    "nothing sampled")
        else:
            path = model_folders.new_file(model_folders.PRESETS, filename, overwrite)
            samplings = 1 + sum(bisection_trials(len(method.candidates)) for method in methods)
            sampled_steps = segment[1] - segment[0]
            progress = comfy.utils.ProgressBar(samplings * sampled_steps, node_id=cls.hidden.unique_id)
            trials = _Trials(model, positive, negative, latent, seed, sampler_name, scheduler, steps, cfg, vae,
                             progress, segment)
            result = tune(trials.sample, methods, target,
                          progress=lambda done, total: progress.update_absolute(done * sampled_steps,
                                                                                total * sampled_steps))
            made_for = {"name": os.path.basename(path), "architecture": model_architecture(model),
                        "model_fingerprint": inputs["model"], **settings,
                        "images": int(latent["samples"].shape[0]),
                        "compared": "latents" if vae is None else "decoded images", "inputs": inputs}
            save_preset(path, result, made_for, overwrite=overwrite)
            page_messages.file_written(model_folders.PRESETS, path)
            text = result.text() + f"\n  preset saved to {path}"
        log.info("%s", text)
        winner = result.winner
        tuned = model if winner is None else install_policy(model, result.policy_of(winner), None)
        return io.NodeOutput(tuned, text, chart_image(result), ui=ui.PreviewText(text))


def preset_summary(name: str, metadata: dict) -> str:
    """One paragraph saying what a preset applies and what it was tuned for."""
    steps = _segment_text(metadata) if isinstance(metadata.get("steps"), int) else f"{metadata.get('steps')} steps"
    made_for = (f"tuned for {metadata.get('architecture', '?')} {metadata.get('model_fingerprint')}, "
                f"{metadata.get('sampler')} / {metadata.get('scheduler')}, {steps}, "
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


class LoadPresetNode(ValidatedNode):
    CHECKS = _PRESET_CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_LoadPreset",
            display_name="Load FastGuidance Preset",
            category="sampling/fastguidance",
            description="Applies a preset saved by FastGuidance Tune to a MODEL: the method and setting it found for "
                        "this model, sampler, scheduler, steps (or KSamplerAdvanced segment) and cfg. A preset made "
                        "for another model is refused, and so is a sampling run with another sampler, scheduler, "
                        "step count, segment or cfg, unless allowed. A preset in which no method met the target "
                        "returns the model unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model the preset was tuned on. Connect the output to your sampler."),
                io.Combo.Input("preset", options=model_folders.files(model_folders.PRESETS),
                               tooltip="A preset from models/fastguidance_presets/ (made by FastGuidance Tune)."),
                io.Boolean.Input("allow_other_model", default=False,
                                 tooltip="Use a preset tuned on another model (with a warning). Off: refused."),
                io.Boolean.Input("allow_other_schedule", default=False,
                                 tooltip="Let the sampler run with another sampler, scheduler, step count (or "
                                         "KSamplerAdvanced segment), denoise or cfg than the preset was tuned for. "
                                         "Off: such a run stops with an error naming what differs, before it "
                                         "samples."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the preset's method installed."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="What the preset applies, its savings and what it was tuned for."),
            ],
        )

    @classmethod
    def execute(cls, model, preset: str, allow_other_model: bool, allow_other_schedule: bool) -> io.NodeOutput:
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
        checked = model
        if not allow_other_schedule:
            _require_known_schedule(preset, metadata)
            if isinstance(metadata.get("steps"), int):
                # added before the engine's wrapper, so that it runs first: a refused run never starts one
                checked = model.clone()
                checked.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PRESET_CHECK_KEY,
                                             _PresetCheck(preset, metadata))
        patched = install_policy(checked, policy_from_settings(method, metadata["settings"], coefficients), None)
        return io.NodeOutput(patched, summary)


def _require_known_schedule(preset: str, metadata: dict) -> None:
    """Refuse, before any sampling, a preset whose sampler or scheduler this host does not have (a preset
    made on another ComfyUI): no run of this host could match it."""
    for key, names in (("sampler", comfy.samplers.KSampler.SAMPLERS), ("scheduler", comfy.samplers.KSampler.SCHEDULERS)):
        if key in metadata and metadata[key] not in names:
            raise InvalidInputError("preset", preset, f"it was tuned for the {key} {metadata[key]}, which this ComfyUI "
                                                      "does not have: tune again with one of its own, or turn on "
                                                      "allow_other_schedule")
