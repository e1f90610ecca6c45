"""Integration benchmark in the real host: engine overhead and AG wall time against CFG.

Run with ComfyUI's Python environment (the numbers go to the README and the closing note):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/host_overhead.py

Measures, on the SD1.5-detectable test UNet (one level, 320 channels, context 768, 26 M parameters, built with
ComfyUI's classes and random seeded weights; nothing is downloaded) at a 64×64 latent:

1. the engine's per-call overhead (plan + complete with the cosine, exactly what the patched slot
   adds to a FULL step) as a fraction of one model evaluation (a cond+uncond batch of 2, as CFG
   runs it), timed directly, and end to end (patched KSampler that never cuts vs stock KSampler);
2. the wall-time ratio AG/CFG in KSampler against the ratio of model evaluations.
Timings are medians of repeated runs on whatever machine runs it (CPU here).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "tests" / "comfy"))
import host_models  # noqa: E402  (the test models, one place for tests and benchmarks)


def conditioning(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    positive = torch.randn(1, 77, 768, generator=generator) * 3.0
    negative = torch.randn(1, 77, 768, generator=generator) * 0.1
    return [[positive, {}]], [[negative, {}]]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = a 512×512 image)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args()
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    logging.basicConfig(level=logging.WARNING)
    nodes, pack_module = host_models.load_pack(comfyui_path, PACK_DIR)
    engine_patch = sys.modules[pack_module + ".nodes.engine_patch"]
    engine = sys.modules[pack_module + ".fastguidance.engine"]
    adaptive = sys.modules[pack_module + ".fastguidance.adaptive_guidance"]
    torch.set_grad_enabled(False)

    base_model = host_models.sd15_detectable_model()
    parameters = sum(p.numel() for p in base_model.parameters())
    model = host_models.patcher(base_model)
    positive, negative = conditioning()
    size = options.latent
    latent = {"samples": torch.zeros(1, 4, size, size)}
    patch_node = nodes.NODE_CLASS_MAPPINGS["FastGuidance_AdaptiveGuidance"].PREPARE_CLASS_CLONE({})

    def ksampler(patched_model, cfg=6.0):
        return nodes.common_ksampler(patched_model, 3, options.steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]

    # -- 1. one model evaluation, and the engine's work on a FULL call, at this latent size --
    import comfy.samplers

    x = torch.randn(1, 4, size, size)
    sigma = torch.tensor([5.0])
    calls, cond_only_calls = [], []
    original_calc = comfy.samplers.calc_cond_batch

    # one CFG model evaluation = what calc_cond_batch does for [cond, uncond] (one batch of 2), and
    # what a skipped step costs instead: [cond] alone (batch 1)
    def evaluation_probe(args):
        def evaluate(conds):
            return original_calc(args["model"], conds, args["input"], args["sigma"], args["model_options"])

        calls.append(timed(lambda: evaluate(args["conds"]), options.repeats))
        cond_only_calls.append(timed(lambda: evaluate(args["conds"][:1]), options.repeats))
        return evaluate(args["conds"])

    probe_model = model.clone()
    probe_model.set_model_sampler_calc_cond_batch_function(evaluation_probe)
    nodes.common_ksampler(probe_model, 3, 2, 6.0, "euler", "normal", positive, negative, latent)
    evaluation_seconds = statistics.median(calls)
    cond_only_seconds = statistics.median(cond_only_calls)

    run = engine.GuidanceRun([adaptive.AdaptiveGuidance(threshold=0.991)], [14.6, 5.0, 1.0, 0.0] * 1000, batch_size=1)
    cond_pred, uncond_pred = torch.randn(1, 4, size, size), torch.randn(1, 4, size, size)

    def engine_call():
        plan = run.plan(sigma)
        run.complete(plan, x, cond_pred, uncond_pred)

    for _ in range(20):
        engine_call()
    iterations = 2000
    start = time.perf_counter()
    for _ in range(iterations):
        engine_call()
    engine_seconds = (time.perf_counter() - start) / iterations

    # -- 2. the runs: stock CFG, a patch that never cuts (same evaluations: end-to-end overhead) and
    # AG at a threshold this random-weight UNet reaches (0.991 if it does, else its median cosine) --
    never = patch_node.execute(model, 1.0001, 0.0, 1.0, "cond_only")[0]
    captured = []
    original_report = engine_patch._report
    engine_patch._report = lambda config, host_run, name: (captured.append(host_run.run), original_report(config, host_run, name))
    try:
        ksampler(never)  # also warms up
        captured[-1].finish()
        cosines = [record.cosine[0] for record in captured[-1].records]
        threshold = 0.991 if max(cosines) >= 0.991 else sorted(cosines)[len(cosines) // 2]
        ag_model = patch_node.execute(model, threshold, 0.0, 1.0, "cond_only")[0]
        ksampler(ag_model)
        summary = captured[-1].finish()
        # interleaved repeats, so that drift in the machine's speed hits every variant alike
        times = {"cfg": [], "never": [], "ag": []}
        for _ in range(options.repeats):
            for name, variant in (("cfg", model), ("never", never), ("ag", ag_model)):
                times[name].append(timed(lambda: ksampler(variant), 1))
    finally:
        engine_patch._report = original_report
    stock_seconds, never_seconds, ag_seconds = (statistics.median(times[name]) for name in ("cfg", "never", "ag"))
    end_to_end_overhead = (never_seconds - stock_seconds) / options.steps / evaluation_seconds
    evaluation_ratio = summary.evaluations / summary.cfg_evaluations
    wall_ratio = ag_seconds / stock_seconds

    results = {
        "device": str(model.load_device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "unet_parameters": parameters, "latent": [1, 4, size, size], "steps": options.steps,
        "model_evaluation_seconds": evaluation_seconds,
        "engine_call_seconds": engine_seconds,
        "engine_overhead_fraction": engine_seconds / evaluation_seconds,
        "end_to_end_overhead_fraction": end_to_end_overhead,
        "cosines": cosines, "ag_threshold": threshold,
        "cfg_seconds": stock_seconds, "ag_seconds": ag_seconds,
        "ag_evaluations": summary.evaluations, "cfg_evaluations": summary.cfg_evaluations,
        "cond_only_call_seconds": cond_only_seconds,
        # what the wall ratio should be given the measured cost of a full and of a cond-only call
        "expected_wall_ratio": (summary.calls - summary.uncond_skipped + summary.uncond_skipped * cond_only_seconds
                                / evaluation_seconds) / summary.calls,
        "evaluation_ratio": evaluation_ratio, "wall_ratio": wall_ratio,
        "wall_vs_evaluation_gap": wall_ratio / evaluation_ratio - 1.0,
    }
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
