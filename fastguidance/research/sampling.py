"""A small sampler in the core, so the engine runs (and is tested and benchmarked) without ComfyUI.

Samplers follow k-diffusion (Karras et al., 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): the model is a *denoiser* ``D(x, σ) → x̂0``, the state is
``x = x0 + σ·ε`` and the probability-flow ODE is ``dx/dσ = (x − D(x, σ)) / σ`` (eq. 3 / Alg. 1).

- ``euler``: first-order step along that ODE (Karras et al., Alg. 1 without the correction);
- ``dpm_2``: DPM-Solver-2 (Lu et al., 2022, Alg. 1), one extra model call at a log-sigma midpoint,
  which exercises the engine's step index for midpoint samplers;
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al., 2022b, Alg. 2), a second-order multistep method.

Sigmas are read on the host once per run, and the samplers themselves read nothing from the device
per step; a guided call reads what the engine documents (at most one small tensor per model call,
see "Device↔host traffic" in :mod:`fastguidance.engine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from ..engine import GuidancePolicy, GuidanceRun
from ..errors import InvalidInputError
from ..guidance import cfg_combine

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ConditionalModel(Protocol):
    """A conditional denoiser: ``model(x, sigma, conds)`` returns one ``x̂0`` per conditioning.

    ``x`` is ``[B, ...]``, ``sigma`` is ``[B]``; the model may batch the conditionings into one
    forward pass. Each call is what the engine counts as one model evaluation per conditioning.
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[Any]) -> list[torch.Tensor]: ...


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, x.new_full((x.shape[0],), sigma))
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def sample_dpm_2(denoiser: Denoiser, x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, x.new_full((x.shape[0],), sigma))
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
            continue
        sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_next)))
        x_mid = x + slope * (sigma_mid - sigma)
        denoised_mid = denoiser(x_mid, x.new_full((x.shape[0],), sigma_mid))
        x = x + (x_mid - denoised_mid) / sigma_mid * (sigma_next - sigma)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    old_denoised = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, x.new_full((x.shape[0],), sigma))
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            h = t_next - t
            if old_denoised is None:
                direction = denoised
            else:
                r = (t - (-math.log(sigmas[i - 1]))) / h
                direction = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * direction
        old_denoised = denoised
    return x


SAMPLERS: dict[str, Callable[[Denoiser, torch.Tensor, Sequence[float]], torch.Tensor]] = {
    "euler": sample_euler,
    "dpm_2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
}


class GuidedDenoiser:
    """CFG around a conditional model, with the engine deciding which evaluations happen.

    Mirrors the host: at ``scale == 1`` only the cond is evaluated (ComfyUI's cfg-1 optimisation);
    without a run it is plain CFG; with a run each call follows :meth:`GuidanceRun.plan`.
    """

    def __init__(self, model: ConditionalModel, cond: Any, uncond: Any, scale: float, run: GuidanceRun | None = None):
        self.model, self.cond, self.uncond, self.scale, self.run = model, cond, uncond, scale, run

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if math.isclose(self.scale, 1.0):
            return self.model(x, sigma, [self.cond])[0]
        if self.run is None:
            cond, uncond = self.model(x, sigma, [self.cond, self.uncond])
            return cfg_combine(cond, uncond, self.scale)
        plan = self.run.plan(sigma)
        if plan.evaluate_uncond:
            cond, uncond = self.model(x, sigma, [self.cond, self.uncond])
        else:
            cond, uncond = self.model(x, sigma, [self.cond])[0], None
        return cfg_combine(cond, self.run.complete(plan, x, cond, uncond), self.scale)


@dataclass
class SampleResult:
    latent: torch.Tensor
    run: GuidanceRun | None  # None when no policy was given


def sample(model: ConditionalModel, noise: torch.Tensor, sigmas: torch.Tensor | Sequence[float], cond: Any, uncond: Any,
           scale: float, sampler: str = "euler", policies: Sequence[GuidancePolicy] = (),
           percent_to_sigma: Callable[[float], float] | None = None) -> SampleResult:
    """Sample from unit ``noise`` along ``sigmas`` with CFG, accelerated by ``policies`` if any.

    A fresh :class:`GuidanceRun` is created for this call; its records and summary are returned.
    """
    if sampler not in SAMPLERS:
        raise InvalidInputError("sampler", sampler, f"choose one of {', '.join(SAMPLERS)}")
    schedule = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    run = GuidanceRun(policies, schedule, noise.shape[0], percent_to_sigma) if policies else None
    denoiser = GuidedDenoiser(model, cond, uncond, scale, run)
    latent = SAMPLERS[sampler](denoiser, noise * schedule[0], schedule)
    if run is not None:
        run.finish()
    return SampleResult(latent, run)
