"""AGD on the reference model: its attach points, CFG-guided trajectories, and adapter training.

The reference model's cross-attention outputs pass through ``options["attn2_output"]`` patches, the
same kind of attach point as the host UNet's ``attn2_output_patch``; the adapters of
:mod:`fastguidance.guidance_adapters.adapters` attach there. Training data are **CFG-guided trajectories** (the paper's
key point): every step of a CFG sampling run at a random ``ω`` records the input, the noise level,
the prompt, ``ω`` and the CFG noise prediction, the target of the single adapted pass.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...guidance_adapters.training import DistillationTrainer, TrainingSettings
from ...guidance_adapters.adapters import AdapterSpec, GuidanceAdapters, cfg_target, distillation_loss
from ...schedules import make_sigmas
from .model import CrossAttentionBlock, ReferenceModel, TextConditioning


def attach_points(model: ReferenceModel) -> dict[str, int]:
    """Cross-attention block name → channels, in the order the UNet runs them."""
    return {module.name: module.norm1.normalized_shape[0] for module in model.unet.modules()
            if isinstance(module, CrossAttentionBlock)}


def adapter_spec(model: ReferenceModel, kind: str = "cross_attention", hidden: int = 32, embed_dim: int = 64) -> AdapterSpec:
    return AdapterSpec(attach_points(model), model.config.text_dim, model.config.text_dim, kind, hidden, embed_dim)


def single_pass_noise(model: ReferenceModel, adapters: GuidanceAdapters, x: torch.Tensor, sigma: torch.Tensor,
                      text: TextConditioning, omega: torch.Tensor) -> torch.Tensor:
    """The adapted model's one conditional pass: the noise prediction that should equal CFG's."""
    bound = adapters.bind(omega, sigma, text.tokens, text.pooled, text.mask)
    options = {"attn2_output": [lambda n, extra: bound(extra["block"], n)]}
    return model.predict_noise(x, sigma, text, options)


@dataclass
class Trajectories:
    """CFG-guided trajectory steps, stored compactly (fp16 inputs and targets)."""

    x: torch.Tensor  # [N, 3, 32, 32] fp16, the sampler's input at each step
    sigma: torch.Tensor  # [N]
    omega: torch.Tensor  # [N]
    prompt: torch.Tensor  # [N] index into prompts
    target: torch.Tensor  # [N, 3, 32, 32] fp16, the CFG noise prediction
    prompts: list[str]

    def __len__(self) -> int:
        return self.x.shape[0]

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.sigma, self.omega, self.prompt, self.target))


@torch.no_grad()
def collect_trajectories(model: ReferenceModel, prompts: Sequence[str], omega_range: tuple[float, float] = (1.0, 8.0),
                         steps: int = 20, scheduler: str = "karras", seed: int = 0, batch: int = 32) -> Trajectories:
    """Euler CFG sampling of every prompt at an ``ω`` drawn uniformly from ``omega_range``, every step recorded."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = make_sigmas(model.schedule, scheduler, steps).tolist()
    uncond = model.encode([""])
    xs, sig, om, idx, targets = [], [], [], [], []
    for start in range(0, len(prompts), batch):
        rows = list(range(start, min(start + batch, len(prompts))))
        text = model.encode([prompts[i] for i in rows])
        omega = omega_range[0] + (omega_range[1] - omega_range[0]) * torch.rand(len(rows), generator=generator)
        x = torch.randn(len(rows), 3, 32, 32, generator=generator) * sigmas[0]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            sigma_t = torch.full((len(rows),), sigma)
            both = TextConditioning.cat([text, uncond.expand(len(rows))])
            eps_c, eps_u = model.predict_noise(x.repeat(2, 1, 1, 1), sigma_t.repeat(2), both).chunk(2)
            target = cfg_target(eps_c, eps_u, omega)
            xs.append(x.half()), sig.append(sigma_t), om.append(omega.clone())
            idx.append(torch.tensor(rows)), targets.append(target.half())
            x = x + (sigma_next - sigma) * target  # Euler along the guided trajectory
    return Trajectories(torch.cat(xs), torch.cat(sig), torch.cat(om), torch.cat(idx), torch.cat(targets), list(prompts))


def train_adapters(model: ReferenceModel, adapters: GuidanceAdapters, data: Trajectories, steps: int = 300,
                   batch: int = 64, lr: float = 2e-3, warmup: int = 20, seed: int = 0,
                   progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """The core's AdamW schedule (:class:`DistillationTrainer`) on the distillation loss; the base stays frozen."""
    model.requires_grad_(False)
    trainer = DistillationTrainer(adapters, TrainingSettings(steps, batch, lr, warmup, seed=seed))
    texts = model.encode(data.prompts)
    while not trainer.done:
        rows = trainer.sample_rows(len(data))
        text = texts.select(data.prompt[rows])

        def loss_of() -> torch.Tensor:
            prediction = single_pass_noise(model, adapters, data.x[rows].float(), data.sigma[rows], text, data.omega[rows])
            return distillation_loss(prediction, data.target[rows])

        loss = trainer.train_step(loss_of)
        if progress is not None:
            progress(trainer.step, steps, loss)
    adapters.eval()
    return trainer.losses


def training_prompts(count: int, seed: int = 0) -> list[str]:
    from .scenes import random_scene

    rng = random.Random(3_000_000 + seed)
    return [random_scene(rng, held_out=False).prompt for _ in range(count)]


def train_reference_adapters(model: ReferenceModel, prompts: int = 128, trajectory_steps: int = 20,
                             train_steps: int = 600, batch: int = 64, omega_range: tuple[float, float] = (1.0, 8.0),
                             kind: str = "cross_attention", hidden: int = 32, seed: int = 0,
                             progress: Callable[[int, int, float], None] | None = None) -> tuple[GuidanceAdapters, dict]:
    """Collect CFG-guided trajectories of training prompts and distil them into adapters."""
    import time

    from ...fingerprint import weights_fingerprint

    began = time.perf_counter()
    torch.manual_seed(seed)
    data = collect_trajectories(model, training_prompts(prompts, seed), omega_range, trajectory_steps, seed=seed)
    collected = time.perf_counter() - began
    adapters = GuidanceAdapters(adapter_spec(model, kind, hidden))
    losses = train_adapters(model, adapters, data, train_steps, batch, seed=seed, progress=progress)
    info = {"architecture": "fastguidance.reference_model", "model_fingerprint": weights_fingerprint(model.state_dict().items()),
            "omega_range": list(omega_range), "prompts": prompts, "trajectory_steps": trajectory_steps,
            "trajectory_samples": len(data), "trajectory_bytes": data.size_bytes(), "train_steps": train_steps,
            "batch": batch, "seed": seed, "collect_seconds": collected, "seconds": time.perf_counter() - began,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "loss_every_50": [sum(losses[i:i + 50]) / len(losses[i:i + 50]) for i in range(0, len(losses), 50)],
            "base_parameters": sum(p.numel() for p in model.unet.parameters())}
    return adapters, info


class SinglePassModel:
    """The adapted reference model as a conditional model: one pass per conditioning, CFG at ``omega`` built in."""

    def __init__(self, model: ReferenceModel, adapters: GuidanceAdapters, omega: float):
        self.model, self.adapters, self.omega = model, adapters, omega

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[TextConditioning]) -> list[torch.Tensor]:
        outputs = []
        for cond in conds:
            text = cond.expand(x.shape[0])
            eps = single_pass_noise(self.model, self.adapters, x, sigma, text, torch.full_like(sigma, self.omega))
            outputs.append(x - sigma.reshape(-1, 1, 1, 1) * eps)
        return outputs
