"""FastGuidance beside the host's step caches (EasyCache, LazyCache): model evaluations really run.

Run with ComfyUI's Python environment (the table goes to the README, section "Beside caches and other
guidance nodes"):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/host_caches.py

On the tiny SD1.5 UNet of the real-host tests (two levels, 32 channels, seeded random weights, built with
ComfyUI's classes; nothing downloaded), KSampler, euler, normal, 10 steps, cfg 6, one image: each row counts
the batch evaluations the model really ran (a forward pre-hook on its first layer: EasyCache answers inside
the model call before that layer, LazyCache before the call) and reads what the run's summary says.
"Stock batching" rows disable the engine's one cond-first call (``_easycache_window``), i.e. what the pack
did before: EasyCache then decides on the uncond, which calls without it never contain. Counts are
deterministic; the weights are random, so no picture quality is measured here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "tests" / "comfy"))
import host_models  # noqa: E402  (the test models, one place for tests and benchmarks)

STEPS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    logging.disable(logging.WARNING)
    nodes, pack_name = host_models.load_pack(comfyui_path, PACK_DIR)
    engine_patch = sys.modules[pack_name + ".nodes.engine_patch"]
    import comfy.utils
    from comfy_api.latest import _io

    comfy.utils.PROGRESS_BAR_ENABLED = False

    def node(node_id, *args, **kwargs):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        hidden = {"hidden_inputs": {}} if hasattr(_io.HiddenHolder, "from_v3_data") else {}
        return cls.PREPARE_CLASS_CLONE(hidden).execute(*args, **kwargs)[0]

    def defaults(node_id):
        inputs = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        return {name: spec[1]["default"] for section in ("required", "optional")
                for name, spec in inputs.get(section, {}).items() if len(spec) > 1 and "default" in spec[1]}

    methods = {
        "AG, paper rule (0.991, noise)": lambda m: node("FastGuidance_AdaptiveGuidance", m, 0.991, 0.0, 1.0, "cond_only",
                                                       cosine_space="noise", convergence=1.0),
        "AG, defaults": lambda m: node("FastGuidance_AdaptiveGuidance", m, **defaults("FastGuidance_AdaptiveGuidance")),
        "CompG, defaults": lambda m: node("FastGuidance_CompressGuidance", m, **defaults("FastGuidance_CompressGuidance")),
    }
    base = host_models.patcher(host_models.tiny_model(seed=0))
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 64, generator=generator) * 3.0, {}]]
    negative = [[torch.randn(1, 77, 64, generator=generator) * 0.1, {}]]
    rows: list[int] = []
    base.model.diffusion_model.input_blocks[0][0].register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    runs = []
    original_report = engine_patch._report
    engine_patch._report = lambda config, host_run, name: runs.append(host_run.run)

    def evaluations(model) -> tuple[int, str]:
        rows.clear()
        runs.clear()
        nodes.common_ksampler(model, 3, STEPS, 6.0, "euler", "normal", positive, negative,
                              {"samples": torch.zeros(1, 4, 8, 8)})
        summary = runs[-1].finish() if runs else None
        said = "" if summary is None else summary.text("FastGuidance")
        return sum(rows), said.split(": ", 1)[-1]

    print(f"ComfyUI {comfyui_path}: KSampler euler/normal, {STEPS} steps, cfg 6, tiny SD1.5 UNet\n")
    print("| run | EasyCache start | model evaluations (of 20) | FastGuidance's summary |")
    print("| --- | --- | --- | --- |")
    for start in (0.15, 0.0):
        easycache = lambda m: node("EasyCache", m, 0.2, start, 0.95, False)  # noqa: E731,B023
        print(f"| EasyCache alone | {start} | {evaluations(easycache(base))[0]} | |")
        for name, apply in methods.items():
            if start == 0.15:
                print(f"| {name} alone | | {evaluations(apply(base))[0]} | |")
            for order, model in (("EasyCache → method", apply(easycache(base))), ("method → EasyCache", easycache(apply(base)))):
                count, said = evaluations(model)
                print(f"| {name}, {order} | {start} | **{count}** | {said} |")
            window = engine_patch._easycache_window
            engine_patch._easycache_window = lambda *args: None
            try:
                count, said = evaluations(easycache(apply(base)))
            finally:
                engine_patch._easycache_window = window
            print(f"| {name} + EasyCache, stock batching | {start} | {count} | {said} |")
    lazycache = lambda m: node("LazyCache", m, 0.2, 0.15, 0.95, False)  # noqa: E731
    print(f"| LazyCache alone | | {evaluations(lazycache(base))[0]} | |")
    for name, apply in methods.items():
        for order, model in (("LazyCache → method", apply(lazycache(base))), ("method → LazyCache", lazycache(apply(base)))):
            count, said = evaluations(model)
            print(f"| {name}, {order} | | **{count}** | {said} |")
    engine_patch._report = original_report


if __name__ == "__main__":
    main()
