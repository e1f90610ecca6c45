"""``python -m fastguidance bench``: every method against CFG and against a fixed CFG window, on the
bundled reference model.

Same prompts (training combinations and held-out ones), same seeds, one run. Per method variant:
model evaluations per image, wall time and speed-up over CFG, SSIM and PSNR to the CFG image of the
same seed (kornia), adherence (the independent classifier's share of the prompt's attributes seen
in the image) and a Fréchet distance to real renders of the same prompts (classifier features).

**Baselines at matched cost.** After the methods have run, the bench samples the fixed CFG window
(:class:`~fastguidance.research.windows.CFGWindow`: guided for the first ``f`` of the steps, cond only
after) at every evaluation count the rows reached (``f = (E − N)/N``, ``E`` rounded), and compares
each row with the window of its own cost. Rows cheaper than ``N`` evaluations (or dearer than
``2N``) have no window at the bench's step count.

**Error bars.** Paired bootstrap over prompts (:mod:`fastguidance.metrics`): the same resampled
prompt sets (seeded) for every row, 95% intervals for adherence and SSIM to CFG (percentile) and the
Fréchet distance (basic: its resamples are biased upwards), and for their differences to CFG and to
the matched window. A difference is *real* only where its interval excludes zero.

Writes ``bench.json``, ``grid.png`` and ``plot.png`` to the output folder and a table to stdout.
``model_evals`` counts what each image needed (2 per step while guided, 1 after): results do not
depend on the batch, so it is what a batch-of-one run spends. ``seconds`` is measured on batches
(``--batch``), where the uncond is skipped only once every image of the batch may skip it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from .bench_methods import WINDOW_METHOD, BenchContext, BenchVariant, all_variants, window_variant
from .cli import require_writable_file, require_writable_folder
from ..errors import InvalidInputError
from ..validation import require_number
from ..files import atomic_write_text
from .statistics import (FrechetBootstrap, basic_interval, bootstrap_indices, bootstrap_means, frechet_distance,
                         percentile_interval, prompts_to_resolve)
from ..metrics import mean_psnr, psnr, ssim
from .windows import window_fraction_for, window_guided_steps
from .reference.classifier import SceneClassifier, adherence
from .reference.model import ReferenceModel, TextConditioning, to_image
from .reference.scenes import Scene, random_scene, render
from .reference.weights import CLASSIFIER_PATH, MODEL_PATH, load_classifier, load_model
from .report import bench_plot, image_grid
from .sampling import SAMPLERS, sample
from ..step_predictor import complexity_correlation
from ..schedules import SCHEDULERS, make_sigmas


@dataclass(frozen=True)
class BenchSettings:
    steps: int = 20
    samples: int = 96
    held_out: int = 32
    scale: float = 5.0
    seed: int = 0
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    batch: int = 16
    methods: tuple[str, ...] = ()  # empty: all
    #: only the references, each method at its defaults, the guidance interval and the combinations
    defaults_only: bool = False
    resamples: int = 1000  # bootstrap resamples of the prompts (adherence, SSIM)
    frechet_resamples: int = 200  # the first of them, for the Fréchet distance (an eigensolve each)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "methods": list(self.methods)}


class _CountingModel:
    """Counts model evaluations per image (one per conditioning per call)."""

    def __init__(self, model: ReferenceModel):
        self.model, self.evaluations = model, 0

    def __call__(self, x, sigma, conds):
        self.evaluations += len(conds)
        return self.model(x, sigma, conds)


def format_duration(seconds: float) -> str:
    """``45s``, ``3m07s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(text: str, elapsed: float, done: int, total: int, width: int = 110) -> str:
    """The status line: elapsed time, an estimate of what is left, then ``text`` (cut to ``width``).

    The estimate assumes the images left cost what the images done cost on average, preparation
    included (calibrations and tunings run once, early): rough, and it grows when the bench adds
    the window rows it needs.
    """
    if done <= 0:
        left = "estimating what is left"
    elif done >= total:
        left = "finishing"
    else:
        left = f"about {format_duration(elapsed / done * (total - done))} left"
    return f"bench {format_duration(elapsed)} elapsed, {left} · {text}"[:width]


class Progress:
    """The bench's status line on stderr (rewritten in place): what runs, elapsed, what is left."""

    def __init__(self, total_images: int, stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter):
        self.total, self.done, self.stream, self.clock = total_images, 0, stream, clock
        self.began = clock()

    def add_work(self, images: int) -> None:
        self.total += images

    def advance(self, images: int) -> None:
        self.done += images

    def show(self, text: str) -> None:
        if self.stream is not None:
            line = progress_line(text, self.clock() - self.began, self.done, self.total)
            self.stream.write("\r" + line.ljust(110))
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")


def bench_scenes(settings: BenchSettings) -> list[Scene]:
    """The benchmark's prompts: training combinations first, then held-out ones."""
    rng = random.Random(settings.seed)
    trained = [random_scene(rng, held_out=False) for _ in range(settings.samples - settings.held_out)]
    return trained + [random_scene(rng, held_out=True) for _ in range(settings.held_out)]


def _scale(variant: BenchVariant, settings: BenchSettings) -> float:
    if not variant.guided:
        return 1.0
    return settings.scale if variant.scale is None else variant.scale


@torch.no_grad()
def run_variant(context: BenchContext, variant: BenchVariant, cond: TextConditioning, noise: torch.Tensor,
                report: str = "", progress: Progress | None = None) -> tuple[torch.Tensor, list[int], list[int], float]:
    """Sample every prompt with one variant: images in [0, 1], evaluations and steps per image, seconds.

    One-time preparation (calibration, step choice) happens before the clock starts; its time is in
    ``context.preparation_seconds``. A variant that chooses steps per prompt (AdaDiff) is sampled in
    groups of equal step count, each image with its own noise, so the result does not depend on
    the grouping. ``progress`` (optional) gets a line per batch, prefixed by ``report``.
    """
    model, settings, uncond = context.model, context.settings, context.uncond
    show = progress.show if progress is not None else (lambda text: None)
    show(f"{report}: preparing")
    variant.make_policies(context)
    count = noise.shape[0]
    steps_of = list(variant.choose_steps(context, cond)) if variant.choose_steps else [settings.steps] * count
    images = torch.zeros(count, 3, noise.shape[2], noise.shape[3])
    evaluations, seconds, done = [0] * count, 0.0, 0
    for steps in sorted(set(steps_of)):
        sigmas = context.sigmas_for(steps)
        group = [index for index, chosen in enumerate(steps_of) if chosen == steps]
        for start in range(0, len(group), settings.batch):
            rows = torch.tensor(group[start:start + settings.batch])
            counting = _CountingModel(variant.single_pass(context) if variant.single_pass else model)
            began = time.perf_counter()
            result = sample(counting, noise[rows], sigmas, cond.select(rows), uncond,
                            _scale(variant, settings), settings.sampler, variant.make_policies(context),
                            percent_to_sigma=model.schedule.percent_to_sigma)
            seconds += time.perf_counter() - began
            spent = result.run.evaluations_per_sample() if result.run is not None else [counting.evaluations] * len(rows)
            for row, value in zip(rows.tolist(), spent):
                evaluations[row] = value
            images[rows] = to_image(result.latent)
            done += len(rows)
            if progress is not None:
                progress.advance(len(rows))
            show(f"{report}: {done}/{count} images")
    return images, evaluations, steps_of, seconds


@dataclass
class Sampled:
    """One row's samples: the variant, its images and what they cost."""

    variant: BenchVariant
    images: torch.Tensor
    evaluations: list[int]
    steps: list[int]
    seconds: float

    @property
    def model_evals(self) -> float:
        return sum(self.evaluations) / len(self.evaluations)


def selected_variants(methods: tuple[str, ...], defaults_only: bool = False) -> list[BenchVariant]:
    """The rows to run: every variant, or those of ``methods``, and always CFG (the reference). With
    ``defaults_only``, of those only no guidance, CFG, each method's row at its node's defaults, the
    guidance interval and the combinations (``+``, but not the combination search's settings): about
    a third of the full run's work."""
    def core(variant: BenchVariant) -> bool:
        return (variant.defaults or variant.method in ("none", "guidance_interval")
                or ("+" in variant.method and not variant.search) or (variant.method == "cfg" and not variant.settings))

    return [v for v in all_variants() if (not methods or v.method in methods or v.method == "cfg")
            and (not defaults_only or core(v))]


def method_names() -> list[str]:
    """What ``--methods`` accepts, in table order: every variant's method, then the window baseline."""
    names = list(dict.fromkeys(variant.method for variant in all_variants()))
    return names + [WINDOW_METHOD]


#: rows that are references themselves: no window comparison
_REFERENCE_METHODS = ("none", "cfg", WINDOW_METHOD)


def matched_window_steps(row_evals: float, steps: int) -> int | None:
    """Guided steps of the window whose cost matches a row's evaluations per image (rounded); ``None``
    for a row cheaper than ``steps`` evaluations or dearer than ``2·steps`` (CFG): no window at the
    bench's step count costs that (AdaDiff's rows choose their own step counts)."""
    if not steps - 0.5 <= row_evals < 2 * steps + 0.5:
        return None
    return window_guided_steps(steps, window_fraction_for(steps, row_evals))


def _window_label(guided: int, steps: int) -> str:
    return window_variant(guided / steps).label


def run_bench(settings: BenchSettings, out: Path, model: ReferenceModel | None = None,
              classifier: SceneClassifier | None = None, stream: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the ``bench.json`` content. ``stream`` gets
    the progress line (``None``: quiet)."""
    model = model or load_model(MODEL_PATH)
    classifier = classifier or load_classifier(CLASSIFIER_PATH)
    variants = selected_variants(settings.methods, settings.defaults_only)
    scenes = bench_scenes(settings)
    prompts = [scene.prompt for scene in scenes]
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn(len(scenes), 3, 32, 32, generator=generator)
    sigmas = make_sigmas(model.schedule, settings.scheduler, settings.steps)
    with torch.no_grad():
        cond, uncond = model.encode(prompts), model.encode([""])
        real = torch.stack([render(scene, 7_000_003 + settings.seed * 1000 + i) for i, scene in enumerate(scenes)])
        real_features = classifier.embed(real)

    progress = Progress(len(variants) * len(scenes), stream)
    context = BenchContext(model, settings, sigmas, uncond, progress=progress.show)
    for variant in variants:  # a missing or stale file fails now, not after minutes of sampling
        if variant.load_files is not None:
            variant.load_files(context)
    outputs: dict[str, Sampled] = {}

    def run(variant: BenchVariant, index: int, count: int) -> None:
        outputs[variant.label] = Sampled(variant, *run_variant(context, variant, cond, noise,
                                                                f"[{index}/{count}] {variant.label}", progress))

    for index, variant in enumerate(variants):
        run(variant, index + 1, len(variants))

    # the fixed CFG window at every evaluation count the rows reached (and every step count if asked)
    windows = {matched_window_steps(sampled.model_evals, settings.steps) for sampled in outputs.values()
               if sampled.variant.method not in _REFERENCE_METHODS}
    if WINDOW_METHOD in settings.methods:
        windows |= set(range(1, settings.steps))
    # (no guided step is the "none" row, every step the "cfg" row: sampled again only where missing)
    windows = sorted(guided for guided in windows if guided is not None and guided < settings.steps
                     and (guided > 0 or "none" not in outputs))
    progress.add_work(len(windows) * len(scenes))
    for index, guided in enumerate(windows):
        run(window_variant(guided / settings.steps), len(variants) + index + 1, len(variants) + len(windows))
    progress.close()

    ordered = sorted(outputs.items(), key=lambda item: {"none": 0, "cfg": 0, WINDOW_METHOD: 1}.get(
        item[1].variant.method, 2))  # references first, then the windows, then the methods in table order
    rows = _rows(settings, ordered, scenes, classifier, real_features, context)
    result = {"settings": {**settings.to_dict(), "model": model.metadata.get("format") if hasattr(model, "metadata") else None,
                           "model_parameters": model.count_parameters(), "threads": torch.get_num_threads(),
                           "preparation_seconds": context.preparation_seconds,
                           "bootstrap": _resolution(rows, settings)},
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2))
    shown = slice(0, min(8, len(scenes)))
    image_grid([("real render", real[shown])] + [(label, sampled.images[shown]) for label, sampled in ordered],
               out / "grid.png", title="FastGuidance bench: same seeds, first prompts",
               column_titles=prompts[shown])
    bench_plot(rows, out / "plot.png",
               f"Adherence against cost ({settings.samples} prompts, {settings.steps} steps, {settings.sampler}, "
               f"cfg {settings.scale}; bars: 95% bootstrap CI)")
    return result


#: the compared metrics: bench.json key → per-prompt values of a row (None: a set statistic, Fréchet)
CI_METRICS = ("adherence", "ssim_to_cfg", "frechet")


def _bootstrap_seed(settings: BenchSettings) -> int:
    return 3_000_003 + settings.seed


def _rows(settings: BenchSettings, ordered: list[tuple[str, Sampled]], scenes: list[Scene],
          classifier: SceneClassifier, real_features: torch.Tensor, context: BenchContext) -> list[dict[str, Any]]:
    """One ``bench.json`` row per sampled variant, with paired bootstrap intervals (module docstring)."""
    outputs = dict(ordered)
    cfg_images = outputs["cfg"].images
    trained = slice(0, settings.samples - settings.held_out)
    held = slice(settings.samples - settings.held_out, settings.samples)
    indices = bootstrap_indices(len(scenes), settings.resamples, _bootstrap_seed(settings))
    frechet_bootstrap = FrechetBootstrap(real_features, indices[:settings.frechet_resamples])
    measured: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for label, sampled in ordered:
            scores = adherence(classifier, sampled.images, scenes)
            similarity = ssim(sampled.images, cfg_images)
            features = classifier.embed(sampled.images)
            measured[label] = {
                "scores": scores, "ssim": similarity, "features": features,
                "resampled": {"adherence": bootstrap_means(scores, indices), "ssim_to_cfg": bootstrap_means(similarity, indices),
                              "frechet": frechet_bootstrap.distances(features)},
            }

    for data in measured.values():
        data["estimate"] = {"adherence": float(data["scores"].mean()), "ssim_to_cfg": float(data["ssim"].mean()),
                            "frechet": frechet_distance(data["features"], real_features)}

    def interval(metric: str, label: str, other: str | None = None) -> list[float]:
        """Percentile intervals for the means; basic intervals for the Fréchet distance (its resamples are
        biased upwards: :func:`~fastguidance.metrics.basic_interval`)."""
        statistics = measured[label]["resampled"][metric]
        estimate = measured[label]["estimate"][metric]
        if other is not None:
            statistics = statistics - measured[other]["resampled"][metric]
            estimate -= measured[other]["estimate"][metric]
        return basic_interval(statistics, estimate) if metric == "frechet" else percentile_interval(statistics)

    def compared(label: str, other: str | None) -> dict[str, Any]:
        values = {}
        for metric in CI_METRICS:
            values[f"{metric}_ci95"] = interval(metric, label)
            values[f"{metric}_vs_cfg_ci95"] = interval(metric, label, "cfg")
            values[f"{metric}_vs_window_ci95"] = None if other is None else interval(metric, label, other)
        return values

    rows = []
    for label, sampled in ordered:
        variant, data = sampled.variant, measured[label]
        guided = None if variant.method in _REFERENCE_METHODS else matched_window_steps(sampled.model_evals, settings.steps)
        window = None
        if guided is not None:
            window = ("cfg" if guided == settings.steps else "none" if guided == 0 and "none" in outputs
                      else _window_label(guided, settings.steps))
        row = {
            "method": variant.method,
            "label": label,
            "settings": variant.settings,
            "model_evals": sampled.model_evals,
            "steps": sum(sampled.steps) / len(sampled.steps),
            "scale": _scale(variant, settings),
            "seconds": sampled.seconds,
            "speedup_vs_cfg": outputs["cfg"].seconds / sampled.seconds,
            "ssim_to_cfg": data["estimate"]["ssim_to_cfg"],
            "psnr_to_cfg": mean_psnr(psnr(sampled.images, cfg_images)),
            "adherence": data["estimate"]["adherence"],
            "adherence_trained": float(data["scores"][trained].mean()) if settings.samples > settings.held_out else None,
            "adherence_held_out": float(data["scores"][held].mean()) if settings.held_out else None,
            "frechet": data["estimate"]["frechet"],
            "window": window,
            "window_model_evals": None if window is None else outputs[window].model_evals,
            **compared(label, window),
            # AdaDiff's claim: more complex prompts (more named attributes) get more steps
            "steps_complexity_correlation": (complexity_correlation([scene.complexity for scene in scenes],
                                                                    sampled.steps) if variant.choose_steps else None),
            "defaults": variant.defaults,
            "tune_target": variant.tune_target,
            **(variant.extra(context) if variant.extra else {}),
        }
        row["vs_cfg"] = verdict(row["adherence_vs_cfg_ci95"]) if variant.method != "cfg" or variant.settings else None
        row["vs_window"] = None if window is None else verdict(row["adherence_vs_window_ci95"])
        rows.append(row)
    return rows


def verdict(interval: list[float] | None) -> str | None:
    """``better`` / ``worse`` where a difference's interval excludes zero, else ``no real difference``."""
    if interval is None:
        return None
    low, high = interval
    return "better" if low > 0 else "worse" if high < 0 else "no real difference"


#: the difference the bench should resolve (issue 21: "within 2 points of CFG")
RESOLVE_POINTS = 0.02


def _resolution(rows: list[dict[str, Any]], settings: BenchSettings) -> dict[str, Any]:
    """How precise the adherence differences to CFG are, and how many prompts resolving
    :data:`RESOLVE_POINTS` (and 1 point) would need (median half-width over the method rows)."""
    halves = sorted((high - low) / 2 for row in rows if row["method"] not in ("cfg", "none")
                    for low, high in [row["adherence_vs_cfg_ci95"]])
    result = {"seed": _bootstrap_seed(settings), "resamples": settings.resamples,
              "frechet_resamples": settings.frechet_resamples, "interval": "percentile, 95%, paired over prompts"}
    if halves:
        median = halves[len(halves) // 2]
        result.update({"median_half_width_vs_cfg": median,
                       "prompts_for_2_points": prompts_to_resolve(median, settings.samples, RESOLVE_POINTS),
                       "prompts_for_1_point": prompts_to_resolve(median, settings.samples, RESOLVE_POINTS / 2),
                       # an interval of ±2 points only excludes zero half the time when the true
                       # difference is 2 points; 80% of the time needs ±2 / (1 + z_0.8 / z_0.975)
                       "prompts_to_detect_2_points_80pct": prompts_to_resolve(
                           median, settings.samples, RESOLVE_POINTS / (1 + 0.8416 / 1.96))})
    return result


def _points(value: float) -> str:
    return f"{100 * value:.1f}"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}".replace("-", "−")


def _interval(interval: list[float] | None, signed: bool = False, marked: bool = False) -> str:
    """``[low, high]`` in points; with ``marked`` a trailing ``*`` when it excludes zero (a real difference)."""
    if interval is None:
        return "—"
    low, high = interval
    text = f"[{_signed(low)}, {_signed(high)}]" if signed else f"[{_points(low)}, {_points(high)}]"
    return text + ("*" if marked and (low > 0 or high < 0) else "")


def format_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (also used for docs/benchmarks.md). Adherence and its differences are in
    points (percent); ``*`` marks a difference whose 95% interval excludes zero. The Fréchet
    distance is shown with its difference to CFG: its own interval (``frechet_ci95`` in bench.json,
    a basic bootstrap interval) is one for the distance at unlimited prompts, which the 96-prompt
    estimate overstates (the estimator is biased upwards, more so on fewer distinct images)."""
    header = ("method", "evals/img", "steps", "seconds", "speedup", "SSIM→cfg [95% CI]", "PSNR→cfg",
              "adherence % [95% CI]", "Δ cfg [95% CI]", "window evals", "Δ window [95% CI]", "held-out %",
              "Fréchet", "Δ Fréchet cfg [95% CI]")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in result["rows"]:
        psnr_text = "inf" if math.isinf(row["psnr_to_cfg"]) else f"{row['psnr_to_cfg']:.1f}"
        held = "" if row["adherence_held_out"] is None else _points(row["adherence_held_out"])
        ssim_low, ssim_high = row["ssim_to_cfg_ci95"]
        frechet_low, frechet_high = row["frechet_vs_cfg_ci95"]
        frechet_delta = row["frechet"] - _row(result, "cfg")["frechet"]
        real = "*" if frechet_low > 0 or frechet_high < 0 else ""
        delta_cfg = ("" if row["vs_cfg"] is None else
                     f"{_signed(row['adherence'] - cfg_adherence(result))} {_interval(row['adherence_vs_cfg_ci95'], True, True)}")
        delta_window = ("—" if row["window"] is None else
                        f"{_signed(row['adherence'] - _row(result, row['window'])['adherence'])} "
                        f"{_interval(row['adherence_vs_window_ci95'], True, True)}")
        window_evals = "—" if row["window"] is None else f"{row['window_model_evals']:.0f}"
        lines.append(" | ".join([
            row["label"], f"{row['model_evals']:.1f}", f"{row['steps']:.1f}", f"{row['seconds']:.1f}",
            f"{row['speedup_vs_cfg']:.2f}x", f"{row['ssim_to_cfg']:.3f} [{ssim_low:.3f}, {ssim_high:.3f}]", psnr_text,
            f"{_points(row['adherence'])} {_interval(row['adherence_ci95'])}", delta_cfg, window_evals, delta_window,
            held, f"{row['frechet']:.0f}",
            "" if row["vs_cfg"] is None else f"{frechet_delta:+.0f} [{frechet_low:+.0f}, {frechet_high:+.0f}]{real}".replace("-", "−")]))
    return "\n".join(lines)


def _row(result: dict[str, Any], label: str) -> dict[str, Any]:
    return next(row for row in result["rows"] if row["label"] == label)


def cfg_adherence(result: dict[str, Any]) -> float:
    return _row(result, "cfg")["adherence"]


def resolution_text(result: dict[str, Any]) -> str:
    """What the intervals can resolve, and how many prompts 2 points (and 1) would need."""
    boot = result["settings"].get("bootstrap") or {}
    if "median_half_width_vs_cfg" not in boot:
        return ""
    samples = result["settings"]["samples"]
    return (f"\n`*`: the 95% interval (paired bootstrap over the {samples} prompts, {boot['resamples']} resamples, "
            f"{boot['frechet_resamples']} for Fréchet) excludes zero: a real difference; without `*` the difference is "
            f"within the noise of {samples} prompts. The median half-width of Δ cfg is ±{100 * boot['median_half_width_vs_cfg']:.1f} "
            f"points: resolving a 2-point difference needs about {boot['prompts_for_2_points']} prompts "
            f"(`--samples {boot['prompts_for_2_points']}`) for an interval of ±2 points and about "
            f"{boot.get('prompts_to_detect_2_points_80pct', '?')} to detect a true 2-point difference 4 times in 5; "
            f"1 point about {boot['prompts_for_1_point']}.\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchSettings()
    parser.add_argument("--methods", default="",
                        help="comma-separated methods to run (default: all). cfg always runs, and so do the CFG windows "
                             "matching the other rows' evaluations; naming cfg_window adds a window at every step count. "
                             f"Methods: {', '.join(method_names())}")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only no guidance, CFG, each method at its node's defaults, the guidance interval, the "
                             "combinations and their matched windows: about a third of the full run's work")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"sampling steps, {LIMITS['--steps'][0]}–{LIMITS['--steps'][1]}")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help=f"prompts, one image each ({LIMITS['--samples'][0]}–{LIMITS['--samples'][1]}); more prompts "
                             "narrow the intervals as 1/√N (the table says how many a 2-point difference needs)")
    parser.add_argument("--held-out", type=int, default=None,
                        help="of which held-out colour–shape combinations (default: a third of --samples, 32 of 96)")
    parser.add_argument("--scale", type=float, default=defaults.scale, help="CFG scale, 1–30 (1 = no guidance)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="prompts, noise and bootstrap seed")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=defaults.sampler, help="sampler")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.scheduler, help="noise schedule")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="images sampled together")
    parser.add_argument("--resamples", type=int, default=defaults.resamples,
                        help="bootstrap resamples of the prompts for the confidence intervals")
    parser.add_argument("--frechet-resamples", type=int, default=defaults.frechet_resamples,
                        help="of which used for the Fréchet distance's interval (one eigensolve per row and resample)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"),
                        help="output folder (created; checked writable before sampling)")
    parser.add_argument("--update-table", type=Path, metavar="FILE",
                        help="also replace the table between the bench markers of this Markdown file, for example "
                             "docs/benchmarks.md (checked before sampling)")


#: option → (lowest, highest, fix) of the numeric options; checked before any sampling
LIMITS: dict[str, tuple[float, float, str]] = {
    "--steps": (1, 1000, "use a whole number of sampling steps from 1 to 1000 (default 20)"),
    "--samples": (2, 100_000, "use at least 2 prompts (the Fréchet distance needs two images), at most 100000"),
    "--scale": (1.0, 30.0, "use a CFG scale from 1 (no guidance) to 30 (default 5)"),
    "--seed": (0, 2**63 - 1, "use a whole number from 0 to 2**63 − 1"),
    "--batch": (1, 4096, "use a whole number of images per batch from 1 to 4096 (default 16)"),
    "--resamples": (100, 100_000, "use from 100 to 100000 bootstrap resamples (default 1000)"),
    "--frechet-resamples": (20, 100_000, "use from 20 to 100000, at most --resamples (default 200)"),
}


def settings_from_options(options: argparse.Namespace) -> BenchSettings:
    """Check every option (ranges, cross-option rules, method names, files and folders) before any
    sampling; raise :class:`InvalidInputError` naming the first bad option and its fix."""
    for option, (low, high, fix) in LIMITS.items():
        value = getattr(options, option[2:].replace("-", "_"))
        require_number(option, value, low, high, fix, integer=option != "--scale")
    held_out = options.samples // 3 if options.held_out is None else options.held_out
    require_number("--held-out", held_out, 0, options.samples, f"use from 0 to --samples ({options.samples}) held-out "
                                                               f"prompts, or leave it out (a third of --samples)", integer=True)
    if options.frechet_resamples > options.resamples:
        raise InvalidInputError("--frechet-resamples", options.frechet_resamples,
                                f"use at most --resamples ({options.resamples}); they are the first of those resamples")
    methods = tuple(dict.fromkeys(m.strip() for m in options.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise InvalidInputError("--methods", ",".join(unknown), f"use names from: {', '.join(method_names())}")
    require_writable_folder("--out", options.out)
    if options.update_table is not None:
        require_writable_file("--update-table", options.update_table, must_exist=True)
        text = options.update_table.read_text(encoding="utf-8", errors="replace")
        if TABLE_START not in text or TABLE_END not in text:
            raise InvalidInputError("--update-table", str(options.update_table),
                                    f"the file has no {TABLE_START} … {TABLE_END} markers; add them where the table goes")
    return BenchSettings(options.steps, options.samples, held_out, options.scale, options.seed, options.sampler,
                         options.scheduler, options.batch, methods, options.defaults_only, options.resamples,
                         options.frechet_resamples)


def main(options: argparse.Namespace) -> None:
    settings = settings_from_options(options)
    torch.manual_seed(settings.seed)
    result = run_bench(settings, options.out)
    sys.stdout.write(format_table(result) + "\n" + resolution_text(result) + preparation_text(result))
    sys.stdout.write(f"wrote {options.out / 'bench.json'}, {options.out / 'grid.png'}, {options.out / 'plot.png'}\n")
    if options.update_table:
        update_table(options.update_table, result, command=" ".join(["python -m fastguidance bench"] + sys.argv[2:]))


TABLE_START, TABLE_END = "<!-- bench:start -->", "<!-- bench:end -->"


def preparation_text(result: dict[str, Any]) -> str:
    """One line per one-time preparation (calibrations), with its wall time; empty when there was none."""
    preparations = result["settings"].get("preparation_seconds") or {}
    return "".join(f"\nOne-time cost, not in the seconds above: {name}: {seconds:.1f} s.\n"
                   for name, seconds in preparations.items())


def update_table(path: Path, result: dict[str, Any], command: str) -> None:
    """Replace the text between the bench markers of ``path`` by the command and the table."""
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise InvalidInputError("--update-table", str(path), f"the file has no {TABLE_START} … {TABLE_END} markers")
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    settings = result["settings"]
    block = (f"{TABLE_START}\n`{command}` ({settings['samples']} prompts of which {settings['held_out']} held out, "
             f"{settings['steps']} steps {settings['sampler']}/{settings['scheduler']}, cfg {settings['scale']}, "
             f"{settings['threads']} CPU threads):\n\n{format_table(result)}\n{resolution_text(result)}"
             f"{preparation_text(result)}{TABLE_END}")
    atomic_write_text(path, before + block + after)
