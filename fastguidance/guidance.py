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


#: where Adaptive Guidance measures its cosine: ``noise`` is the paper's (and DESIGN's) γ; ``denoised``
#: compares the two predictions themselves, as the popular ComfyUI implementation of AG does
COSINE_SPACES = ("noise", "denoised")


def per_sample_cosine(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, eps: float = 1e-12,
                      space: str = "noise") -> torch.Tensor:
    """Per-sample cosine ``γ = cos(x − c, x − u)`` in fp32, shape ``[B]``.

    Adaptive Guidance (Castillo et al., arXiv 2312.12487, §3, eq. 5) measures the cosine between the
    conditional and unconditional noise predictions. ``x − c`` is ``σ·ε_c`` for an epsilon model and
    the cosine is scale-invariant, so it is computed on ``x − denoised`` directly, which is valid for
    every parameterisation (EPS, v, flow). Each sample is flattened on its own: the statistic is per
    sample, never over the whole batch. Works for any latent rank (4-D images, 5-D video).
    The result stays on the device: this function reads nothing back (the engine reads the cosines
    with the next call's sigma, in one copy).

    ``space="denoised"`` gives ``cos(c, u)`` instead. Why it exists: at the first step ``x ≈ σ_max·n``
    dominates both noise directions, so ``1 − γ`` is at most about ``½‖c − u‖²/‖x − u‖²`` (only the part of
    ``c − u`` across ``x − u`` counts), tiny for any model whose
    predictions stay in the data's range (values in [−1, 1] and σ_max = 14.6 bound it by
    ½(2/14.6)², i.e. γ ≥ 0.9906 however different the two pictures are). A threshold of 0.991 can
    then cut at the first step; the denoised predictions do differ early and converge late. (A constant
    offset shared by ``c`` and ``u``, such as a latent mean far from zero, pushes the denoised cosine
    towards 1.)
    """
    if space not in COSINE_SPACES:
        raise ValueError(f"cosine space must be one of {COSINE_SPACES}, got {space!r}")
    batch = x.shape[0]
    cond32, uncond32 = cond.reshape(batch, -1).float(), uncond.reshape(batch, -1).float()
    if space == "noise":
        x32 = x.reshape(batch, -1).float()
        cond32, uncond32 = x32 - cond32, x32 - uncond32
    dot = (cond32 * uncond32).sum(dim=1)
    norms = cond32.norm(dim=1) * uncond32.norm(dim=1)
    return dot / norms.clamp_min(eps)
