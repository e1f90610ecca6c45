"""What the engine keeps per run on a video latent, measured on the CPU with the core alone (issue 18 §2).

A stub conditional model of Wan 2.1's latent size (81 frames at 480p: 16×21×60×104, fp32 as ComfyUI
hands predictions to the pack, ``BaseModel.apply_model`` computes denoised in fp32) is sampled with the
core's Euler sampler under each method. Two figures per method:

- **kept between calls**: bytes of every tensor the run holds after a call (LinearAG's history, Compress
  Guidance's reuse cache, AG's pending cosines, masks), counted once per storage, largest over the run.
  Tensors the host made (the model's predictions LinearAG keeps in its history) count: the run keeps them
  alive after the sampler would have freed them;
- **peak during a call**: the most bytes the engine itself allocated and held at once inside ``plan`` and
  ``complete`` (cosine temporaries, estimates, the reuse guidance), on top of what it keeps; traced with a
  ``TorchDispatchMode`` that follows every storage an operator creates until it is freed.

    OMP_NUM_THREADS=1 python benchmarks/engine_memory.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastguidance.engine import GuidanceRun  # noqa: E402
from fastguidance.adaptive_guidance import AdaptiveGuidance  # noqa: E402
from fastguidance.compress_guidance import CompressGuidance
from fastguidance.linear_ag import LinearAG, LinearAGCalibration  # noqa: E402
from fastguidance.research.sampling import sample  # noqa: E402

#: Wan 2.1 at 480p (832×480), 81 frames: VAE strides 8 (space) and 4 (time, first frame apart)
WAN_LATENT = (16, (81 - 1) // 4 + 1, 480 // 8, 832 // 8)
STEPS = 10


class StubVideoModel:
    """Cond: a denoiser of N(μ, 0.25) with a fixed random μ; uncond: ``0.5·c + 0.2·x + 0.1`` (LinearAG's
    regression is exact on it). Fresh output tensors on every call, as a real model's."""

    def __init__(self, shape, seed: int = 0):
        self.mean = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def __call__(self, x, sigma, conds):
        view = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        cond = self.mean + 0.25 / (0.25 + view**2) * (x - self.mean)
        return [cond if name == "cond" else 0.5 * cond + 0.2 * x + 0.1 for name in conds]


class EngineAllocations(TorchDispatchMode):
    """Storages created by operators while active, followed until freed: current and peak live bytes."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def live_bytes(self) -> int:
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if not ref.expired()}
        return sum(size for _, size in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in inputs and storage.nbytes() > 0:
                    self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, self.live_bytes())
        return out


def kept_tensors(run: GuidanceRun) -> list[torch.Tensor]:
    """Every tensor the run holds between calls."""
    found = [run._guidance_cache, *run._masks.values()]
    if run._pending_cosine is not None:
        found.append(run._pending_cosine[1])
    for state in run._states:
        for pair in getattr(state, "history", ()):
            found.extend(pair)
    return [t for t in found if torch.is_tensor(t)]


def storage_bytes(tensors) -> int:
    seen = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(policies, model, noise, sigmas) -> dict:
    """Sample once with the policies; the engine's kept and peak bytes (module docstring)."""
    kept, peaks = [0], [0]
    original_plan, original_complete = GuidanceRun.plan, GuidanceRun.complete

    def traced(function):
        def call(self, *args):
            tracker = EngineAllocations()
            with tracker:
                result = function(self, *args)
            kept_now = storage_bytes(kept_tensors(self))
            kept.append(kept_now)
            peaks.append(kept_now + tracker.peak)  # the engine's own allocations on top of what it keeps
            return result
        return call

    GuidanceRun.plan, GuidanceRun.complete = traced(original_plan), traced(original_complete)
    try:
        result = sample(model, noise, sigmas, "cond", "uncond", 5.0, "euler", policies)
    finally:
        GuidanceRun.plan, GuidanceRun.complete = original_plan, original_complete
    summary = result.run.summary()
    return {"kept_bytes": max(kept), "peak_bytes": max(peaks), "calls": summary.calls,
            "evaluations": summary.evaluations}


def linear_ag(model, shape, sigmas, window: int, mode: str = "alternate") -> LinearAG:
    calibration = LinearAGCalibration(window, holdout_every=2)
    for run in range(2):
        noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(100 + run))
        sample(model, noise, sigmas, "cond", "uncond", 5.0, "euler", [calibration.policy()])
    return LinearAG(calibration.fit(1e-3, {"sampler": "euler", "scheduler": "simple", "name": "stub"}), mode=mode)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shape = WAN_LATENT
    model = StubVideoModel(shape)
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)  # flow matching, as Wan
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    latent_bytes = math.prod(shape) * 4
    methods = {
        "Adaptive Guidance (denoised cosine, default)": [AdaptiveGuidance(threshold=1.0001)],
        "Adaptive Guidance (noise cosine)": [AdaptiveGuidance(threshold=1.0001, cosine_space="noise")],
        "Compress Guidance, reuse": [CompressGuidance(compression=4.0, mode="reuse")],
        "Compress Guidance, compress": [CompressGuidance(compression=4.0, mode="compress")],
        "LinearAG, window 2 (default)": [linear_ag(model, shape, sigmas, 2)],
        "LinearAG, window 4 (largest)": [linear_ag(model, shape, sigmas, 4)],
    }
    rows = {name: measure(policies, model, noise, sigmas) for name, policies in methods.items()}
    mib = 2**20
    print(f"latent 1×{'×'.join(map(str, shape))} fp32: {latent_bytes / mib:.2f} MiB; {STEPS} Euler steps")
    for name, row in rows.items():
        print(f"{name:46s} kept {row['kept_bytes'] / mib:7.2f} MiB ({row['kept_bytes'] / latent_bytes:4.1f} latents)"
              f"   peak in a call {row['peak_bytes'] / mib:7.2f} MiB ({row['peak_bytes'] / latent_bytes:4.1f} latents)")
    if args.json:
        args.json.write_text(json.dumps({"latent": [1, *shape], "latent_bytes": latent_bytes, "methods": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
