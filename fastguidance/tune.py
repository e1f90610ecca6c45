"""FastGuidance Tune: each method's cheapest setting that keeps a fidelity target on the user's model.

Not from a paper: the papers tune their settings (AG's γ̄ = 0.991, CompG's guided steps) on one
model each; this searches them on the user's own model, prompts and schedule.

**Fidelity**: the SSIM (:func:`fastguidance.metrics.ssim`) of each image to the plain-CFG image of
the same seed; a setting *meets* the target when **every** image reaches it (the worst image
decides, so no prompt of the set is sacrificed for the mean). Latents without a decoder are
compared through :func:`latents_as_images` (for video latents, every frame is an image and the
worst frame decides).

**Search**: each method is a list of candidate settings ordered from the most conservative to the
most aggressive (:class:`TuneMethod`). The search assumes fidelity falls as settings get more
aggressive and bisects over the list for the most aggressive one that meets the target:
``⌈log2(len + 1)⌉`` samplings of the prompts per method instead of a grid. Every trial is
recorded, and the result is the cheapest *measured* setting that met the target, so a curve that
is not monotone can make the search miss a cheaper setting but never return one that failed.
When no candidate meets the target the method's result is ``None`` (plain CFG). The assumption is
checked on the trials the search ran (:attr:`TuneResult.out_of_order`): a trial whose worst SSIM
is above that of a more conservative trial of its method is reported, since a setting beyond the
one found may then also meet the target.

**Presets** (:func:`save_preset`) store the winner, every trial and what the search was made for,
including a digest of its inputs (:func:`content_digest`), so that a run with the same inputs reads
the preset back (:func:`TuneResult.from_dict`) instead of sampling again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .engine import GuidancePolicy
from .errors import InvalidInputError
from .validation import is_finite_number, require_number
from .charts import tradeoff_chart
from .metrics import ssim
from .adaptive_guidance import AdaptiveGuidance
from .compress_guidance import CompressGuidance

#: the methods the tuner searches, in the order they are tried
TUNABLE_METHODS = ("ag", "compg", "linear_ag")
#: the fidelity target's range: below 0.5 the images no longer resemble CFG's
MIN_TARGET, MAX_TARGET = 0.5, 1.0
DEFAULT_TARGET = 0.95
#: how far a more aggressive trial's worst SSIM may rise above a more conservative one's before the
#: rise counts as out of order (differences below it are rounding: decoding, fp16)
ORDER_TOLERANCE = 1e-4
#: the chart's series of the trials that break the search's assumption (:attr:`TuneResult.out_of_order`)
OUT_OF_ORDER = "out of order: fidelity rose"

#: one sampling of the prompts with some policies: (images or latents [B, …], model evaluations per image)
Sampler = Callable[[Sequence[GuidancePolicy]], tuple[torch.Tensor, Sequence[float]]]


@dataclass(frozen=True)
class TuneMethod:
    """A method's searched setting: candidates from conservative to aggressive, and the policy of each."""

    method: str
    setting: str  # the name of the searched setting (shown to the user)
    candidates: tuple[float, ...]
    make_policy: Callable[[float], GuidancePolicy]
    fixed: dict[str, Any] = field(default_factory=dict)  # the method's other settings (for the preset)
    integer: bool = False  # the setting is a count (shown and stored as a whole number)

    def settings(self, value: float) -> dict[str, Any]:
        """All settings of the policy at ``value`` (what a preset stores)."""
        return {**self.fixed, self.setting: int(value) if self.integer else value}


def adaptive_guidance_method(points: int = 36) -> TuneMethod:
    """AG's threshold on the denoised cosine with the convergence condition (the node's defaults),
    from 0.99999 down to 0.968, evenly spaced in ``log(1 − γ̄)``."""
    fixed = {"cosine_space": "denoised", "convergence": AdaptiveGuidance.convergence}
    candidates = tuple(round(1.0 - 10.0 ** (-5.0 + 3.5 * i / (points - 1)), 6) for i in range(points))
    return TuneMethod("ag", "threshold", candidates,
                      lambda value: AdaptiveGuidance(threshold=value, **fixed), fixed)


def compress_guidance_method(steps: int) -> TuneMethod:
    """CompG's guided steps ``n`` from ``N − 1`` down to 1 (skew 1, compress: the node's defaults)."""
    if steps < 2:
        raise InvalidInputError("steps", steps, "use at least 2 steps: with one step there is nothing to skip")
    fixed = {"skew": CompressGuidance.skew, "mode": CompressGuidance.mode}
    return TuneMethod("compg", "guided_steps", tuple(float(n) for n in range(steps - 1, 0, -1)),
                      lambda value: CompressGuidance(guided_steps=int(value), **fixed), fixed, integer=True)


def linear_ag_method(coefficients: Any, points: int = 24) -> TuneMethod:
    """LinearAG's ``error_bound`` policy (estimate the calls whose held-out error is at most the bound),
    from 0.02 up to 3.0, evenly spaced in log."""
    from .linear_ag import LinearAG

    fixed = {"mode": "error_bound"}
    candidates = tuple(round(0.02 * (150.0 ** (i / (points - 1))), 4) for i in range(points))
    return TuneMethod("linear_ag", "error_bound", candidates,
                      lambda value: LinearAG(coefficients, mode="error_bound", error_bound=value), fixed)


@dataclass(frozen=True)
class Trial:
    """One sampling of the prompts with one setting."""

    method: str
    value: float
    evaluations: float  # mean model evaluations per image
    fidelity: list[float]  # per image
    meets: bool

    @property
    def worst(self) -> float:
        return min(self.fidelity)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "value": self.value, "evaluations": self.evaluations,
                "fidelity_min": self.worst, "fidelity_mean": sum(self.fidelity) / len(self.fidelity),
                "fidelity": list(self.fidelity), "meets": self.meets}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trial":
        """The trial :meth:`to_dict` wrote (``fidelity``: per image)."""
        fidelity = [float(value) for value in data["fidelity"]]
        if not fidelity or not all(math.isfinite(value) for value in fidelity):
            raise ValueError(f"a trial without per-image fidelity: {data!r}")
        return cls(str(data["method"]), float(data["value"]), float(data["evaluations"]), fidelity,
                   bool(data["meets"]))


@dataclass(frozen=True)
class OutOfOrder:
    """A trial that breaks the search's assumption: its worst SSIM is above that of ``conservative``, a
    more conservative setting of the same method (the lowest such), by more than :data:`ORDER_TOLERANCE`."""

    trial: Trial
    conservative: Trial

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.trial.method, "value": self.trial.value, "worst": self.trial.worst,
                "conservative_value": self.conservative.value, "conservative_worst": self.conservative.worst}


def out_of_order(trials: Sequence[Trial], methods: dict[str, TuneMethod]) -> list[OutOfOrder]:
    """The trials whose worst SSIM rose although their setting is more aggressive (module docstring).

    Per method, the trials in candidate order (conservative first); each is compared with the lowest
    worst SSIM of the more conservative trials before it.
    """
    found = []
    for name, method in methods.items():
        ordered = sorted((trial for trial in trials if trial.method == name),
                         key=lambda trial: method.candidates.index(trial.value))
        lowest: Trial | None = None
        for trial in ordered:
            if lowest is not None and trial.worst > lowest.worst + ORDER_TOLERANCE:
                found.append(OutOfOrder(trial, lowest))
            if lowest is None or trial.worst < lowest.worst:
                lowest = trial
    return found


@dataclass
class TuneResult:
    """What the search found: per method the cheapest setting that met the target, and the winner."""

    target: float
    cfg_evaluations: float
    methods: dict[str, TuneMethod]
    trials: list[Trial]
    best: dict[str, Trial | None]
    samplings: int  # samplings of the prompt set, the plain-CFG reference included

    @property
    def winner(self) -> Trial | None:
        """The method and setting with the fewest evaluations that met the target; ``None``: plain CFG."""
        found = [trial for trial in self.best.values() if trial is not None]
        return min(found, key=lambda trial: (trial.evaluations, -trial.worst)) if found else None

    def settings_of(self, trial: Trial) -> dict[str, Any]:
        return self.methods[trial.method].settings(trial.value)

    def policy_of(self, trial: Trial | None) -> GuidancePolicy | None:
        return None if trial is None else self.methods[trial.method].make_policy(trial.value)

    @property
    def out_of_order(self) -> list[OutOfOrder]:
        """Trials that break the assumption that fidelity falls as the setting gets more aggressive."""
        return out_of_order(self.trials, self.methods)

    def shown_value(self, trial: Trial) -> str:
        """A trial's setting as the user reads it (a count as a whole number)."""
        return f"{self.settings_of(trial)[self.methods[trial.method].setting]:g}"

    def text(self) -> str:
        """The result as lines for the user (the node's STRING output and the log)."""
        lines = [f"FastGuidance Tune: target SSIM ≥ {self.target} on every image; plain CFG "
                 f"{self.cfg_evaluations:g} model evaluations per image; {self.samplings} samplings."]
        for method, trial in self.best.items():
            setting = self.methods[method].setting
            if trial is None:
                lines.append(f"  {method}: no {setting} met the target (keep plain CFG)")
            else:
                lines.append(f"  {method}: {setting} {self.methods[method].settings(trial.value)[setting]:g}: "
                             f"{trial.evaluations:g} evaluations "
                             f"({self.cfg_evaluations / trial.evaluations:.2f}x fewer), worst SSIM {trial.worst:.4f}")
        for broken in self.out_of_order:
            trial, conservative = broken.trial, broken.conservative
            setting = self.methods[trial.method].setting
            lines.append(f"  {trial.method}: out of order: {setting} {self.shown_value(trial)} kept a worst SSIM of "
                         f"{trial.worst:.4f}, more than the more conservative {self.shown_value(conservative)} "
                         f"({conservative.worst:.4f}): the search assumes fidelity falls as the setting gets more "
                         "aggressive, so a setting beyond the one found may also meet the target")
        winner = self.winner
        lines.append("  chosen: " + ("plain CFG (no method met the target)" if winner is None else
                                     f"{winner.method} " + ", ".join(f"{k} {v}" for k, v in self.settings_of(winner).items())))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        winner = self.winner
        return {
            "target": self.target,
            "cfg_evaluations": self.cfg_evaluations,
            "samplings": self.samplings,
            "method": "none" if winner is None else winner.method,
            "settings": {} if winner is None else self.settings_of(winner),
            "evaluations": self.cfg_evaluations if winner is None else winner.evaluations,
            "ssim_min": 1.0 if winner is None else winner.worst,
            "best": {method: None if trial is None else {**trial.to_dict(), "settings": self.settings_of(trial)}
                     for method, trial in self.best.items()},
            "trials": [trial.to_dict() for trial in self.trials],
            "out_of_order": [broken.to_dict() for broken in self.out_of_order],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], methods: Sequence[TuneMethod]) -> "TuneResult":
        """The result :meth:`to_dict` wrote, for the same ``methods`` (a preset read back instead of
        searching again). Raises ``ValueError`` (or ``KeyError``/``TypeError``) on data that does not fit."""
        by_name = {method.method: method for method in methods}
        trials = [Trial.from_dict(trial) for trial in data["trials"]]
        for trial in trials:
            if trial.method not in by_name or trial.value not in by_name[trial.method].candidates:
                raise ValueError(f"a trial of {trial.method} {trial.value} is not among the searched settings")
        best: dict[str, Trial | None] = {}
        for name in by_name:
            chosen = data["best"][name]
            matching = [] if chosen is None else [trial for trial in trials
                                                   if trial.method == name and trial.value == float(chosen["value"])]
            if chosen is not None and not matching:
                raise ValueError(f"the best {name} setting {chosen!r} is not among the trials")
            best[name] = matching[0] if matching else None
        return cls(float(data["target"]), float(data["cfg_evaluations"]), by_name, trials, best, int(data["samplings"]))


def tradeoff_figure(result: TuneResult):
    """The search as a chart (:func:`fastguidance.charts.tradeoff_chart`): every trial, one colour per
    method, each method's choice ringed, and the trials out of order drawn again over their dots in a
    colour of their own (:data:`OUT_OF_ORDER`, last in the legend)."""
    series = {method: [(trial.evaluations, trial.worst) for trial in result.trials if trial.method == method]
              for method in result.methods}
    chosen = {method: (trial.evaluations, trial.worst, f"{result.methods[method].setting} {result.shown_value(trial)}")
              for method, trial in result.best.items() if trial is not None}
    broken = result.out_of_order
    if broken:
        series[OUT_OF_ORDER] = [(entry.trial.evaluations, entry.trial.worst) for entry in broken]
    winner = result.winner
    title = "FastGuidance Tune: " + ("no method met the target" if winner is None else
                                     f"{winner.method} ({result.cfg_evaluations / winner.evaluations:.2f}x fewer evaluations)")
    return tradeoff_chart(series, result.target, reference=(result.cfg_evaluations, 1.0), chosen=chosen, title=title)


def validate_target(target: float) -> None:
    require_number("target", target, MIN_TARGET, MAX_TARGET, f"use an SSIM between {MIN_TARGET} and {MAX_TARGET} "
                                                             "(0.95: close to plain CFG; 0.98: nearly identical)")


def latents_as_images(latents: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[B, C, H, W]`` or ``[B, C, T, H, W]`` as images in [0, 1] for SSIM, with the reference.

    Each sample and channel of both is mapped by the reference's range there (so the comparison is
    not rescaled per image); frames of video latents become images ``[B·T, C, H, W]``.
    """
    def frames(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.float()
        if tensor.dim() == 5:
            return tensor.transpose(1, 2).reshape(-1, tensor.shape[1], *tensor.shape[-2:])
        return tensor

    latents, reference = frames(latents), frames(reference)
    low = reference.amin(dim=(-2, -1), keepdim=True)
    span = (reference.amax(dim=(-2, -1), keepdim=True) - low).clamp_min(1e-6)
    return ((latents - low) / span).clamp(0, 1), ((reference - low) / span).clamp(0, 1)


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per sample: SSIM to the reference (for latents, the worst frame); images in [0, 1] or latents."""
    batch = images.shape[0]
    is_image = images.dim() == 4 and images.shape[1] in (1, 3) and float(reference.min()) >= 0 and float(reference.max()) <= 1
    if is_image:
        values = ssim(images.float(), reference.float(), names=("images", "reference"))
    else:
        values = ssim(*latents_as_images(images, reference), names=("latents", "reference"))
    return values.reshape(batch, -1).amin(dim=1).tolist()


def bisection_trials(count: int) -> int:
    """Samplings a bisection over ``count`` candidates needs at most."""
    return math.ceil(math.log2(count + 1))


def tune(sample: Sampler, methods: Sequence[TuneMethod], target: float = DEFAULT_TARGET,
         progress: Callable[[int, int], None] | None = None,
         compare: Callable[[torch.Tensor, torch.Tensor], list[float]] = fidelity) -> TuneResult:
    """Search every method (module docstring); ``sample(policies)`` samples the prompt set once.

    ``progress(done, total)`` is called after every sampling (the total is the most the search can
    need). The plain-CFG reference is the first sampling.
    """
    validate_target(target)
    if not methods:
        raise InvalidInputError("methods", "none", "choose at least one method to tune")
    total = 1 + sum(bisection_trials(len(method.candidates)) for method in methods)
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    reference, cfg_evaluations = sample(())
    cfg_mean = sum(cfg_evaluations) / len(cfg_evaluations)
    advance()
    trials: list[Trial] = []
    best: dict[str, Trial | None] = {}
    for method in methods:
        passing: list[Trial] = []
        low, high = -1, len(method.candidates)  # low: known to meet (plain CFG); high: known to fail
        while high - low > 1:
            middle = (low + high) // 2
            value = method.candidates[middle]
            images, evaluations = sample((method.make_policy(value),))
            scores = compare(images, reference)
            trial = Trial(method.method, value, sum(evaluations) / len(evaluations), scores,
                          min(scores) >= target)
            trials.append(trial)
            advance()
            if trial.meets:
                passing.append(trial)
                low = middle
            else:
                high = middle
        best[method.method] = min(passing, key=lambda t: (t.evaluations, -t.worst)) if passing else None
    return TuneResult(target, cfg_mean, {method.method: method for method in methods}, trials, best, done)


def policy_from_settings(method: str, settings: dict[str, Any], linear_ag_coefficients: Any = None) -> GuidancePolicy | None:
    """The policy a preset describes (``method`` ``none``: plain CFG, no policy)."""
    if method == "none":
        return None
    if method == "ag":
        return AdaptiveGuidance(**settings)
    if method == "compg":
        return CompressGuidance(**{**settings, "guided_steps": int(settings.get("guided_steps", 0))})
    if method == "linear_ag":
        from .linear_ag import LinearAG
        if linear_ag_coefficients is None:
            raise InvalidInputError("linear_ag", "no calibration", "a LinearAG preset needs its calibration file")
        return LinearAG(linear_ag_coefficients, **settings)
    raise InvalidInputError("method", method, f"choose one of none, {', '.join(TUNABLE_METHODS)}")


# -- presets: a tuning result saved for FastGuidance_LoadPreset --------------------------------------

PRESET_FORMAT = "fastguidance_preset"
#: still 1: the keys added since (``inputs``, ``trials``, ``best``, ``start_at_step``, ``end_at_step``…)
#: are optional, and a preset without them reads as before (no record of its inputs: the full schedule)
PRESET_VERSION = 1
#: what a preset was made for, checked when it is applied (the schedule keys must match exactly)
PRESET_SCHEDULE_KEYS = ("sampler", "scheduler", "steps", "cfg", "start_at_step", "end_at_step")


def content_digest(value: Any) -> str:
    """16 hex digits identifying ``value``'s content: nested dicts, lists and tuples of tensors (every
    value, shape and dtype), bytes (a file's content), numbers, strings, booleans and ``None``; any other
    object counts by its type's name only. Equal content, equal digest, on any device and in any process."""
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            data = item.detach().to("cpu")
            data = data.float() if data.is_floating_point() else data.long()
            digest.update(f"tensor{tuple(item.shape)}{item.dtype}|".encode())
            digest.update(data.contiguous().numpy().tobytes())
        elif isinstance(item, dict):
            digest.update(f"dict{len(item)}|".encode())
            for key in sorted(item, key=repr):
                feed(key)
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"{type(item).__name__}{len(item)}|".encode())
            for element in item:
                feed(element)
        elif isinstance(item, (bytes, bytearray)):
            digest.update(f"bytes{len(item)}|".encode())
            digest.update(item)
        elif item is None or isinstance(item, (bool, int, float, str)):
            digest.update(f"{type(item).__name__}:{item!r}|".encode())
        else:
            digest.update(f"object:{type(item).__module__}.{type(item).__qualname__}|".encode())

    feed(value)
    return digest.hexdigest()[:16]


def input_differences(metadata: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    """The names of ``inputs`` (what a search is made for: values and :func:`content_digest` s) whose
    record in a preset's ``inputs`` differs; every name when the preset has no record (made by an
    earlier version of the pack)."""
    stored = metadata.get("inputs")
    if not isinstance(stored, dict):
        return list(inputs)
    return [name for name, value in inputs.items() if name not in stored or stored[name] != value]


def save_preset(path: Any, result: TuneResult, made_for: dict[str, Any], overwrite: bool = False) -> Any:
    """Write ``result``'s winner as a preset (safetensors; the trials as a tensor, the rest as metadata).

    ``made_for`` holds ``model_fingerprint`` and :data:`PRESET_SCHEDULE_KEYS`, and ``inputs`` (for
    :func:`input_differences`). The metadata also holds every trial and each method's best, so that
    :meth:`TuneResult.from_dict` rebuilds the result from it. Atomic; refuses an existing file unless
    ``overwrite``.
    """
    from .tensorfile import save_tensor_file

    summary = result.to_dict()
    metadata = {"format": PRESET_FORMAT, "version": PRESET_VERSION, **made_for,
                "target": result.target, "method": summary["method"], "settings": summary["settings"],
                "evaluations": summary["evaluations"], "cfg_evaluations": result.cfg_evaluations,
                "ssim_min": summary["ssim_min"], "samplings": result.samplings,
                "trials": summary["trials"], "best": summary["best"], "out_of_order": summary["out_of_order"]}
    trials = torch.tensor([[t.evaluations, t.worst, t.value] for t in result.trials] or [[0.0, 0.0, 0.0]],
                          dtype=torch.float32)
    return save_tensor_file(path, {"trials": trials}, metadata, overwrite=overwrite)


def load_preset(path: Any) -> dict[str, Any]:
    """Read a preset's metadata; :class:`~fastguidance.errors.TensorFileError` says what is wrong."""
    from .errors import TensorFileError
    from .linear_ag import validate_linear_ag
    from .tensorfile import interpreting, load_tensor_file

    _, metadata = load_tensor_file(path, PRESET_FORMAT, PRESET_VERSION)
    method, settings = metadata.get("method"), metadata.get("settings")
    if method not in ("none",) + TUNABLE_METHODS or not isinstance(settings, dict):
        raise TensorFileError(f"{path} is a preset without a valid method and settings (method {method!r}): "
                              "tune again to make it anew")
    with interpreting(path, "preset"):
        # everything the loader and its summary read, so that a hand-edited preset fails here, by name
        for key in ("evaluations", "cfg_evaluations", "ssim_min", "target", "cfg"):
            if key in metadata and not is_finite_number(metadata[key]):
                raise TensorFileError(f"{path} has {key} {metadata[key]!r}, not a number: tune again")
        for key in ("sampler", "scheduler"):
            if key in metadata and not isinstance(metadata[key], str):
                raise TensorFileError(f"{path} has {key} {metadata[key]!r}, not a name: tune again")
        for key in ("steps", "end_at_step"):
            if key in metadata and not (isinstance(metadata[key], int) and not isinstance(metadata[key], bool)
                                        and metadata[key] >= 1):
                raise TensorFileError(f"{path} has {key} {metadata[key]!r}, not a step count: tune again")
        if "start_at_step" in metadata and not (isinstance(metadata["start_at_step"], int)
                                                and 0 <= metadata["start_at_step"] < metadata.get("end_at_step", 0)
                                                <= metadata.get("steps", 0)):
            raise TensorFileError(f"{path} has the segment {metadata['start_at_step']!r}–"
                                  f"{metadata.get('end_at_step')!r} of {metadata.get('steps')!r} steps: tune again")
        if method in ("ag", "compg"):
            policy_from_settings(method, settings)
        elif method == "linear_ag":
            unknown = set(settings) - {"mode", "after_step", "error_bound", "interpolate_sigmas"}
            if unknown:
                raise TensorFileError(f"{path} has unknown LinearAG settings {sorted(unknown)}: tune again")
            validate_linear_ag(settings.get("mode", "error_bound"), settings.get("after_step", 1),
                               settings.get("error_bound", 0.3))
            if not isinstance(metadata.get("linear_ag_calibration"), str):
                raise TensorFileError(f"{path} does not name its LinearAG calibration file: tune again")
    return metadata


def preset_mismatch(metadata: dict[str, Any], model_fingerprint: str | None, schedule: dict[str, Any]) -> str | None:
    """Why a preset does not fit this model and schedule, or ``None`` when it does."""
    differences = []
    made_for = metadata.get("model_fingerprint")
    if model_fingerprint is not None and made_for != model_fingerprint:
        differences.append(f"model {made_for} (this one is {model_fingerprint})")
    for key in PRESET_SCHEDULE_KEYS:
        if key in schedule and schedule[key] is not None and metadata.get(key) != schedule[key]:
            differences.append(f"{key} {metadata.get(key)!r} (this one is {schedule[key]!r})")
    if not differences:
        return None
    return "it was tuned for " + ", ".join(differences)
