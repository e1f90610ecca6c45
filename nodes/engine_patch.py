"""Installs the core engine into a ComfyUI MODEL (COMFYUI.md §2–3). The only file that knows the hooks.

- ``sampler_calc_cond_batch_function`` decides, per model call, whether the uncond is evaluated;
  a function that was in the slot before is chained (it still does every evaluation);
- a keyed ``OUTER_SAMPLE`` wrapper creates the run object of each sampling run, puts it in a clone
  of the guider's model options (the patched MODEL is cached and reused across prompts, so it holds
  no run state), logs the run's summary once and sends the run's record to the page; a caller that
  samples a patched model itself can receive the finished run instead (:data:`RUN_OBSERVER_KEY`);
- beside a step cache (the host's EasyCache or LazyCache, or any wrapper that may answer a model call
  without the model), run-scoped counting wrappers measure what the model really evaluated, so the
  run reports the savings of both, and the engine lets EasyCache decide on the prompt's conditioning
  (:func:`_easycache_window`), the one every call of a FastGuidance run evaluates.

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


#: keys under which the host's step caches register their wrappers (comfy_extras/nodes_easycache.py), and
#: the key of their run state in transformer_options; a cache is named in the run's summary by them
HOST_CACHES = {(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "easycache"): "EasyCache",
               (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "lazycache"): "LazyCache"}
EASYCACHE_STATE_KEY = "easycache"


@dataclasses.dataclass(frozen=True)
class _SigmaWindow:
    """Sigmas ``end < sigma <= start``, compared in float32 as the host compares its sigma tensors."""

    start: float
    end: float

    def __contains__(self, sigma: float) -> bool:
        return self.end < sigma <= self.start


@dataclasses.dataclass
class _HostRun:
    """The core run plus what only the host glue counts."""

    run: GuidanceRun
    passthrough_calls: int = 0  # calls without an uncond (cfg 1): nothing to decide
    batch_mismatch_logged: bool = False
    #: a wrapper beside the engine may answer model calls without the model (a step cache): count
    counts_evaluations: bool = False
    cache_name: str = ""
    sampler_calls: int = 0  # model calls of the sampler (outermost PREDICT_NOISE wrapper)
    engine_calls: int = 0  # of those, the ones that reached the engine
    evaluated: set | None = None  # during an engine call: cond_or_uncond entries the model really ran
    #: EasyCache's window while it has not yet picked the conditioning it decides on (_easycache_window)
    easycache_pick: _SigmaWindow | None = None
    #: a function another node put in the slot after ours (engine_outer_sample); the engine runs it
    slot_function: Callable[[dict], list] | None = None
    in_call: bool = False  # inside engine_calc_cond_batch (a chained slot function may call back into it)


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
    slot = guider.model_options.get("sampler_calc_cond_batch_function")
    if slot is not engine_calc_cond_batch:
        # A node applied after the FastGuidance node put its own function in the shared slot without
        # chaining ours (the host's SkipLayerGuidanceDiTSimple): for this run the engine goes back in
        # front and runs that function for every evaluation it makes, so both work in either order.
        host_run.slot_function = slot
        guider.model_options["sampler_calc_cond_batch_function"] = engine_calc_cond_batch
    _watch_step_caches(guider.model_options["transformer_options"], host_run, model_sampling)
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        try:
            _count_cache_calls(host_run)
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
    if host_run is None or host_run.in_call:
        # in a call: a slot function the engine runs (_HostRun.slot_function) chained to the one it replaced, ours
        return _evaluate(chained, args)
    host_run.engine_calls += 1
    host_run.in_call = True
    try:
        return _plan_and_evaluate(host_run, host_run.slot_function or chained, args)
    finally:
        host_run.in_call = False


def _plan_and_evaluate(host_run: _HostRun, chained: Callable[[dict], list] | None, args: dict) -> list:
    conds, x = args["conds"], args["input"]
    if len(conds) != 2 or conds[1] is None:
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
    easycache_picks = host_run.easycache_pick is not None and plan.context.sigma in host_run.easycache_pick
    if host_run.counts_evaluations:
        host_run.evaluated = set()
    try:
        if not plan.evaluate_uncond:
            cond, uncond = _evaluate_cond_only(chained, args), None
        elif easycache_picks:
            # EasyCache's first call: cond alone first, so that it decides on the cond (_easycache_window)
            cond, uncond = _evaluate_cond_only(chained, args), _evaluate_uncond_only(chained, args)
        else:
            cond, uncond = _evaluate(chained, args)[:2]
    finally:
        evaluated, host_run.evaluated = host_run.evaluated, None
    if easycache_picks:
        host_run.easycache_pick = None  # EasyCache has picked the cond: every later call keeps the batch
    planned = {0, 1} if uncond is not None else {0}
    cached = len(planned - evaluated) if evaluated is not None else 0  # answered by a step cache, not the model
    return [cond, run.complete(plan, x, cond, uncond, cached=cached)]


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


def _evaluate_uncond_only(chained: Callable[[dict], list] | None, args: dict) -> torch.Tensor:
    """One forward pass for the uncond alone (the cond slot is ``None``; ``cond_or_uncond`` stays 1)."""
    conds = [None, args["conds"][1]]
    if chained is not None:
        return chained(dict(args, conds=conds))[1]
    return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"], args["model_options"])[1]


def _watch_step_caches(transformer_options: dict, host_run: _HostRun, model_sampling: Any) -> None:
    """Beside a wrapper that may answer model calls without the model, measure what the model ran.

    Adds two run-scoped wrappers to the run's own copy of the options (never to the MODEL): an
    outermost ``PREDICT_NOISE`` wrapper that counts the sampler's model calls (LazyCache answers whole
    calls before they reach the engine) and an innermost ``DIFFUSION_MODEL`` wrapper that records
    which conditionings the model really evaluated inside each engine call (EasyCache answers from
    its cache inside the call). Without such wrappers nothing is added: the per-call path is unchanged.
    """
    wrappers = transformer_options.setdefault("wrappers", {})
    predict_noise = comfy.patcher_extension.WrappersMP.PREDICT_NOISE
    diffusion_model = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    foreign = {(kind, key) for kind in (predict_noise, diffusion_model)
               for key in wrappers.get(kind, {}) if key != ENGINE_KEY}
    if not foreign:
        return
    host_run.counts_evaluations = True
    host_run.cache_name = " and ".join(sorted({HOST_CACHES[key] for key in foreign if key in HOST_CACHES}))
    outer = {key: value for key, value in wrappers.get(predict_noise, {}).items() if key != ENGINE_KEY}
    wrappers[predict_noise] = {ENGINE_KEY: [_count_sampler_call], **outer}
    inner = {key: value for key, value in wrappers.get(diffusion_model, {}).items() if key != ENGINE_KEY}
    wrappers[diffusion_model] = {**inner, ENGINE_KEY: [_count_model_evaluation]}
    if host_run.run.may_skip_uncond():
        host_run.easycache_pick = _easycache_window(transformer_options, wrappers, model_sampling)


def _easycache_window(transformer_options: dict, wrappers: dict, model_sampling: Any) -> _SigmaWindow | None:
    """Where the host's EasyCache picks the conditioning whose change decides every skip of the run.

    EasyCache (comfy_extras/nodes_easycache.py, 0.3.64 and 0.33) takes the first conditioning of the
    batch (``uuids[0]``) of its first call inside its window (``end < sigma <= start``) and, for the rest
    of the run, decides only in calls that contain it; the host batches the uncond before the cond.
    So with stock batching it picks the uncond, and it never skips a call in which FastGuidance skips
    the uncond (tiny SD1.5 UNet, 10 steps, ``benchmarks/host_caches.py``: EasyCache from step 0 skips 5
    steps alone and none beside AG or CompG at their defaults; at its defaults, 1 beside AG's paper rule).
    The engine therefore evaluates the cond alone, then the uncond, in the one call where EasyCache
    picks (same evaluations, two forward passes instead of one batched); EasyCache then decides on the
    cond, which every call evaluates, and skips whole calls, uncond included, as it does alone.
    Not done where the run's policies never skip the uncond (:meth:`GuidanceRun.may_skip_uncond`): the
    calls are then exactly EasyCache's own (which conditioning it decides on changes its skips: on the
    tiny model it skips fewer steps deciding on the cond).
    Reads the node's window settings from its run state; ``None`` without EasyCache on the model.
    """
    if EASYCACHE_STATE_KEY not in wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}):
        return None
    state = transformer_options.get(EASYCACHE_STATE_KEY)
    start, end = getattr(state, "start_percent", None), getattr(state, "end_percent", None)
    if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
        return None
    as_float32 = lambda value: float(torch.tensor(float(value), dtype=torch.float32))  # noqa: E731 (host values)
    return _SigmaWindow(as_float32(model_sampling.percent_to_sigma(start)),
                        as_float32(model_sampling.percent_to_sigma(end)))


def _count_sampler_call(executor, *args, **kwargs):
    """Outermost ``PREDICT_NOISE`` wrapper of a run beside a step cache: counts the sampler's model calls."""
    model_options = args[2] if len(args) > 2 else kwargs.get("model_options", {})
    host_run = model_options.get("transformer_options", {}).get(RUN_KEY)
    if host_run is not None:
        host_run.sampler_calls += 1
    return executor(*args, **kwargs)


def _count_model_evaluation(executor, *args, **kwargs):
    """Innermost ``DIFFUSION_MODEL`` wrapper: the model really runs the conditionings of this chunk."""
    options = kwargs.get("transformer_options")
    if not isinstance(options, dict):  # families pass it by position, last or nearly
        options = next((arg for arg in reversed(args) if isinstance(arg, dict) and "cond_or_uncond" in arg), None)
    host_run = options.get(RUN_KEY) if options is not None else None
    if host_run is not None and host_run.evaluated is not None:
        host_run.evaluated.update(options.get("cond_or_uncond", ()))
    return executor(*args, **kwargs)


def _count_cache_calls(host_run: _HostRun) -> None:
    """Sampler calls a step cache answered before they reached the engine (LazyCache), once per run."""
    if host_run.counts_evaluations:
        host_run.run.served_from_cache(calls=max(host_run.sampler_calls - host_run.engine_calls, 0),
                                       cache_name=host_run.cache_name)
        host_run.sampler_calls = host_run.engine_calls


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
