"""Image metrics for A/B checks: SSIM and PSNR (Compare Images, Tune, the step predictor).

- :func:`ssim`: structural similarity (Wang, Bovik, Sheikh, Simoncelli, "Image Quality Assessment:
  From Error Visibility to Structural Similarity", IEEE TIP 2004, eq. 13), computed by
  ``kornia.metrics.ssim`` with the paper's 11×11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03,
  dynamic range L = 1, over the *valid* part of the image (no padding, as the paper's reference
  MATLAB code and scikit-image do), averaged per image over channels and positions.
- :func:`psnr`: peak signal-to-noise ratio ``10·log10(1 / MSE)`` in dB, per image, by
  ``kornia.metrics.psnr`` with max value 1. Identical images have MSE 0 and PSNR **+inf**; use
  :func:`mean_psnr` (caps each value, default :data:`PSNR_CAP_DB`) and :func:`format_psnr` to
  summarise.
- :func:`compare_images`: both, with one-to-many broadcasting, and a one-line human summary.
- The benchmark's distribution distance and confidence intervals are in
  :mod:`fastguidance.research.statistics`.

Images are batches ``[B, C, H, W]`` with values in ``[0, 1]`` (any C; ComfyUI's ``[B, H, W, C]``
IMAGE must be permuted by the caller). Per-image values are returned as fp32 tensors of shape ``[B]``
on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import kornia
import torch

from .errors import InvalidInputError

#: side of the Gaussian SSIM window (Wang et al. 2004, §III-C: 11×11, σ = 1.5)
SSIM_WINDOW = 11
#: what :func:`mean_psnr` counts an identical pair (PSNR +inf) as, in dB: far beyond visible
#: differences (one 8-bit level in one pixel of a 64×64 RGB image is 89 dB; 40 dB is already hard to see).
PSNR_CAP_DB = 100.0
#: images a little outside [0, 1] (rounding in upstream operations) are accepted and clamped
RANGE_TOLERANCE = 1e-3
#: images per kornia SSIM call: bounds the memory of its five filtered maps on long (video) batches
_SSIM_CHUNK = 8


# --------------------------------------------------------------------------------------------------
# Validation


def _describe_size(images: torch.Tensor) -> str:
    return f"{images.shape[-2]}×{images.shape[-1]} pixels (height×width)"


def _check_batch(images: object, name: str) -> torch.Tensor:
    """One image batch: a floating tensor ``[B, C, H, W]``, B ≥ 1, finite, in [0, 1] (± tolerance)."""
    if not isinstance(images, torch.Tensor):
        raise InvalidInputError(name, type(images).__name__, "expected a torch.Tensor of images [B, C, H, W]")
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] < 1:
        raise InvalidInputError(name, tuple(images.shape), "expected a batch of images [B, C, H, W] with B, C ≥ 1")
    if not images.is_floating_point():
        raise InvalidInputError(name, str(images.dtype), "expected floating-point images with values in [0, 1] "
                                                         "(divide 8-bit images by 255)")
    if images.shape[-2] < SSIM_WINDOW or images.shape[-1] < SSIM_WINDOW:
        raise InvalidInputError(name, _describe_size(images),
                                f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels (its window)")
    if not bool(torch.isfinite(images).all()):
        raise InvalidInputError(name, "non-finite values (NaN or inf)", "expected image values in [0, 1]")
    low, high = float(images.min()), float(images.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise InvalidInputError(name, f"values in [{low:.4g}, {high:.4g}]",
                                "expected image values in [0, 1] (rescale first, e.g. (x + 1) / 2 for [-1, 1])")
    return images


def _check_same_image_shape(a: torch.Tensor, b: torch.Tensor, names: Sequence[str]) -> None:
    """Same channels and size (the batch sizes are checked by the callers)."""
    name_a, name_b = names
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError(name_b, f"{b.shape[1]} channels",
                                f"{name_a} has {a.shape[1]} channels; compare images with the same channels "
                                "(both RGB, for example)")
    if a.shape[-2:] != b.shape[-2:]:
        raise InvalidInputError(name_b, _describe_size(b),
                                f"{name_a} is {_describe_size(a)}; both must have the same size: resize one of "
                                "them to the other's size first")


def _prepare(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked batches as fp32 on ``a``'s device, clamped to [0, 1] (new tensors; inputs untouched)."""
    return a.float().clamp(0.0, 1.0), b.to(device=a.device).float().clamp(0.0, 1.0)


def _check_pair(a: object, b: object, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of the same shape, prepared by :func:`_prepare`."""
    name_a, name_b = names
    a, b = _check_batch(a, name_a), _check_batch(b, name_b)
    _check_same_image_shape(a, b, names)
    if a.shape[0] != b.shape[0]:
        raise InvalidInputError(name_b, f"a batch of {b.shape[0]}",
                                f"{name_a} has a batch of {a.shape[0]}; ssim and psnr compare image i with image i "
                                "(compare_images also compares one image with every image of a batch)")
    return _prepare(a, b)


def pair_batches(a: torch.Tensor, b: torch.Tensor, names: Sequence[str] = ("a", "b")) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two batches and match their sizes: equal → unchanged; one of size 1 → expanded (a view).

    Any other combination is refused with :class:`InvalidInputError` naming ``names[1]``; so are
    batches that :func:`ssim` refuses (different channels or sizes, values outside [0, 1], …).
    """
    name_a, name_b = names
    a, b = _check_batch(a, name_a), _check_batch(b, name_b)
    _check_same_image_shape(a, b, names)
    batch_a, batch_b = a.shape[0], b.shape[0]
    if batch_a == batch_b:
        return a, b
    if batch_a == 1:
        return a.expand(batch_b, *a.shape[1:]), b
    if batch_b == 1:
        return a, b.expand(batch_a, *b.shape[1:])
    raise InvalidInputError(name_b, f"a batch of {batch_b} images",
                            f"{name_a} has {batch_a} images; give both the same number of images (image i is "
                            "compared with image i), or one of them a single image (compared with every image "
                            "of the other)")


# --------------------------------------------------------------------------------------------------
# Per-image metrics


def ssim(a: torch.Tensor, b: torch.Tensor, names: Sequence[str] = ("a", "b")) -> torch.Tensor:
    """Per-image SSIM between two batches ``[B, C, H, W]`` in [0, 1]: fp32 tensor ``[B]``.

    Wang et al. 2004, eq. 13, ``SSIM(x, y) = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))``
    with local statistics under an 11×11 Gaussian window (σ = 1.5), ``C1 = (0.01·L)²``,
    ``C2 = (0.03·L)²``, ``L = 1``; the map (``kornia.metrics.ssim``, ``padding="valid"``, no epsilon
    in the denominator, so identical images score 1) is averaged over channels and positions, in
    fp32. 1 = identical, lower = less similar (can be negative for anti-correlated images).

    Raises:
        InvalidInputError: naming ``names[0]`` or ``names[1]`` for tensors that are not
            ``[B, C, H, W]`` floating images in [0, 1] of the same shape, smaller than 11×11 or
            with non-finite values.
    """
    return _ssim_values(*_check_pair(a, b, names))


def _ssim_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    values = []
    for start in range(0, a.shape[0], _SSIM_CHUNK):
        chunk_a, chunk_b = a[start:start + _SSIM_CHUNK], b[start:start + _SSIM_CHUNK]
        ssim_map = kornia.metrics.ssim(chunk_a, chunk_b, SSIM_WINDOW, max_val=1.0, eps=0.0, padding="valid")
        values.append(ssim_map.float().flatten(1).mean(dim=1))
    return torch.cat(values)


def psnr(a: torch.Tensor, b: torch.Tensor, names: Sequence[str] = ("a", "b")) -> torch.Tensor:
    """Per-image PSNR in dB between two batches ``[B, C, H, W]`` in [0, 1]: fp32 tensor ``[B]``.

    ``PSNR = 10·log10(MAX² / MSE)`` with ``MAX = 1`` and the MSE of one image over its channels and
    pixels (``kornia.metrics.psnr`` called per image: called on a batch it pools one MSE).
    Identical images give MSE 0 and **+inf**: summarise with :func:`mean_psnr` (capped) and display
    with :func:`format_psnr`.

    Raises:
        InvalidInputError: as :func:`ssim`.
    """
    return _psnr_values(*_check_pair(a, b, names))


def _psnr_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([kornia.metrics.psnr(a[i], b[i], 1.0).float() for i in range(a.shape[0])])


# --------------------------------------------------------------------------------------------------
# Summaries


def mean_psnr(values: torch.Tensor, cap_db: float | None = PSNR_CAP_DB) -> float:
    """Mean of per-image PSNRs (dB), each first capped at ``cap_db`` (so identical pairs count as
    ``cap_db`` instead of making the mean +inf). ``cap_db=None``: the plain mean, +inf if any pair
    is identical. An empty tensor gives NaN.
    """
    values = values.detach().double()
    if values.numel() == 0:
        return math.nan
    if cap_db is not None:
        values = values.clamp(max=cap_db)
    return float(values.mean())


def format_psnr(value_db: float) -> str:
    """``"31.2 dB"``; ``"inf dB (identical)"`` for +inf."""
    if value_db == math.inf:
        return "inf dB (identical)"
    return f"{value_db:.1f} dB"


@dataclass(frozen=True)
class ImageComparison:
    """Per-pair SSIM and PSNR of a comparison (fp32 tensors ``[N]``, N = number of pairs)."""

    ssim: torch.Tensor
    psnr: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.ssim.shape[0])

    @property
    def identical(self) -> int:
        """Pairs whose PSNR is +inf (bit-identical after clamping to [0, 1])."""
        return int(torch.isposinf(self.psnr).sum())

    @property
    def mean_ssim(self) -> float:
        return float(self.ssim.double().mean())

    def mean_psnr(self, cap_db: float | None = PSNR_CAP_DB) -> float:
        """See :func:`mean_psnr`."""
        return mean_psnr(self.psnr, cap_db)

    def summary(self, cap_db: float = PSNR_CAP_DB) -> str:
        """One line, e.g. ``"SSIM 0.973 · PSNR 31.2 dB over 2 images"``.

        All pairs identical: ``"… PSNR inf dB (identical) …"``; some identical: the mean counts them
        as ``cap_db`` and the line says how many.
        """
        images = f"{self.count} image" + ("" if self.count == 1 else "s")
        text = f"SSIM {self.mean_ssim:.3f} · PSNR "
        if self.identical == self.count:
            return text + f"{format_psnr(math.inf)} over {images}"
        text += f"{self.mean_psnr(cap_db):.1f} dB over {images}"
        if self.identical:
            text += f" ({self.identical} identical, counted as {cap_db:g} dB)"
        return text


def compare_images(a: torch.Tensor, b: torch.Tensor, names: Sequence[str] = ("a", "b")) -> ImageComparison:
    """SSIM and PSNR of every pair: batches of equal size pairwise, a single image against every
    image of the other batch (see :func:`pair_batches`); errors name ``names``."""
    a, b = _prepare(*pair_batches(a, b, names))
    return ImageComparison(ssim=_ssim_values(a, b), psnr=_psnr_values(a, b))
