"""The small pieces of classifier-free guidance maths that every method shares.

Notation (DESIGN.md §1): ``x`` the current latent, ``c`` / ``u`` the denoised predictions with the
prompt / with the negative prompt, ``s`` the CFG scale, ``g = c - u`` the guidance term.
"""

from __future__ import annotations

import torch


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, Ho & Salimans (2022), eq. 6, in denoised space: ``u + s·(c − u)``.

    Written exactly as ComfyUI's ``cfg_function`` writes it, so that results match bit for bit.
    """
    return uncond + (cond - uncond) * scale


def noise_of(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(x − D)/σ`` per sample: a denoised prediction as noise (ε for EPS models, velocity for flow models),
    the scale on which predictions at different noise levels are comparable."""
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.dim() - 1)))


def per_sample_cosine(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample cosine ``γ = cos(x − c, x − u)`` in fp32, shape ``[B]``.

    Adaptive Guidance (Castillo et al., arXiv 2312.12487, §3, eq. 5) measures the cosine between the
    conditional and unconditional noise predictions. ``x − c`` is ``σ·ε_c`` for an epsilon model and
    the cosine is scale-invariant, so it is computed on ``x − denoised`` directly, which is valid for
    every parameterisation (EPS, v, flow). Each sample is flattened on its own: the statistic is per
    sample, never over the whole batch. Works for any latent rank (4-D images, 5-D video).
    The result stays on the device (no host synchronisation).
    """
    batch = x.shape[0]
    x32 = x.reshape(batch, -1).float()
    noise_cond = x32 - cond.reshape(batch, -1).float()
    noise_uncond = x32 - uncond.reshape(batch, -1).float()
    dot = (noise_cond * noise_uncond).sum(dim=1)
    norms = noise_cond.norm(dim=1) * noise_uncond.norm(dim=1)
    return dot / norms.clamp_min(eps)
