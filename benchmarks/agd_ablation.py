"""Where AGD's gap to CFG comes from on the reference model: small paired ablations of the adapter recipe.

Each run trains adapters from the same seed with one factor changed from a base recipe (training
steps, trajectory prompts, adapter width, ω range, learning rate) and evaluates them exactly as the
bench's ``agd`` row does (:func:`fastguidance.research.bench.run_variant` with the adapted single-pass model at
the bench's scale), on the bench's own prompts and noise, against the bench's CFG row on the same
prompts (paired bootstrap, the bench's seeds). It also reports the distillation loss on held-out
trajectories (prompts of their own seed), to tell fitting from generalisation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agd_ablation.py --runs shipped,base,steps2x --samples 192

Run names: ``shipped`` (the shipped file, no training), ``base`` and the factors in :data:`RUNS`.
Results are appended to ``--out`` (JSON lines), one line per run, so runs can be split across calls;
the CFG images of the prompt set are cached next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_bench import paired_bench  # noqa: E402  (puts the project on the path)

from fastguidance.guidance_adapters.adapters import GuidanceAdapters, distillation_loss, load_adapters  # noqa: E402
from fastguidance.research.bench_methods import BenchVariant  # noqa: E402
from fastguidance.research.reference.adapters import (SinglePassModel, adapter_spec, collect_trajectories,
                                                      # noqa: E402                                                       single_pass_noise,
                                                      train_adapters, training_prompts)
from fastguidance.research.reference.weights import ADAPTERS_PATH  # noqa: E402

#: the base recipe: the shipped one (``train_reference_adapters`` defaults) at half its steps
BASE = {"train_steps": 300, "prompts": 128, "hidden": 32, "omega_range": (1.0, 8.0), "lr": 2e-3, "batch": 64}
#: one factor changed from BASE per run
RUNS = {
    "base": {},
    "steps2x": {"train_steps": 600},  # = the shipped recipe
    "data2x": {"prompts": 256},
    "width2x": {"hidden": 64},
    "omega12": {"omega_range": (1.0, 12.0)},
    "omega5": {"omega_range": (5.0, 5.0)},  # a specialist at the bench's scale: what ω-conditioning costs
    "lr1e-4": {"lr": 1e-4},  # the paper's learning rate
    "lr5e-4": {"lr": 5e-4},
    "steps4x": {"train_steps": 1200},
    "width2x_data2x_steps2x": {"hidden": 64, "prompts": 256, "train_steps": 600},
}


def train(model, recipe: dict, seed: int = 0) -> tuple[GuidanceAdapters, dict]:
    """As :func:`fastguidance.research.reference.adapters.train_reference_adapters`, with the learning rate exposed."""
    began = time.perf_counter()
    torch.manual_seed(seed)
    data = collect_trajectories(model, training_prompts(recipe["prompts"], seed), recipe["omega_range"], 20, seed=seed)
    adapters = GuidanceAdapters(adapter_spec(model, "cross_attention", recipe["hidden"]))
    losses = train_adapters(model, adapters, data, recipe["train_steps"], recipe["batch"], lr=recipe["lr"], seed=seed)
    return adapters, {"trajectory_samples": len(data), "train_seconds": time.perf_counter() - began,
                      "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
                      "parameters": adapters.count_parameters()}


@torch.no_grad()
def held_out_loss(model, adapters, data) -> float:
    total = 0.0
    texts = model.encode(data.prompts)
    for start in range(0, len(data), 128):
        rows = torch.arange(start, min(start + 128, len(data)))
        prediction = single_pass_noise(model, adapters, data.x[rows].float(), data.sigma[rows],
                                       texts.select(data.prompt[rows]), data.omega[rows])
        total += distillation_loss(prediction, data.target[rows]).item() * len(rows)
    return total / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="shipped", help=f"comma-separated: shipped, {', '.join(RUNS)}")
    parser.add_argument("--samples", type=int, default=96, help="bench prompts (the bench's own set for this count)")
    parser.add_argument("--out", type=Path, default=Path("agd_ablation.jsonl"))
    parser.add_argument("--save-dir", type=Path, help="keep each run's adapters here")
    options = parser.parse_args()
    bench = paired_bench(options.samples, options.out)
    model, settings = bench.model, bench.settings
    # held-out trajectories: prompts and noise of their own seed, at the bench's scale (what the row samples)
    validation = collect_trajectories(model, training_prompts(32, seed=99), (settings.scale, settings.scale), 20, seed=99)
    for name in [r.strip() for r in options.runs.split(",") if r.strip()]:
        if name == "shipped":
            adapters, metadata = load_adapters(ADAPTERS_PATH)
            recipe, info = {k: metadata.get(k) for k in ("train_steps", "prompts", "omega_range", "batch")}, {}
            recipe["hidden"] = metadata["spec"]["hidden"]
        else:
            recipe = {**BASE, **RUNS[name]}
            adapters, info = train(model, recipe)
            if options.save_dir:
                from fastguidance.guidance_adapters.adapters import save_adapters
                options.save_dir.mkdir(parents=True, exist_ok=True)
                save_adapters(adapters, options.save_dir / f"{name}.safetensors", {**info, "recipe": str(recipe)},
                              overwrite=True)
        adapters.eval()
        variant = BenchVariant("agd", guided=False, single_pass=lambda _: SinglePassModel(model, adapters, settings.scale))
        scores = bench.scores(variant)[0]
        row = {"run": name, "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}, **info,
               "held_out_loss": held_out_loss(model, adapters, validation), "samples": options.samples,
               **bench.compared(scores), "scores": [round(v, 4) for v in scores.tolist()]}
        print(json.dumps({k: v for k, v in row.items() if k != "scores"}), flush=True)
        with options.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
