"""The benchmark's statistics: Fréchet distance between feature sets and paired bootstrap intervals.

- :func:`frechet_distance`: the Fréchet (2-Wasserstein) distance between Gaussians fitted to two
  feature sets, the formula of FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium", NeurIPS 2017, eq. 6; Dowson & Landau 1982).
- :func:`bootstrap_indices`, :func:`bootstrap_means`, :class:`FrechetBootstrap`,
  :func:`percentile_interval`, :func:`basic_interval`: paired bootstrap confidence intervals over
  prompts (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, §13.3 percentile
  interval; the basic interval for the Fréchet distance, whose resamples are biased): the same
  resampled prompt sets for every row, so differences between rows are paired.

Research code (the benchmark): nothing the nodes import at start-up uses it.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidInputError


# --------------------------------------------------------------------------------------------------
# Distribution distance


def _check_features(features: object, name: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise InvalidInputError(name, type(features).__name__, "expected a torch.Tensor of features [N, D]")
    if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise InvalidInputError(name, tuple(features.shape),
                                "expected features [N, D] with N ≥ 2 samples (a covariance needs two)")
    if not bool(torch.isfinite(features).all()):
        raise InvalidInputError(name, "non-finite values (NaN or inf)", "expected finite features")
    return features


def _mean_and_covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean ``[D]`` and unbiased covariance ``[D, D]`` (divisor N − 1, as ``numpy.cov``)."""
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix: ``V·diag(√max(λ, 0))·Vᵀ`` from ``eigh``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (FID's formula).

    ``FD = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2·(Σ1Σ2)^{1/2})`` (Heusel et al. 2017, eq. 6; the
    2-Wasserstein distance between N(μ1, Σ1) and N(μ2, Σ2), Dowson & Landau 1982), with sample
    means and unbiased covariances. Computed in float64 in pure torch: ``Σ1Σ2`` is similar to the
    symmetric PSD matrix ``M = Σ1^{1/2}·Σ2·Σ1^{1/2}``, so ``Tr((Σ1Σ2)^{1/2}) = Σ √λ_i(M)`` with the
    eigenvalues of ``M`` (``eigvalsh``) clamped at 0; this avoids the complex results and
    ill-conditioning of a general matrix square root (``scipy.linalg.sqrtm`` in pytorch-fid) on
    rank-deficient covariances (N ≤ D). The result is clamped at 0 (rounding can make it −1e-12).

    Returns:
        the distance (squared units of the features) as a Python float; 0 for identical sets.

    Raises:
        InvalidInputError: naming ``features_a`` / ``features_b`` for a non-``[N, D]`` tensor, N < 2,
            non-finite values, or different D.
    """
    a = _check_features(features_a, "features_a")
    b = _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError("features_b", f"{b.shape[1]} dimensions",
                                f"features_a has {a.shape[1]}; use features from the same extractor for both sets")
    # float64 everywhere; MPS has no float64, so compute there on the CPU
    device = a.device if a.device.type != "mps" else torch.device("cpu")
    a = a.detach().to(device=device, dtype=torch.float64)
    b = b.detach().to(device=device, dtype=torch.float64)
    mean_a, cov_a = _mean_and_covariance(a)
    mean_b, cov_b = _mean_and_covariance(b)
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = (middle + middle.T) / 2  # exact symmetry for eigvalsh
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt
    return max(float(distance), 0.0)


# --------------------------------------------------------------------------------------------------
# Paired bootstrap over prompts


def bootstrap_indices(count: int, resamples: int, seed: int) -> torch.Tensor:
    """``[resamples, count]`` prompt indices drawn with replacement from a seeded generator (CPU):
    the same seed gives the same resamples on every machine, so intervals are reproducible. Use the
    same indices for every row of a comparison: statistics of two rows on one resample are paired."""
    if count < 1 or resamples < 1:
        raise InvalidInputError("count, resamples", (count, resamples), "expected at least one prompt and one resample")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, count, (resamples, count), generator=generator)


def bootstrap_means(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The mean of per-prompt ``values`` ``[N]`` on each resample of ``indices`` ``[R, N]``: ``[R]`` (float64)."""
    return values.detach().to(torch.float64).cpu()[indices].mean(dim=1)


def percentile_interval(statistics: torch.Tensor, level: float = 0.95) -> list[float]:
    """The bootstrap percentile interval ``[q_(1−level)/2, q_(1+level)/2]`` of a statistic's
    resampled values ``[R]`` (linear interpolation between order statistics), as ``[low, high]``."""
    if not 0.0 < level < 1.0:
        raise InvalidInputError("level", level, "expected a confidence level between 0 and 1, e.g. 0.95")
    tail = (1.0 - level) / 2.0
    quantiles = torch.quantile(statistics.detach().to(torch.float64).cpu(),
                               torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return [float(quantiles[0]), float(quantiles[1])]


def basic_interval(statistics: torch.Tensor, estimate: float, level: float = 0.95) -> list[float]:
    """The basic (pivotal) bootstrap interval ``[2θ̂ − q_(1+level)/2, 2θ̂ − q_(1−level)/2]`` (Davison &
    Hinkley 1997, eq. 5.6), for a statistic whose resampled values are biased away from the estimate
    ``θ̂``: the Fréchet distance grows when a resample repeats prompts (fewer distinct images), so its
    percentile interval would sit above the estimate; the basic interval subtracts that shift."""
    low, high = percentile_interval(statistics, level)
    return [2 * estimate - high, 2 * estimate - low]


def prompts_to_resolve(half_width: float, count: int, difference: float) -> int:
    """Prompts needed for an interval of half-width ``difference``, from one of ``half_width``
    measured on ``count`` prompts: a mean's interval narrows as ``1/√N``, so ``N·(h/d)²`` (rounded up)."""
    if not (difference > 0 and count >= 1 and math.isfinite(half_width) and half_width >= 0):
        raise InvalidInputError("difference", difference, "expected a positive difference and a finite half-width")
    return max(1, math.ceil(count * (half_width / difference) ** 2))


class FrechetBootstrap:
    """:func:`frechet_distance` to one reference feature set on every resample of the prompts.

    The reference (real renders of the prompts) is resampled with the same indices as the
    generated features, so prompt ``i`` is compared with its own render in every resample. The
    reference's mean, covariance trace and covariance square root are computed once per resample
    and shared by every row (:meth:`distances`): ``FD = ||μ_r − μ||² + Tr Σ_r + Tr Σ −
    2·Σ √λ_i(Σ_r^{1/2}·Σ·Σ_r^{1/2})``, the formula of :func:`frechet_distance` with the reference
    first (the distance is symmetric), batched over resamples in float64.
    """

    def __init__(self, reference: torch.Tensor, indices: torch.Tensor):
        reference = _check_features(reference, "reference").detach().to(torch.float64).cpu()
        if indices.ndim != 2 or indices.shape[1] != reference.shape[0]:
            raise InvalidInputError("indices", tuple(indices.shape),
                                    f"expected [resamples, {reference.shape[0]}] indices (one per reference row)")
        self.indices = indices
        self.mean, covariance = self._moments(reference)
        self.trace = covariance.diagonal(dim1=1, dim2=2).sum(dim=1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        self.sqrt = (eigenvectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(1)) @ eigenvectors.transpose(1, 2)

    def _moments(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        resampled = features[self.indices]  # [R, N, D]
        mean = resampled.mean(dim=1)
        centred = resampled - mean.unsqueeze(1)
        return mean, centred.transpose(1, 2) @ centred / (features.shape[0] - 1)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """The Fréchet distance of ``features`` ``[N, D]`` to the reference on each resample: ``[R]``."""
        features = _check_features(features, "features").detach().to(torch.float64).cpu()
        if features.shape != (self.indices.shape[1], self.mean.shape[1]):
            raise InvalidInputError("features", tuple(features.shape),
                                    f"expected [{self.indices.shape[1]}, {self.mean.shape[1]}] like the reference")
        mean, covariance = self._moments(features)
        middle = self.sqrt @ covariance @ self.sqrt
        middle = (middle + middle.transpose(1, 2)) / 2
        trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum(dim=1)
        distance = (self.mean - mean).square().sum(dim=1) + self.trace + covariance.diagonal(dim1=1, dim2=2).sum(dim=1)
        return (distance - 2 * trace_sqrt).clamp(min=0)
