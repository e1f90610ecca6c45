"""Which initialisation of the adapters' output layer trains best, on the bundled reference model.

    .venv/bin/python benchmarks/agd_init.py [--steps 200]

AGD (Jensen et al., arXiv 2503.07274) reports that Xavier initialisation of the adapters beat zero
initialisation. Our adapters are Xavier-initialised with a small output projection (``0.1×`` Xavier
gain), so the untrained adapted pass starts near the base model's conditional prediction. This
script trains the same adapters on the same CFG-guided trajectories with the output projection
initialised three ways (zero, ``0.1×`` Xavier, full Xavier) and reports the distillation loss on
held-out trajectory steps before and after training, plus peak memory and time per step on this
machine. Nothing here is a timed test; the README quotes its output.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastguidance.guidance_adapters.adapters import GuidanceAdapters, distillation_loss  # noqa: E402
from fastguidance.research.reference.adapters import (Trajectories, adapter_spec, collect_trajectories,
                                                      # noqa: E402                                                       single_pass_noise,
                                                      train_adapters, training_prompts)
from fastguidance.research.reference.weights import MODEL_PATH, load_model  # noqa: E402

INITS = {"zero": 0.0, "xavier_0.1 (ours)": 0.1, "xavier_1.0": 1.0}


def held_out_loss(model, adapters: GuidanceAdapters, data: Trajectories) -> float:
    texts = model.encode(data.prompts).select(data.prompt)
    with torch.no_grad():
        prediction = single_pass_noise(model, adapters, data.x.float(), data.sigma, texts, data.omega)
    return float(distillation_loss(prediction, data.target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = load_model(MODEL_PATH)
    began = time.perf_counter()
    train = collect_trajectories(model, training_prompts(args.prompts, seed=0), steps=20, seed=0)
    held_out = collect_trajectories(model, training_prompts(16, seed=7), steps=20, seed=7)
    collected = time.perf_counter() - began
    results = {"collect_seconds": collected, "train_examples": len(train), "train_bytes": train.size_bytes()}
    for name, gain in INITS.items():
        torch.manual_seed(0)
        adapters = GuidanceAdapters(adapter_spec(model))
        with torch.no_grad():
            for module in adapters.adapters.values():
                if gain == 0.0:
                    torch.nn.init.zeros_(module.out.weight)
                else:
                    torch.nn.init.xavier_uniform_(module.out.weight, gain=gain)
        before = held_out_loss(model, adapters, held_out)
        started = time.perf_counter()
        losses = train_adapters(model, adapters, train, steps=args.steps, batch=64, seed=0)
        seconds = time.perf_counter() - started
        results[name] = {"held_out_loss_before": before, "held_out_loss_after": held_out_loss(model, adapters, held_out),
                         "train_loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
                         "seconds_per_step": seconds / args.steps}
        print(name, json.dumps(results[name]), file=sys.stderr)
    results["peak_process_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["parameters"] = GuidanceAdapters(adapter_spec(model)).count_parameters()
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
