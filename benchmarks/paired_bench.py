"""The bench's own set-up, for research scripts that compare rows with its CFG row, paired over prompts.

``benchmarks/agd_ablation.py`` and ``benchmarks/linear_ag_40.py`` sample the bench's prompts with its
noise, schedule and classifier (``fastguidance.research.bench``), score each variant against CFG's scores on the
same prompts (cached beside the results: the CFG row is the slow part) and report the paired difference
with the bench's bootstrap interval.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastguidance.research.bench import BenchSettings, _bootstrap_seed, bench_scenes, run_variant  # noqa: E402
from fastguidance.research.bench_methods import BenchContext, BenchVariant  # noqa: E402
from fastguidance.research.statistics import bootstrap_indices, bootstrap_means, percentile_interval  # noqa: E402
from fastguidance.research.reference.classifier import adherence  # noqa: E402
from fastguidance.research.reference.weights import CLASSIFIER_PATH, MODEL_PATH, load_classifier, load_model  # noqa: E402
from fastguidance.schedules import make_sigmas  # noqa: E402


@dataclass
class PairedBench:
    settings: BenchSettings
    scenes: list
    context: BenchContext
    cond: object
    noise: torch.Tensor
    classifier: object
    cfg_scores: torch.Tensor
    indices: torch.Tensor

    @property
    def model(self):
        return self.context.model

    def scores(self, variant: BenchVariant) -> tuple[torch.Tensor, list[int]]:
        """Adherence per prompt of ``variant`` and its model evaluations per image."""
        images, evaluations, _, _ = run_variant(self.context, variant, self.cond, self.noise)
        return adherence(self.classifier, images, self.scenes), evaluations

    def compared(self, scores: torch.Tensor) -> dict:
        """Mean adherence, CFG's, their difference and its paired 95% interval (the bench's bootstrap)."""
        low, high = percentile_interval(bootstrap_means(scores, self.indices) - bootstrap_means(self.cfg_scores, self.indices))
        return {"adherence": float(scores.mean()), "cfg_adherence": float(self.cfg_scores.mean()),
                "delta_vs_cfg": float(scores.mean() - self.cfg_scores.mean()), "delta_ci95": [low, high]}


def paired_bench(samples: int, out: Path) -> PairedBench:
    """The bench at ``samples`` prompts (a third held out, as its default), CFG's scores cached beside ``out``."""
    torch.set_num_threads(1)
    model, classifier = load_model(MODEL_PATH), load_classifier(CLASSIFIER_PATH)
    settings = BenchSettings(samples=samples, held_out=samples // 3)
    scenes = bench_scenes(settings)
    noise = torch.randn(len(scenes), 3, 32, 32, generator=torch.Generator().manual_seed(settings.seed))
    sigmas = make_sigmas(model.schedule, settings.scheduler, settings.steps)
    with torch.no_grad():
        cond, uncond = model.encode([s.prompt for s in scenes]), model.encode([""])
    context = BenchContext(model, settings, sigmas, uncond)
    bench = PairedBench(settings, scenes, context, cond, noise, classifier, torch.empty(0),
                        bootstrap_indices(len(scenes), settings.resamples, _bootstrap_seed(settings)))
    cache = out.with_name(out.stem + f"_cfg{samples}.pt")
    if cache.exists():
        bench.cfg_scores = torch.load(cache)
    else:
        bench.cfg_scores = bench.scores(BenchVariant("cfg"))[0]
        torch.save(bench.cfg_scores, cache)
    return bench
