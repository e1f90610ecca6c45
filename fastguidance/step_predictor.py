"""AdaDiff: predict the number of sampling steps from the prompt's embedding.

Zhang et al., "AdaDiff: Adaptive Step Selection for Fast Diffusion Models", arXiv 2311.14768 (seed
``003_…``): a lightweight step-selection network reads the prompt's text embedding and outputs a
distribution over step options (paper: 10, 20, 30, 40, 50); it is trained by policy gradient to
maximise ``E[R(u)]`` with a reward that trades quality against steps; at inference the most likely
option is taken.

**Features** (:func:`conditioning_features`): the mean of the token embeddings over the real tokens
and, where the model has one, the pooled vector, concatenated; normalised by the mean and standard
deviation of the training prompts' features (stored with the predictor).

**Reward** (:func:`step_reward`): ``R = q − λ·(steps / max steps)``, with ``q`` a quality score in
[0, 1]. The paper's image-quality scorer (IQS) is a learned model that cannot be downloaded here;
the default ``q`` is the SSIM (kornia) of the image to the max-steps image of the same seed and
prompt (fidelity to the full-cost result). Any other score can be passed to :class:`StepPolicyTrainer`.

**Update** (:meth:`StepPolicyTrainer.update`): REINFORCE (Williams 1992) with a moving-average
baseline ``b`` and an entropy bonus: ``loss = −mean((R − b)·log π(u)) − β·mean(H(π))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import InvalidInputError, TensorFileError
from .metrics import ssim
from .tensorfile import interpreting, load_tensor_file, module_from_file, save_tensor_file

FORMAT = "fastguidance.step_predictor"
FORMAT_VERSION = 1
PAPER_OPTIONS = (10, 20, 30, 40, 50)


def conditioning_features(tokens: torch.Tensor, pooled: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, D (+P)]`` features of a batch of prompts (module docstring), in fp32.

    Args:
        tokens: token embeddings ``[B, T, D]`` (the host's CONDITIONING tensor).
        pooled: the pooled vector ``[B, P]`` where the model has one, else ``None``.
        mask: ``[B, T]``, 1 for real tokens; ``None`` averages over every token.
    """
    if tokens.dim() != 3:
        raise InvalidInputError("conditioning", tuple(tokens.shape), "expected token embeddings of shape [batch, tokens, width]")
    tokens = tokens.float()
    if mask is None:
        mean = tokens.mean(dim=1)
    else:
        weights = mask.float().unsqueeze(-1)
        mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if pooled is None:
        return mean
    if pooled.shape[0] != tokens.shape[0]:
        raise InvalidInputError("pooled_output", tuple(pooled.shape), f"expected one pooled vector per prompt ({tokens.shape[0]})")
    return torch.cat([mean, pooled.float().reshape(pooled.shape[0], -1)], dim=1)


def latent_fidelity(candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM per sample between latents, each pair scaled to [0, 1] by the reference's own range.

    The default quality when no VAE is given (module docstring). 5-D video latents
    ``[B, C, T, H, W]`` are compared with their frames as channels.
    """
    if candidate.shape != reference.shape:
        raise InvalidInputError("latent", tuple(candidate.shape), f"expected the reference's shape {tuple(reference.shape)}")
    flat_c = candidate.float().reshape(candidate.shape[0], -1, *candidate.shape[-2:])
    flat_r = reference.float().reshape(reference.shape[0], -1, *reference.shape[-2:])
    low = flat_r.amin(dim=(1, 2, 3), keepdim=True)
    span = (flat_r.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-6)
    return ssim(((flat_c - low) / span).clamp(0, 1), ((flat_r - low) / span).clamp(0, 1))


def step_reward(quality: torch.Tensor, steps: torch.Tensor, max_steps: int, cost_weight: float) -> torch.Tensor:
    """``R = q − λ·(steps / max steps)`` per sample (module docstring)."""
    return quality.float() - cost_weight * steps.float() / float(max_steps)


class StepPredictor(nn.Module):
    """Features → distribution over step options: normalisation, a two-layer MLP, softmax.

    Well under a million parameters for the host's conditioning widths (768 + 1280 features and
    the default hidden width of 128: 262 k).
    """

    def __init__(self, feature_dim: int, options: Sequence[int] = PAPER_OPTIONS, hidden: int = 128):
        super().__init__()
        validate_step_options(options)
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.feature_dim, self.options, self.hidden = int(feature_dim), tuple(int(o) for o in options), int(hidden)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.network = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, len(self.options)))
        nn.init.zeros_(self.network[-1].weight)  # start uniform over the options: exploration first
        nn.init.zeros_(self.network[-1].bias)

    def set_normalisation(self, features: torch.Tensor) -> None:
        """Normalise inputs by these features' mean and standard deviation (the training prompts')."""
        self.feature_mean.copy_(features.float().mean(dim=0))
        self.feature_std.copy_(features.float().std(dim=0, unbiased=False).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over :attr:`options`, ``[B, len(options)]``."""
        if features.shape[-1] != self.feature_dim:
            raise InvalidInputError("conditioning", features.shape[-1],
                                    f"this predictor reads {self.feature_dim} features; it was trained for "
                                    "another conditioning width (another model family): train one for this model")
        normalised = (features.float() - self.feature_mean) / self.feature_std
        return self.network(normalised)

    @torch.no_grad()
    def choose(self, features: torch.Tensor) -> list[int]:
        """The most likely step count per prompt (deterministic, as at inference in the paper)."""
        return [self.options[i] for i in self(features).argmax(dim=-1).tolist()]

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def validate_step_options(options: Sequence[int]) -> None:
    values = list(options)
    if len(values) < 2 or any(int(v) != v or v < 1 for v in values) or len(set(values)) != len(values):
        raise InvalidInputError("step_options", values, "give at least two different positive step counts, "
                                                        "e.g. 10, 20, 30, 40, 50")


def parse_step_options(text: str) -> tuple[int, ...]:
    """``"10, 20, 30"`` → ``(10, 20, 30)`` (sorted), or an error naming the input."""
    try:
        values = tuple(sorted(int(part) for part in text.replace(";", ",").split(",") if part.strip()))
    except ValueError:
        raise InvalidInputError("step_options", text, "write whole numbers separated by commas, e.g. 10, 20, 30, 40, 50") from None
    validate_step_options(values)
    return values


@dataclass
class TrainingLog:
    """Per update: mean reward, mean chosen steps, baseline, entropy."""

    reward: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)


class StepPolicyTrainer:
    """REINFORCE with a moving-average baseline and an entropy bonus (module docstring).

    Args:
        predictor: the network to train (its normalisation set beforehand).
        cost_weight: λ of the reward.
        learning_rate, entropy_weight (β), baseline_momentum: optimiser settings.
        seed: seeds the sampling of step options.
    """

    def __init__(self, predictor: StepPredictor, cost_weight: float = 0.3, learning_rate: float = 3e-3,
                 entropy_weight: float = 0.01, baseline_momentum: float = 0.9, seed: int = 0):
        if not 0.0 <= cost_weight <= 10.0:
            raise InvalidInputError("cost_weight", cost_weight, "use λ between 0 (quality only) and 10; 0.3 is a good start")
        self.predictor = predictor
        self.cost_weight = cost_weight
        self.entropy_weight = entropy_weight
        self.baseline_momentum = baseline_momentum
        self.baseline: float | None = None
        self.optimizer = torch.optim.Adam(predictor.parameters(), lr=learning_rate)
        self.generator = torch.Generator().manual_seed(seed)
        self.log = TrainingLog()

    def sample(self, features: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Draw one option per prompt from the current policy: (option indices, step counts)."""
        with torch.no_grad():
            probabilities = torch.softmax(self.predictor(features), dim=-1)
        indices = torch.multinomial(probabilities, 1, generator=self.generator).squeeze(1)
        return indices, [self.predictor.options[i] for i in indices.tolist()]

    def update(self, features: torch.Tensor, indices: torch.Tensor, quality: torch.Tensor) -> float:
        """One policy-gradient step from the qualities of the sampled options; returns the mean reward."""
        steps = torch.tensor([self.predictor.options[i] for i in indices.tolist()], dtype=torch.float32)
        # a plain copy: qualities computed under the host's inference mode cannot join autograd
        quality = torch.tensor([float(q) for q in quality.reshape(-1).tolist()])
        reward = step_reward(quality, steps, max(self.predictor.options), self.cost_weight)
        mean_reward = float(reward.mean())
        baseline = mean_reward if self.baseline is None else self.baseline
        logits = self.predictor(features)
        log_probabilities = torch.log_softmax(logits, dim=-1)
        chosen = log_probabilities.gather(1, indices.reshape(-1, 1)).squeeze(1)
        entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=-1)
        loss = -((reward - baseline) * chosen).mean() - self.entropy_weight * entropy.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.baseline = mean_reward if self.baseline is None else (
            self.baseline_momentum * self.baseline + (1 - self.baseline_momentum) * mean_reward)
        self.log.reward.append(mean_reward)
        self.log.steps.append(float(steps.mean()))
        self.log.baseline.append(self.baseline)
        self.log.entropy.append(float(entropy.detach().mean()))
        return mean_reward


def train_step_policy(predictor: StepPredictor, features: torch.Tensor,
                      quality_of: Callable[[torch.Tensor, list[int]], torch.Tensor], iterations: int,
                      batch: int = 16, cost_weight: float = 0.3, seed: int = 0,
                      progress: Callable[[int, int, float], None] | None = None, **trainer_options) -> TrainingLog:
    """Train ``predictor`` on a pool of prompt ``features``.

    ``quality_of(rows, steps)`` returns the quality in [0, 1] of sampling prompts ``rows`` (indices
    into ``features``) with the given step counts; it is where the model runs. ``progress(i, n,
    mean_reward)`` is called after every update.
    """
    if iterations < 1:
        raise InvalidInputError("iterations", iterations, "train for at least one iteration")
    predictor.set_normalisation(features)
    trainer = StepPolicyTrainer(predictor, cost_weight=cost_weight, seed=seed, **trainer_options)
    generator = torch.Generator().manual_seed(seed + 1)
    for iteration in range(iterations):
        rows = torch.randperm(features.shape[0], generator=generator)[:batch]
        indices, steps = trainer.sample(features[rows])
        quality = quality_of(rows, steps)
        reward = trainer.update(features[rows], indices, quality)
        if progress is not None:
            progress(iteration + 1, iterations, reward)
    return trainer.log


def save_step_predictor(predictor: StepPredictor, path: str | Path, info: dict[str, Any], overwrite: bool = False) -> Path:
    """Write the predictor with its metadata (options, λ, sampler, scheduler, width, fingerprint, curve)."""
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "method": "adadiff", **info,
                "options": list(predictor.options), "feature_dim": predictor.feature_dim, "hidden": predictor.hidden}
    return save_tensor_file(path, predictor.state_dict(), metadata, overwrite)


def load_step_predictor(path: str | Path) -> tuple[StepPredictor, dict[str, Any]]:
    tensors, metadata = load_tensor_file(path, FORMAT, FORMAT_VERSION, "train one with FastGuidance_TrainStepPredictor")
    with interpreting(path, "step predictor"):
        feature_dim, options, hidden = metadata["feature_dim"], metadata["options"], metadata["hidden"]
        if not (isinstance(feature_dim, int) and isinstance(hidden, int) and isinstance(options, list)
                and all(isinstance(option, int) and not isinstance(option, bool) for option in options)):
            raise TensorFileError(f"{path} is not a valid step predictor file: feature_dim, hidden and options must "
                                  f"be whole numbers (found {feature_dim!r}, {hidden!r}, {options!r}): train it again")
        validate_step_options(options)
    predictor = module_from_file(path, "step predictor", lambda: StepPredictor(feature_dim, options, hidden), tensors)
    return predictor.eval().requires_grad_(False), metadata


def complexity_correlation(complexity: Sequence[float], steps: Sequence[float]) -> float:
    """Pearson correlation of prompt complexity and chosen steps (nan when either is constant)."""
    x = torch.tensor(complexity, dtype=torch.float64)
    y = torch.tensor(steps, dtype=torch.float64)
    if len(x) < 2 or float(x.std()) == 0.0 or float(y.std()) == 0.0:
        return math.nan
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])
