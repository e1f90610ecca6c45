"""What the benchmark runs: one list of method variants, each a name, its settings and its policies.

The benchmark's loop (:mod:`fastguidance.research.bench`) never names a method. A method joins the
benchmark by adding a factory to :data:`VARIANT_FACTORIES`; combinations are variants whose
``method`` joins the parts with ``+`` (``ag+compg``) and whose policies are the parts' policies
(the engine's combination rule decides).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..engine import GuidancePolicy
from ..errors import TensorFileError
from ..fingerprint import weights_fingerprint
from ..adaptive_guidance import AdaptiveGuidance
from .windows import CFGWindow, GuidanceInterval
from ..compress_guidance import CompressGuidance
from ..adaptive_guidance import PAPER_SETTINGS
from ..linear_ag import LinearAG, LinearAGCalibration, LinearAGCoefficients
from .reference.model import ReferenceModel, TextConditioning
from .reference.scenes import random_scene
from .sampling import sample
from ..step_predictor import conditioning_features, load_step_predictor
from ..schedules import make_sigmas


@dataclass
class BenchContext:
    """What a variant's policies may need: the model and settings of the run, and one-time work.

    :meth:`prepared` runs expensive preparation (a calibration) once per benchmark, shared by the
    variants that need it, and records its wall time in :attr:`preparation_seconds` (reported in
    ``bench.json`` as the method's cost outside sampling).
    """

    model: ReferenceModel
    settings: Any  # fastguidance.research.bench.BenchSettings
    sigmas: torch.Tensor
    uncond: TextConditioning
    preparation_seconds: dict[str, float] = field(default_factory=dict)
    #: shows what a long preparation is doing (the bench's progress line); called with a short text
    progress: Callable[[str], None] = lambda text: None
    _prepared: dict[str, Any] = field(default_factory=dict)

    def sigmas_for(self, steps: int) -> torch.Tensor:
        """The benchmark's schedule at another step count (AdaDiff chooses it per prompt)."""
        if steps == len(self.sigmas) - 1:
            return self.sigmas
        return make_sigmas(self.model.schedule, self.settings.scheduler, steps)

    def prepared(self, key: str, make: Callable[[], Any], is_cost: bool = True) -> Any:
        """``make()`` once per benchmark; its wall time is reported when ``is_cost`` (not for loading a file)."""
        if key not in self._prepared:
            self.progress(f"preparing {key}")
            began = time.perf_counter()
            self._prepared[key] = make()
            if is_cost:
                self.preparation_seconds[key] = time.perf_counter() - began
        return self._prepared[key]


def require_trained_for(context: BenchContext, metadata: dict[str, Any], path: Any, what: str) -> None:
    """Refuse a shipped file (step predictor, adapters) trained on another reference model: its
    numbers would describe a model that is no longer the one benchmarked."""
    model_fingerprint = context.prepared("model fingerprint", lambda: weights_fingerprint(context.model.state_dict().items()),
                                         is_cost=False)
    made_for = metadata.get("model_fingerprint")
    if made_for != model_fingerprint:
        trained_on = f"another reference model (fingerprint {made_for})" if made_for else "an unknown model (no fingerprint)"
        raise TensorFileError(f"{path} was trained on {trained_on}, not on this one ({model_fingerprint}): retrain it with "
                              f"`python -m fastguidance.research.reference.train {what} --overwrite`, or run only the methods "
                              f"that do not need it (--methods lists the methods to run)")


def _no_policies(context: BenchContext) -> Sequence[GuidancePolicy]:
    return ()


@dataclass(frozen=True)
class BenchVariant:
    """One row of the benchmark."""

    method: str  # none, cfg, ag, compg, linear_ag, agd, adadiff, or parts joined by "+"
    settings: dict = field(default_factory=dict)
    make_policies: Callable[[BenchContext], Sequence[GuidancePolicy]] = _no_policies
    #: per-prompt step counts (AdaDiff); None: the benchmark's --steps for every prompt
    choose_steps: Callable[[BenchContext, TextConditioning], Sequence[int]] | None = None
    #: a single-pass guided model to sample with instead of the reference model (AGD); use with guided=False
    single_pass: Callable[[BenchContext], Any] | None = None
    guided: bool = True  # False: no guidance at all (cfg scale 1, one evaluation per step)
    #: loads (and checks) the files the variant needs; run for every variant before any sampling
    load_files: Callable[[BenchContext], Any] | None = None
    scale: float | None = None  # CFG scale of this row; None: the benchmark's --scale
    #: the row of the method's node at its default settings (``"defaults": true`` in bench.json)
    defaults: bool = False
    #: a row whose setting FastGuidance Tune chose for this fidelity target (``"tune_target"``)
    tune_target: float | None = None
    #: more of the row for bench.json (the tuning's settings and cost)
    extra: Callable[[BenchContext], dict] | None = None
    #: a setting of the combination search (:func:`adadiff_combination_variants`): not in ``--defaults-only``
    search: bool = False

    @property
    def label(self) -> str:
        label = self.method + "".join(f" {key}={value}" for key, value in self.settings.items())
        return label + (" (defaults)" if self.defaults else "")


def baseline_variants() -> list[BenchVariant]:
    """No guidance, CFG at the benchmark's scale (the reference of every row), CFG at other scales."""
    return [BenchVariant("none", guided=False), BenchVariant("cfg")] + [
        BenchVariant("cfg", {"scale": scale}, scale=scale) for scale in (2.0, 8.0)]


def window_variant(fraction: float) -> BenchVariant:
    """The fixed CFG window (:class:`~fastguidance.research.windows.CFGWindow`): guided for the first
    ``fraction`` of the steps, cond only after. The benchmark adds one per evaluation count its
    other rows reached (:func:`fastguidance.research.windows.window_fraction_for`), after running them."""
    return BenchVariant("cfg_window", {"fraction": round(fraction, 4)}, lambda _: [CFGWindow(fraction)])


#: the method names of the derived window rows (not in :func:`all_variants`; the bench adds them)
WINDOW_METHOD = "cfg_window"


def guidance_interval_variants() -> list[BenchVariant]:
    """Guidance interval (Kynkäänniemi et al. 2024): CFG only for σ in (0.28, 5.42], the interval the
    paper reports for EDM2, at the benchmark's scale and at 8 (the paper raises the scale inside the
    interval; here 9 of the 20 karras steps fall in it)."""
    return [BenchVariant("guidance_interval", {}, lambda _: [GuidanceInterval()]),
            BenchVariant("guidance_interval", {"scale": 8.0}, lambda _: [GuidanceInterval()], scale=8.0)]


def adaptive_guidance_variants() -> list[BenchVariant]:
    """The node's defaults (denoised cosine 0.9998, convergence 0.5); the paper's rule (noise cosine
    0.991, no convergence condition: it cuts at the first step on this model) and the same with the
    convergence condition; the reuse extension; the denoised cosine at other thresholds."""
    def ag(**settings):
        return lambda _: [AdaptiveGuidance(**settings)]

    paper = dict(PAPER_SETTINGS)
    return [
        BenchVariant("ag", {}, ag(), defaults=True),
        BenchVariant("ag", {"threshold": paper["threshold"], "cosine_space": paper["cosine_space"],
                            "convergence": paper["convergence"]}, ag(**paper)),  # the paper's rule
        BenchVariant("ag", {"threshold": 0.991, "cosine_space": "noise", "convergence": 0.5},
                     ag(threshold=0.991, cosine_space="noise", convergence=0.5)),
        BenchVariant("ag", {"threshold": 0.98, "cosine_space": "noise", "after_cutoff": "reuse", "convergence": 1.0},
                     ag(threshold=0.98, cosine_space="noise", after_cutoff="reuse", convergence=1.0)),
    ] + [BenchVariant("ag", {"threshold": threshold}, ag(threshold=threshold)) for threshold in (0.991, 0.998, 0.9995)]


def compress_guidance_variants() -> list[BenchVariant]:
    """The node's defaults (rate 4, k = 1, compress weighted by count); rates around 40% fewer
    evaluations (rate 5 = 4 guided of 20 steps); skews below, at and above 1 (the paper's rule: k > 1
    guides fewer steps); both modes; compress weighted by count and by noise-level span; and with AG."""
    def compg(rate, skew, mode, weighting="count"):
        return lambda _: [CompressGuidance(compression=rate, skew=skew, mode=mode, weighting=weighting)]

    variants = [BenchVariant("compg", {}, lambda _: [CompressGuidance()], defaults=True)]
    grid = [(2.0, 1.0, "reuse"), (5.0, 0.5, "reuse"), (5.0, 1.0, "reuse"), (5.0, 2.0, "reuse"),
            (10.0, 1.0, "reuse"), (2.0, 1.0, "compress"), (5.0, 1.0, "compress"), (5.0, 2.0, "compress"),
            (10.0, 1.0, "compress")]
    variants += [BenchVariant("compg", {"rate": rate, "k": skew, "mode": mode}, compg(rate, skew, mode))
                 for rate, skew, mode in grid]
    variants.append(BenchVariant("compg", {"rate": 5.0, "k": 1.0, "mode": "compress", "weighting": "sigma"},
                                 compg(5.0, 1.0, "compress", "sigma")))
    variants.append(BenchVariant("ag+compg", {"rate": 5.0},
                                 lambda _: [AdaptiveGuidance(), CompressGuidance(5.0)]))
    return variants


#: LinearAG calibration of the benchmark: paths of training prompts, seeds apart from the bench's
LINEAR_AG_CALIBRATION_PATHS = 64
LINEAR_AG_WINDOW = 2


def calibrate_linear_ag(context: BenchContext, paths: int = LINEAR_AG_CALIBRATION_PATHS,
                        window: int = LINEAR_AG_WINDOW, regularization: float = 1e-3) -> LinearAGCoefficients:
    """Fit LinearAG on the reference model with the benchmark's sampler, schedule and scale.

    The calibration prompts and noise come from their own seeds, so no benchmark image is seen.
    """
    settings, model = context.settings, context.model
    rng = random.Random(1_000_000 + settings.seed)
    prompts = [random_scene(rng, held_out=False).prompt for _ in range(paths)]
    generator = torch.Generator().manual_seed(1_000_000 + settings.seed)
    noise = torch.randn(paths, 3, 32, 32, generator=generator)
    calibration = LinearAGCalibration(window)
    with torch.no_grad():
        cond = model.encode(prompts)
        for start in range(0, paths, settings.batch):
            context.progress(f"calibrating LinearAG: sampling CFG paths {start + 1}–{min(start + settings.batch, paths)} "
                             f"of {paths} (one-time)")
            rows = slice(start, start + settings.batch)
            sample(model, noise[rows], context.sigmas, cond.select(rows), context.uncond, settings.scale,
                   settings.sampler, [calibration.policy()], percent_to_sigma=model.schedule.percent_to_sigma)
    return calibration.fit(regularization, {"sampler": settings.sampler, "scheduler": settings.scheduler,
                                            "cfg": settings.scale, "name": "reference model (bench)"})


def linear_ag_calibration(context: BenchContext) -> LinearAGCoefficients:
    """The benchmark's LinearAG calibration, fitted once and shared by every row that needs it."""
    key = f"linear_ag calibration ({LINEAR_AG_CALIBRATION_PATHS} paths, window {LINEAR_AG_WINDOW})"
    return context.prepared(key, lambda: calibrate_linear_ag(context))


def linear_ag_variants() -> list[BenchVariant]:
    """The paper's alternating policy, estimating every step from a point on, and error bounds."""

    def policies(**options):
        return lambda context: [LinearAG(linear_ag_calibration(context), **options)]

    return [
        BenchVariant("linear_ag", {}, policies(), defaults=True),
        BenchVariant("linear_ag", {"mode": "after_step", "after_step": 4}, policies(mode="after_step", after_step=4)),
        BenchVariant("linear_ag", {"mode": "after_step", "after_step": 8}, policies(mode="after_step", after_step=8)),
        BenchVariant("linear_ag", {"mode": "error_bound", "error_bound": 0.3},
                     policies(mode="error_bound", error_bound=0.3)),
        BenchVariant("linear_ag", {"mode": "error_bound", "error_bound": 0.5},
                     policies(mode="error_bound", error_bound=0.5)),
    ]


def shipped_step_predictor(context: BenchContext) -> Any:
    """The shipped AdaDiff predictor of the reference model (loaded once, refused if stale)."""
    def load():
        from .reference.weights import STEP_PREDICTOR_PATH
        predictor, metadata = load_step_predictor(STEP_PREDICTOR_PATH)
        require_trained_for(context, metadata, STEP_PREDICTOR_PATH, "step_predictor")
        return predictor

    return context.prepared("adadiff predictor", load, is_cost=False)


def predicted_steps(context: BenchContext, cond: TextConditioning) -> list[int]:
    """AdaDiff's step count per prompt, from the shipped predictor of the reference model."""
    return shipped_step_predictor(context).choose(conditioning_features(cond.tokens, cond.pooled, cond.mask))


def adadiff_variants() -> list[BenchVariant]:
    """AdaDiff alone (steps per prompt, up to the benchmark's 20) and combined with AG and CompG.

    The predictor was trained for the default schedule (20 steps max, dpmpp_2m / karras, cfg 5).
    """
    return [
        BenchVariant("adadiff", {}, choose_steps=predicted_steps, load_files=shipped_step_predictor, defaults=True),
        BenchVariant("adadiff+ag", {}, lambda _: [AdaptiveGuidance()], choose_steps=predicted_steps,
                     load_files=shipped_step_predictor),
        BenchVariant("adadiff+compg", {"rate": 5.0},
                     lambda _: [CompressGuidance(5.0)], choose_steps=predicted_steps,
                     load_files=shipped_step_predictor),
        BenchVariant("adadiff+compg", {"rate": 2.0},
                     lambda _: [CompressGuidance(2.0)], choose_steps=predicted_steps,
                     load_files=shipped_step_predictor),
    ] + adadiff_combination_variants()


def adadiff_combination_variants() -> list[BenchVariant]:
    """The search for the best combination within 2 points of CFG (issue 21's aim: 3× fewer
    evaluations than 20-step CFG, 13.3 per image). At AdaDiff's steps (10 for most prompts):
    CompG (compress mode, count weighting) at rates 3 and 4 (3 guided of 10 steps for both; 7 and 5
    of 20); AG at lower thresholds (alone, 0.9995 cost 1.8 fewer evaluations than the default for
    −0.7 points); AG with CompG; FastGuidance Tune's settings (tuned on 20 steps, applied to
    AdaDiff's); and the fixed CFG window at AdaDiff's steps, the baseline at these costs (the
    bench's own windows need at least 20 evaluations)."""
    def at_adadiff_steps(method, settings, make_policies, **options):
        return BenchVariant(method, settings, make_policies, choose_steps=predicted_steps,
                            load_files=shipped_step_predictor, search=True, **options)

    variants = [at_adadiff_steps("adadiff+compg", {"rate": rate}, lambda _, rate=rate: [CompressGuidance(rate)])
                for rate in (3.0, 4.0)]
    variants += [at_adadiff_steps("adadiff+ag", {"threshold": threshold},
                                  lambda _, threshold=threshold: [AdaptiveGuidance(threshold=threshold)])
                 for threshold in (0.9995, 0.999)]
    variants += [at_adadiff_steps("adadiff+ag+compg", {"rate": rate},
                                  lambda _, rate=rate: [AdaptiveGuidance(), CompressGuidance(rate)])
                 for rate in (2.0, 3.0)]
    variants += [at_adadiff_steps(f"adadiff+{method}", {"tuned": 0.95}, tuned_policies(method, 0.95))
                 for method in ("ag", "compg")]
    variants += [at_adadiff_steps("adadiff+cfg_window", {"fraction": fraction},
                                  lambda _, fraction=fraction: [CFGWindow(fraction)])
                 for fraction in (0.3, 0.5)]
    return variants


def adapted_model(context: BenchContext) -> Any:
    """The reference model with the shipped AGD adapters, CFG at the benchmark's scale built in."""
    def load():
        from ..guidance_adapters.adapters import load_adapters
        from .reference.adapters import SinglePassModel
        from .reference.weights import ADAPTERS_PATH
        adapters, metadata = load_adapters(ADAPTERS_PATH)
        require_trained_for(context, metadata, ADAPTERS_PATH, "adapters")
        return SinglePassModel(context.model, adapters, context.settings.scale)

    return context.prepared("agd adapters", load, is_cost=False)


def agd_variants() -> list[BenchVariant]:
    """AGD: one adapted pass per step (ω = the benchmark's scale), alone and with AdaDiff's steps."""
    return [BenchVariant("agd", {}, guided=False, single_pass=adapted_model, load_files=adapted_model, defaults=True),
            BenchVariant("adadiff+agd", {}, guided=False, single_pass=adapted_model, choose_steps=predicted_steps,
                         load_files=lambda context: (adapted_model(context), shipped_step_predictor(context)))]


#: FastGuidance Tune in the benchmark: prompts it tunes on (training combinations, seeds apart from the bench's)
TUNE_PROMPTS = 8
TUNE_TARGETS = (0.95, 0.98)


def tuned(context: BenchContext, method: str, target: float) -> Any:
    """:func:`fastguidance.tune.tune` for one method on :data:`TUNE_PROMPTS` prompts of their own
    (none of the benchmark's images), with the benchmark's sampler, schedule and scale; once."""
    from .reference.model import to_image
    from ..tune import adaptive_guidance_method, compress_guidance_method, linear_ag_method, tune

    def run() -> Any:
        settings, model = context.settings, context.model
        rng = random.Random(2_000_000 + settings.seed)
        prompts = [random_scene(rng, held_out=False).prompt for _ in range(TUNE_PROMPTS)]
        noise = torch.randn(TUNE_PROMPTS, 3, 32, 32, generator=torch.Generator().manual_seed(2_000_000 + settings.seed))
        with torch.no_grad():
            cond = model.encode(prompts)

        samplings = [0]

        @torch.no_grad()
        def sample_prompts(policies):
            samplings[0] += 1
            context.progress(f"tuning {method} to SSIM {target}: sampling {samplings[0]} of its {TUNE_PROMPTS} prompts "
                             f"(one-time)")
            result = sample(model, noise, context.sigmas, cond, context.uncond, settings.scale, settings.sampler,
                            list(policies), percent_to_sigma=model.schedule.percent_to_sigma)
            spent = (result.run.evaluations_per_sample() if result.run is not None
                     else [2 * (len(context.sigmas) - 1)] * TUNE_PROMPTS)
            return to_image(result.latent), spent

        searched = {"ag": adaptive_guidance_method,
                    "compg": lambda: compress_guidance_method(settings.steps),
                    "linear_ag": lambda: linear_ag_method(linear_ag_calibration(context))}[method]()
        return tune(sample_prompts, [searched], target)

    return context.prepared(f"tune {method} to SSIM {target} ({TUNE_PROMPTS} prompts)", run)


def tuned_policies(method: str, target: float):
    """The policies of ``method`` at the setting FastGuidance Tune chose for ``target`` (none: plain CFG)."""
    def make(context: BenchContext) -> list[GuidancePolicy]:
        result = tuned(context, method, target)
        policy = result.policy_of(result.best[method])
        return [] if policy is None else [policy]
    return make


def tuned_variants() -> list[BenchVariant]:
    """Each tunable method at the setting FastGuidance Tune chose for each target (plain CFG where none met it)."""
    def extra(method, target):
        def describe(context: BenchContext) -> dict:
            result = tuned(context, method, target)
            best = result.best[method]
            return {"tuning": {"prompts": TUNE_PROMPTS, "samplings": result.samplings,
                               "settings": None if best is None else result.settings_of(best),
                               "tuned_evaluations": None if best is None else best.evaluations,
                               "tuned_ssim_min": None if best is None else best.worst}}
        return describe

    return [BenchVariant(method, {"tuned": target}, tuned_policies(method, target), tune_target=target,
                         extra=extra(method, target))
            for target in TUNE_TARGETS for method in ("ag", "compg", "linear_ag")]


#: every method's variants, in table order; later methods add their factory here
VARIANT_FACTORIES: tuple[Callable[[], list[BenchVariant]], ...] = (
    baseline_variants,
    guidance_interval_variants,
    adaptive_guidance_variants,
    compress_guidance_variants,
    linear_ag_variants,
    adadiff_variants,
    agd_variants,
    tuned_variants,
)


def all_variants() -> list[BenchVariant]:
    return [variant for factory in VARIANT_FACTORIES for variant in factory()]
