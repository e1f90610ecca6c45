"""Small deterministic models for the CI suite (no ComfyUI, no weights)."""

from __future__ import annotations

import math

import torch


class ScriptedCosineModel:
    """A conditional "denoiser" whose cond/uncond cosine is known exactly at every sigma.

    ``x − c = σ·e_c`` and ``x − u = σ·(cos θ·e_c + sin θ·e_⊥)`` with fixed per-sample orthonormal
    ``e_c, e_⊥``, so ``cos(x − c, x − u) = cos θ(σ)``. ``θ`` shrinks with sigma at a per-sample rate,
    so cosines rise during sampling and each sample crosses a threshold at its own step.
    Conditionings are the strings ``"cond"`` and ``"uncond"``.
    """

    def __init__(self, shape=(2, 4, 8, 8), sigma_max: float = 15.0, rates=None, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        batch = shape[0]
        flat = torch.randn(batch, 2, math.prod(shape[1:]), generator=generator)
        e_c = flat[:, 0] / flat[:, 0].norm(dim=1, keepdim=True)
        other = flat[:, 1] - (flat[:, 1] * e_c).sum(1, keepdim=True) * e_c
        e_perp = other / other.norm(dim=1, keepdim=True)
        self.e_c = e_c.reshape(shape)
        self.e_perp = e_perp.reshape(shape)
        self.sigma_max = sigma_max
        self.rates = torch.tensor(rates if rates is not None else [1.0] * batch)
        self.calls: list[tuple[str, ...]] = []

    def theta(self, sigma: torch.Tensor) -> torch.Tensor:
        return (0.6 * self.rates * sigma / self.sigma_max).clamp(max=1.5)

    def expected_cosine(self, sigma: float) -> torch.Tensor:
        return torch.cos(self.theta(torch.full((len(self.rates),), sigma)))

    def __call__(self, x, sigma, conds):
        self.calls.append(tuple(conds))
        view = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        theta = self.theta(sigma).reshape(view.shape)
        outputs = []
        for cond in conds:
            if cond == "cond":
                direction = self.e_c
            else:
                direction = torch.cos(theta) * self.e_c + torch.sin(theta) * self.e_perp
            outputs.append(x - view * direction)
        return outputs


class GaussianModel:
    """Exact denoiser of Gaussian data ``N(μ_cond, s²I)``: ``D(x, σ) = μ + s²/(s² + σ²)·(x − μ)``.

    The cond and uncond differ by their means, so CFG has a known effect: sampling with scale
    ``w`` moves the final sample towards ``μ_u + w·(μ_c − μ_u)``.
    """

    def __init__(self, mean_cond: float = 1.0, mean_uncond: float = 0.0, std: float = 0.5):
        self.means = {"cond": mean_cond, "uncond": mean_uncond}
        self.std = std
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, x, sigma, conds):
        self.calls.append(tuple(conds))
        view = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        keep = self.std**2 / (self.std**2 + view**2)
        return [self.means[c] + keep * (x - self.means[c]) for c in conds]
