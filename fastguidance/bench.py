"""``python -m fastguidance bench``: every method against CFG on the bundled reference model.

Same prompts (training combinations and held-out ones), same seeds, one run. Per method variant:
model evaluations per image, wall time and speed-up over CFG, SSIM and PSNR to the CFG image of the
same seed (kornia), adherence (the independent classifier's share of the prompt's attributes seen
in the image) and a Fréchet distance to real renders of the same prompts (classifier features).
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
from typing import Any

import torch

from .bench_methods import BenchContext, BenchVariant, all_variants
from .files import atomic_write_text
from .metrics import frechet_distance, mean_psnr, psnr, ssim
from .reference.classifier import SceneClassifier, adherence
from .reference.model import ReferenceModel, TextConditioning, to_image
from .reference.scenes import Scene, random_scene, render
from .reference.weights import CLASSIFIER_PATH, MODEL_PATH, load_classifier, load_model
from .report import image_grid, quality_plot
from .sampling import SAMPLERS, sample
from .step_predictor import complexity_correlation
from .schedules import SCHEDULERS, make_sigmas


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

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "methods": list(self.methods)}


class _CountingModel:
    """Counts model evaluations per image (one per conditioning per call)."""

    def __init__(self, model: ReferenceModel):
        self.model, self.evaluations = model, 0

    def __call__(self, x, sigma, conds):
        self.evaluations += len(conds)
        return self.model(x, sigma, conds)


def _progress(message: str) -> None:
    sys.stderr.write("\r" + message[:110].ljust(110))
    sys.stderr.flush()


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
                report: str = "") -> tuple[torch.Tensor, list[int], list[int], float]:
    """Sample every prompt with one variant: images in [0, 1], evaluations and steps per image, seconds.

    One-time preparation (calibration, step choice) happens before the clock starts; its time is in
    ``context.preparation_seconds``. A variant that chooses steps per prompt (AdaDiff) is sampled in
    groups of equal step count, each image with its own noise, so the result does not depend on
    the grouping.
    """
    model, settings, uncond = context.model, context.settings, context.uncond
    _progress(f"bench: {report} preparing")
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
            _progress(f"bench: {report} {done}/{count} images")
    return images, evaluations, steps_of, seconds


def run_bench(settings: BenchSettings, out: Path, model: ReferenceModel | None = None,
              classifier: SceneClassifier | None = None) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the ``bench.json`` content."""
    model = model or load_model(MODEL_PATH)
    classifier = classifier or load_classifier(CLASSIFIER_PATH)
    variants = [v for v in all_variants() if not settings.methods or v.method in settings.methods or v.method == "cfg"]
    scenes = bench_scenes(settings)
    prompts = [scene.prompt for scene in scenes]
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn(len(scenes), 3, 32, 32, generator=generator)
    sigmas = make_sigmas(model.schedule, settings.scheduler, settings.steps)
    with torch.no_grad():
        cond, uncond = model.encode(prompts), model.encode([""])
        real = torch.stack([render(scene, 7_000_003 + settings.seed * 1000 + i) for i, scene in enumerate(scenes)])
        real_features = classifier.embed(real)

    context = BenchContext(model, settings, sigmas, uncond)
    for variant in variants:  # a missing or stale file fails now, not after minutes of sampling
        if variant.load_files is not None:
            variant.load_files(context)
    outputs: dict[str, tuple[BenchVariant, torch.Tensor, list[int], list[int], float]] = {}
    for index, variant in enumerate(variants):
        outputs[variant.label] = (variant, *run_variant(context, variant, cond, noise,
                                                         f"[{index + 1}/{len(variants)}] {variant.label}"))
    sys.stderr.write("\n")

    _, cfg_images, _, _, cfg_seconds = outputs["cfg"]
    trained = slice(0, settings.samples - settings.held_out)
    held = slice(settings.samples - settings.held_out, settings.samples)
    rows = []
    with torch.no_grad():
        for label, (variant, images, evaluations, steps_used, seconds) in outputs.items():
            scores = adherence(classifier, images, scenes)
            rows.append({
                "method": variant.method,
                "label": label,
                "settings": variant.settings,
                "model_evals": sum(evaluations) / len(evaluations),
                "steps": sum(steps_used) / len(steps_used),
                "scale": _scale(variant, settings),
                "seconds": seconds,
                "speedup_vs_cfg": cfg_seconds / seconds,
                "ssim_to_cfg": float(ssim(images, cfg_images).mean()),
                "psnr_to_cfg": mean_psnr(psnr(images, cfg_images)),
                "adherence": float(scores.mean()),
                "adherence_trained": float(scores[trained].mean()),
                "adherence_held_out": float(scores[held].mean()) if settings.held_out else None,
                "frechet": frechet_distance(classifier.embed(images), real_features),
                # AdaDiff's claim: more complex prompts (more named attributes) get more steps
                "steps_complexity_correlation": (complexity_correlation([scene.complexity for scene in scenes],
                                                                        steps_used) if variant.choose_steps else None),
                "defaults": variant.defaults,
                "tune_target": variant.tune_target,
                **(variant.extra(context) if variant.extra else {}),
            })
    result = {"settings": {**settings.to_dict(), "model": model.metadata.get("format") if hasattr(model, "metadata") else None,
                           "model_parameters": model.count_parameters(), "threads": torch.get_num_threads(),
                           "preparation_seconds": context.preparation_seconds},
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2))
    shown = slice(0, min(10, len(scenes)))
    image_grid([("real render", real[shown])] + [(label, images[shown]) for label, (_, images, *_) in outputs.items()],
               out / "grid.png", title="FastGuidance bench: same seeds, first prompts")
    quality_plot([{"label": row["label"], "x": row["model_evals"], "y": row["adherence"]} for row in rows],
                 out / "plot.png", "model evaluations per image", "adherence (share of named attributes)",
                 f"Adherence against cost ({settings.steps} steps, {settings.sampler}, cfg {settings.scale})")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width text table (also used for the README)."""
    header = ("method", "evals/img", "steps", "seconds", "speedup", "SSIM→cfg", "PSNR→cfg", "adherence", "held-out",
              "Fréchet")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in result["rows"]:
        psnr_text = "inf" if math.isinf(row["psnr_to_cfg"]) else f"{row['psnr_to_cfg']:.1f}"
        held = "" if row["adherence_held_out"] is None else f"{row['adherence_held_out']:.3f}"
        lines.append(" | ".join([row["label"], f"{row['model_evals']:.1f}", f"{row['steps']:.1f}", f"{row['seconds']:.1f}",
                                 f"{row['speedup_vs_cfg']:.2f}x", f"{row['ssim_to_cfg']:.3f}", psnr_text,
                                 f"{row['adherence']:.3f}", held, f"{row['frechet']:.2f}"]))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchSettings()
    parser.add_argument("--methods", default="", help="comma-separated methods to run (default: all; cfg always runs)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--samples", type=int, default=defaults.samples, help="prompts (one image each)")
    parser.add_argument("--held-out", type=int, default=defaults.held_out, help="of which held-out combinations")
    parser.add_argument("--scale", type=float, default=defaults.scale, help="CFG scale")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=defaults.sampler)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.scheduler)
    parser.add_argument("--batch", type=int, default=defaults.batch, help="images sampled together")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder")
    parser.add_argument("--update-readme", type=Path, metavar="README",
                        help="also replace the table between the bench markers of this file")


def main(options: argparse.Namespace) -> None:
    if not 0 <= options.held_out <= options.samples or options.samples < 1:
        raise SystemExit(f"--samples must be at least 1 and --held-out between 0 and --samples (got {options.samples}, "
                         f"{options.held_out})")
    methods = tuple(m.strip() for m in options.methods.split(",") if m.strip())
    known = {variant.method for variant in all_variants()}
    unknown = sorted(set(methods) - known)
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settings = BenchSettings(options.steps, options.samples, options.held_out, options.scale, options.seed,
                             options.sampler, options.scheduler, options.batch, methods)
    torch.manual_seed(options.seed)
    result = run_bench(settings, options.out)
    sys.stdout.write(format_table(result) + "\n" + preparation_text(result))
    sys.stdout.write(f"wrote {options.out / 'bench.json'}, {options.out / 'grid.png'}, {options.out / 'plot.png'}\n")
    if options.update_readme:
        update_readme(options.update_readme, result, command=" ".join(["python -m fastguidance bench"] + sys.argv[2:]))


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def preparation_text(result: dict[str, Any]) -> str:
    """One line per one-time preparation (calibrations), with its wall time; empty when there was none."""
    preparations = result["settings"].get("preparation_seconds") or {}
    return "".join(f"\nOne-time cost, not in the seconds above: {name}: {seconds:.1f} s.\n"
                   for name, seconds in preparations.items())


def update_readme(path: Path, result: dict[str, Any], command: str) -> None:
    """Replace the text between the bench markers of ``path`` by the command and the table."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"--update-readme: {path} has no {README_START} … {README_END} markers")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    settings = result["settings"]
    block = (f"{README_START}\n`{command}` ({settings['samples']} prompts of which {settings['held_out']} held out, "
             f"{settings['steps']} steps {settings['sampler']}/{settings['scheduler']}, cfg {settings['scale']}, "
             f"{settings['threads']} CPU threads):\n\n{format_table(result)}\n{preparation_text(result)}{README_END}")
    atomic_write_text(path, before + block + after)
