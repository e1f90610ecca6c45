"""Noise schedules and the step index, without ComfyUI.

The reference model and the tests use the discrete variance-preserving schedule of Stable Diffusion
(Rombach et al., 2022; "scaled linear" betas from 0.00085 to 0.012 over 1000 steps), expressed as
k-diffusion sigmas (Karras et al., 2022, eq. 1: ``x = x0 + σ·ε``). The two samplers' schedules are
those the host offers under the names ``normal`` and ``karras``.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch

from .errors import InvalidInputError


class DiscreteVPSchedule:
    """Sigmas of a discrete DDPM schedule (Ho et al., 2020) with ``scaled linear`` betas.

    ``sigma_t = sqrt((1 − ᾱ_t) / ᾱ_t)`` with ``ᾱ_t = Π (1 − β_i)`` and
    ``β = linspace(sqrt(β_start), sqrt(β_end), T)²`` (the Stable Diffusion schedule).
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep of a sigma (the model's time input)."""
        log_sigma = sigma.float().log().to(self.log_sigmas.device)
        distances = (log_sigma.reshape(-1, 1) - self.log_sigmas.reshape(1, -1)).abs()
        return distances.argmin(dim=1).reshape(sigma.shape).to(sigma.device)

    def sigma(self, timestep: float) -> float:
        """Sigma at a fractional timestep, interpolated in log sigma."""
        t = min(max(float(timestep), 0.0), len(self.sigmas) - 1.0)
        low = int(math.floor(t))
        high = min(low + 1, len(self.sigmas) - 1)
        weight = t - low
        return float(((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp())

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at ``percent`` of the denoising process (0 = start, 1 = end), as the host defines it."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * (len(self.sigmas) - 1))


def normal_sigmas(schedule: DiscreteVPSchedule, steps: int) -> torch.Tensor:
    """``normal`` schedule: timesteps evenly spaced from the largest to the smallest, then 0."""
    _check_steps(steps)
    last = len(schedule.sigmas) - 1
    timesteps = torch.linspace(last, 0, steps, dtype=torch.float64)
    return torch.tensor([schedule.sigma(float(t)) for t in timesteps] + [0.0], dtype=torch.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: ``σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, then 0."""
    _check_steps(steps)
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


SCHEDULERS = ("normal", "karras")


def make_sigmas(schedule: DiscreteVPSchedule, scheduler: str, steps: int) -> torch.Tensor:
    """The sampled schedule (``steps + 1`` sigmas ending in 0) for a scheduler name."""
    if scheduler == "normal":
        return normal_sigmas(schedule, steps)
    if scheduler == "karras":
        return karras_sigmas(schedule.sigma_min, schedule.sigma_max, steps)
    raise InvalidInputError("scheduler", scheduler, f"choose one of {', '.join(SCHEDULERS)}")


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 1:
        raise InvalidInputError("steps", steps, "use a whole number of steps, 1 or more")


def step_index(schedule: Sequence[float], sigma: float, rel_tol: float = 1e-5) -> int:
    """Index of the sampling step that a model call at ``sigma`` belongs to.

    ``schedule`` is the sampled schedule (descending, ending in 0). The step is the last index whose
    sigma is at least ``sigma``: a call at ``schedule[i]`` is step ``i``, and a call at a midpoint
    between ``schedule[i]`` and ``schedule[i+1]`` (Heun's, DPM-2's, DPM++ SDE's intermediate
    evaluations) is also step ``i``; exact matching would fail there. A relative tolerance absorbs
    float rounding between the sampler's sigma and the stored schedule. The result is clamped to
    ``[0, len(schedule) − 2]`` (the last entry, 0, is never a step).
    """
    threshold = sigma * (1.0 - rel_tol)
    # schedule is descending: count the entries >= threshold by bisecting the negated values.
    count = bisect.bisect_right(schedule, -threshold, key=lambda value: -value)
    return min(max(count - 1, 0), max(len(schedule) - 2, 0))
