"""What recording AGD trajectories smaller than sampling costs in quality, on a tiny random Wan 2.1.

    OMP_NUM_THREADS=1 COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/agd_recording_size.py

Train Guidance Adapter (the node, in-process) trains adapters on the tiny Wan 2.1 the host tests use
(``tests/comfy/host_models.py``: host classes, 2 blocks of width 64, seeded random weights) from recordings at
the sampling size and at smaller sizes (its ``width``, ``height`` and ``frames`` inputs), with everything else the
same (prompts, trajectories, steps, training steps, seed). Each file is then loaded (Load Guidance Adapter, ω =
the sampler's cfg) and sampled with KSampler at the *sampling* size, next to plain CFG and cfg 1 from the same
seed and prompt. Per (prompt, sampling seed) the final latents give

- ``relative error`` = ‖adapted − CFG‖ / ‖CFG‖, and
- ``guidance missed`` = ‖adapted − CFG‖ / ‖cfg-1 − CFG‖: the share of what CFG changes that the single pass does
  not reproduce (0 = CFG exactly; 1 = no better than not guiding),

averaged over the prompts and sampling seeds, for each training seed; the spread between training seeds at
the same size is the noise floor a size difference has to exceed.

What it shows: whether adapters trained on smaller latents (fewer tokens, other positions in the video) carry
over to the sampling size on this architecture and this trainer. What it does not show: the quality on a real,
trained Wan (a random model's CFG effect is not a picture's, and its trajectories are not a real video's), nor
how far a real model's adapters generalise to prompts they were not trained on (the prompts here are the
training prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "tests" / "comfy"))
import host_models  # noqa: E402  (the test models, one place for tests and benchmarks)

#: name → (width, height, frames) of the recordings; the first is the sampling size
SIZES = {"full size 128×128×17": (128, 128, 17), "half width and height 64×64×17": (64, 64, 17),
         "fewer frames 128×128×9": (128, 128, 9), "both 64×64×9": (64, 64, 9)}
PROMPTS = ["a red cube", "three blue spheres on a table", "a dog running on a beach", "a city street at night, rain",
           "a bowl of fruit", "an old lighthouse in fog"]
CFG = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seeds", type=int, default=2, help="training seeds per size (default 2)")
    parser.add_argument("--sample-seeds", type=int, default=3, help="sampling seeds per prompt (default 3)")
    parser.add_argument("--trajectories", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps of the recordings and the evaluation")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    nodes, _ = host_models.load_pack(comfyui_path, PACK_DIR)
    import comfy.utils
    import folder_paths
    from conftest import prepared_class  # the one place that knows PREPARE_CLASS_CLONE's argument on both hosts

    comfy.utils.PROGRESS_BAR_ENABLED = False  # the samplers' bars; the results go to stdout
    folder = tempfile.mkdtemp(prefix="fastguidance_recording_size_")
    folder_paths.folder_names_and_paths["fastguidance_adapters"] = ([folder], {".safetensors"})
    family = host_models.family("wan21")
    model = host_models.patcher(host_models.family_model(family, seed=0))
    clip = host_models.FamilyClip(family)
    negative = clip.encode_from_tokens_scheduled("")
    sampling_width, sampling_height, sampling_frames = next(iter(SIZES.values()))
    latent = {"samples": torch.zeros(1, 16, (sampling_frames - 1) // 4 + 1, sampling_height // 8, sampling_width // 8)}
    train_node = prepared_class(nodes.NODE_CLASS_MAPPINGS["FastGuidance_TrainGuidanceAdapter"], {"UNIQUE_ID": "1"})
    load_node = prepared_class(nodes.NODE_CLASS_MAPPINGS["FastGuidance_LoadGuidanceAdapter"], {"UNIQUE_ID": "2"})

    def sample(patched, positive, seed: int, cfg: float) -> torch.Tensor:
        return nodes.common_ksampler(patched, seed, args.steps, cfg, "euler", "simple", positive, negative,
                                     latent)[0]["samples"]

    cases = [(prompt, seed) for prompt in PROMPTS for seed in range(args.sample_seeds)]
    positives = {prompt: clip.encode_from_tokens_scheduled(prompt) for prompt in PROMPTS}
    references = {(prompt, seed): (sample(model, positives[prompt], seed, CFG), sample(model, positives[prompt], seed, 1.0))
                  for prompt, seed in cases}
    results: dict = {"sampling": {"width": sampling_width, "height": sampling_height, "frames": sampling_frames,
                                  "latent": list(latent["samples"].shape[1:]), "cfg": CFG, "steps": args.steps,
                                  "prompts": len(PROMPTS), "sample_seeds": args.sample_seeds},
                     "training": {"trajectories": args.trajectories, "steps": args.steps, "train_steps": args.train_steps,
                                  "batch": 4, "learning_rate": 1e-3, "adapter_width": 32, "omega_range": [1.0, 8.0]},
                     "sizes": {}}
    for name, (width, height, frames) in SIZES.items():
        rows = []
        for train_seed in range(args.train_seeds):
            filename = f"size_{width}x{height}x{frames}_seed{train_seed}"
            began = time.perf_counter()
            train_node.execute(model, clip, "\n".join(PROMPTS), "", 1.0, 8.0, args.trajectories, args.steps, "euler",
                               "simple", width, height, args.train_steps, 4, 1e-3, "cross_attention", 32, train_seed,
                               filename, True, False, frames=frames)
            seconds = time.perf_counter() - began
            adapted = load_node.execute(model, f"{filename}.safetensors", True, CFG, 1.0, False)[0]
            relative, missed = [], []
            for prompt, seed in cases:
                guided, unguided = references[(prompt, seed)]
                error = (sample(adapted, positives[prompt], seed, CFG) - guided).norm().item()
                relative.append(error / guided.norm().item())
                missed.append(error / (unguided - guided).norm().item())
            rows.append({"train_seed": train_seed, "relative_error": statistics.mean(relative),
                         "guidance_missed": statistics.mean(missed), "train_seconds": seconds})
            print(f"{name}, training seed {train_seed}: relative error {rows[-1]['relative_error']:.4f}, guidance "
                  f"missed {rows[-1]['guidance_missed']:.4f} ({seconds:.0f} s)", file=sys.stderr)
        results["sizes"][name] = {"width": width, "height": height, "frames": frames,
                                  "latent": [16, (frames - 1) // 4 + 1, height // 8, width // 8], "runs": rows,
                                  "relative_error": statistics.mean(r["relative_error"] for r in rows),
                                  "guidance_missed": statistics.mean(r["guidance_missed"] for r in rows)}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
