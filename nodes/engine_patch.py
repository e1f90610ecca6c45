"""Installs the core engine into a ComfyUI MODEL (COMFYUI.md §2–3). The only file that knows the hooks.

- ``sampler_calc_cond_batch_function`` decides, per model call, whether the uncond is evaluated;
  a function that was in the slot before is chained (it still does every evaluation);
- a keyed ``OUTER_SAMPLE`` wrapper creates the run object of each sampling run, puts it in a clone
  of the guider's model options (the patched MODEL is cached and reused across prompts, so it holds
  no run state), logs the run's summary once and sends the run's record to the page; a caller that
  samples a patched model itself can receive the finished run instead (:data:`RUN_OBSERVER_KEY`).

Several FastGuidance patches on one model share one engine: each adds its policy, and the core's
combination rule (``fastguidance.engine``) decides.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch
from comfy_api.latest import io

from ..fastguidance.engine import GuidancePolicy, GuidanceRun, shared_cosine_space
from .page_messages import send_to_page

log = logging.getLogger("fastguidance")

#: transformer_options key of the engine's settings, and key of its wrapper
ENGINE_KEY = "fastguidance"
#: transformer_options key of the current run (only in the per-run clone of the options)
RUN_KEY = "fastguidance_run"
#: event sent to the page after each run (data: node id, summary, per-call records)
RUN_EVENT = "fastguidance.run"
#: optional transformer_options key of a callable that receives each finished :class:`GuidanceRun`
#: of the model (its counts and records), called once the sampler has returned or raised. The run is
#: then handed to the caller instead of being logged and sent to the page: the caller reports (the
#: Tune node samples dozens of trial runs and logs one summary). Absent (every patch node's model):
#: nothing changes. Give the callable ``__deepcopy__`` returning itself: ComfyUI 0.3.64 deep-copies
#: model options on ``clone()``.
RUN_OBSERVER_KEY = "fastguidance_run_observer"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What a patched model carries: the policies, the nodes that added them, the chained function."""

    policies: tuple[GuidancePolicy, ...]
    node_ids: tuple[str, ...]
    chained: Callable[[dict], list] | None


@dataclasses.dataclass
class _HostRun:
    """The core run plus what only the host glue counts."""

    run: GuidanceRun
    passthrough_calls: int = 0  # calls without an uncond (cfg 1): nothing to decide
    batch_mismatch_logged: bool = False


def install_policy(model: Any, policy: GuidancePolicy, node_id: str | None) -> Any:
    """Return a clone of ``model`` whose sampling runs ``policy`` (with any FastGuidance policies already on it)."""
    patched = model.clone()
    options = patched.model_options
    transformer_options = options.setdefault("transformer_options", {})
    config = transformer_options.get(ENGINE_KEY)
    current = options.get("sampler_calc_cond_batch_function")
    node_ids = () if node_id is None else (str(node_id),)
    if config is not None and current is engine_calc_cond_batch:
        config = dataclasses.replace(config, policies=config.policies + (policy,), node_ids=config.node_ids + node_ids)
    else:
        config = EngineConfig((policy,), node_ids, chained=current)
        patched.set_model_sampler_calc_cond_batch_function(engine_calc_cond_batch)
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ENGINE_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ENGINE_KEY, engine_outer_sample)
    shared_cosine_space(config.policies)  # refuse mixed spaces here, where the node is known, not at sampling
    transformer_options[ENGINE_KEY] = config
    return patched


def guider_inputs() -> list:
    """The inputs every FastGuidance GUIDER shares with the stock CFGGuider node (before its method's settings)."""
    return [
        io.Model.Input("model", tooltip="The model to sample with."),
        io.Conditioning.Input("positive", tooltip="The prompt conditioning."),
        io.Conditioning.Input("negative", tooltip="The negative (or empty) prompt conditioning."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale, as in KSampler. 1.0 = no guidance (nothing to skip)."),
    ]


def cfg_guider(model: Any, positive: Any, negative: Any, cfg: float, policy: GuidancePolicy, node_id: str | None) -> Any:
    """The stock CFGGuider on a model running ``policy`` (what the FastGuidance GUIDER nodes return)."""
    guider = comfy.samplers.CFGGuider(install_policy(model, policy, node_id))
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def engine_outer_sample(executor, *args, **kwargs):
    """``OUTER_SAMPLE`` wrapper: one :class:`GuidanceRun` per sampling run, reported when it ends."""
    guider = executor.class_obj
    config: EngineConfig | None = guider.model_options.get("transformer_options", {}).get(ENGINE_KEY)
    if config is None:
        return executor(*args, **kwargs)
    noise = args[0] if args else kwargs["noise"]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    host_run = _HostRun(GuidanceRun(config.policies, sigmas, noise.shape[0], model_sampling.percent_to_sigma))
    original_options = guider.model_options
    observer = original_options["transformer_options"].get(RUN_OBSERVER_KEY)
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options["transformer_options"][RUN_KEY] = host_run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        try:
            if observer is None:
                _report(config, host_run, type(guider).__name__)
            else:
                host_run.run.finish()
                observer(host_run.run)
        except Exception:  # reporting must never mask the sampler's own result or error
            log.exception("FastGuidance: could not report the run")


def engine_calc_cond_batch(args: dict) -> list:
    """``sampler_calc_cond_batch_function``: evaluate what the run's plan asks for, estimate the rest."""
    transformer_options = args["model_options"].get("transformer_options", {})
    config: EngineConfig | None = transformer_options.get(ENGINE_KEY)
    host_run: _HostRun | None = transformer_options.get(RUN_KEY)
    chained = config.chained if config is not None else None
    conds, x = args["conds"], args["input"]
    if host_run is None or len(conds) != 2 or conds[1] is None:
        if host_run is not None:
            host_run.passthrough_calls += 1
        return _evaluate(chained, args)
    run = host_run.run
    if x.shape[0] != run.batch_size:
        if not host_run.batch_mismatch_logged:
            log.warning("FastGuidance: the model was called with a batch of %d, the run was started with %d; "
                        "these calls use plain CFG", x.shape[0], run.batch_size)
            host_run.batch_mismatch_logged = True
        return _evaluate(chained, args)
    plan = run.plan(args["sigma"])
    if plan.evaluate_uncond:
        cond, uncond = _evaluate(chained, args)[:2]
    else:
        cond, uncond = _evaluate_cond_only(chained, args), None
    return [cond, run.complete(plan, x, cond, uncond)]


def _evaluate(chained: Callable[[dict], list] | None, args: dict) -> list:
    """Model evaluations exactly as the host would do them, through the chained function if any."""
    if chained is not None:
        return chained(args)
    return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])


def _evaluate_cond_only(chained: Callable[[dict], list] | None, args: dict) -> torch.Tensor:
    """One forward pass for the cond alone (the uncond slot is ``None``, so the host skips it)."""
    if chained is not None:
        return chained(dict(args, conds=[args["conds"][0], None]))[0]
    return comfy.samplers.calc_cond_batch(args["model"], args["conds"][:1], args["input"], args["sigma"], args["model_options"])[0]


def _report(config: EngineConfig, host_run: _HostRun, guider_name: str) -> None:
    run = host_run.run
    summary = run.finish()
    label = "FastGuidance [" + "+".join(policy.name for policy in config.policies) + "]"
    if summary.calls == 0:
        if host_run.passthrough_calls:
            log.info("%s: cfg is 1, there is no uncond evaluation to skip", label)
        else:
            log.warning("%s: the guider %s never called the guidance engine (it evaluates its conditionings "
                        "itself, as PerpNegGuider and DualCFGGuider do); nothing was skipped", label, guider_name)
        return
    log.info(summary.text(label))
    for message in run.advice():
        log.warning("%s: %s", label, message)
    _send_to_page(config, run)


def _send_to_page(config: EngineConfig, run: GuidanceRun) -> None:
    """Optional: the frontend draws the record on the node. Silent where no server runs."""
    if not config.node_ids:
        return
    data = run.to_dict()
    for node_id in config.node_ids:
        if not send_to_page(RUN_EVENT, {"node": node_id, **data}):
            return
