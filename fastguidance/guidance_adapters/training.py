"""AGD training, independent of the model: trajectory storage, the optimiser schedule, checkpoints.

Jensen et al., arXiv 2503.07274, §3–4: adapters are trained on **CFG-guided trajectories** (every
step of a CFG sampling run at a random scale ``ω`` gives one example: the sampler's input ``x_t``,
the noise level, the prompt, ``ω`` and CFG's prediction as the target), with the base model frozen,
a mean-squared error and AdamW. Our schedule: linear warm-up, then cosine decay to 0.

- :class:`TrajectoryStore` keeps the examples compactly: inputs and targets in fp16, in memory or,
  above a size limit, in memory-mapped files on disk; :func:`trajectory_bytes` estimates the size
  before collection starts, so a host can show it.
- :class:`DistillationTrainer` owns the optimiser and step counter; :meth:`DistillationTrainer.save`
  / :func:`load_checkpoint` write and read a resumable checkpoint (adapter weights, AdamW moments,
  step, losses) as a pack tensor file.

Hosts (the reference model, ComfyUI) provide the one model-specific piece: a function that returns
the adapted model's prediction for a batch of stored rows.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .adapters import GuidanceAdapters, distillation_loss
from ..errors import FastGuidanceError, InvalidInputError
from ..tensorfile import load_tensor_file, save_tensor_file

CHECKPOINT_FORMAT = "fastguidance.adapter_checkpoint"
CHECKPOINT_VERSION = 1
#: stores larger than this (bytes) go to memory-mapped files instead of memory
DEFAULT_MEMORY_LIMIT = 1 << 30


def trajectory_bytes(examples: int, sample_shape: Sequence[int]) -> int:
    """Bytes of ``examples`` stored examples: fp16 input and target, plus σ, ω (fp32) and prompt (int64)."""
    return examples * (2 * 2 * math.prod(sample_shape) + 4 + 4 + 8)


def format_bytes(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def require_room_for_trajectories(examples: int, sample_shape: Sequence[int], input_name: str, value: object,
                                  memory_limit: int = DEFAULT_MEMORY_LIMIT, directory: str | None = None) -> None:
    """Refuse, before any sampling, a recording that would go to disk (above ``memory_limit``) and not fit
    in the free space of ``directory`` (default: the temporary folder :class:`TrajectoryStore` uses)."""
    size = trajectory_bytes(examples, sample_shape)
    if size <= memory_limit:
        return
    folder = directory or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if size > free:
        raise InvalidInputError(input_name, value, f"recording needs about {format_bytes(size)} on disk in {folder}, "
                                                   f"which has {format_bytes(free)} free: record fewer trajectories "
                                                   "or steps, a smaller width and height, or point TMPDIR to a "
                                                   "larger disk")


class TrajectoryStore:
    """Fixed-capacity storage of trajectory examples (fp16 ``x`` and ``target``; ``σ``, ``ω``, prompt index).

    With ``directory`` set (or automatically when the store would exceed ``memory_limit`` bytes) the
    fp16 arrays are memory-mapped files in that directory (a temporary one by default), deleted by
    :meth:`close`.
    """

    def __init__(self, capacity: int, sample_shape: Sequence[int], memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 directory: str | os.PathLike | None = None):
        if capacity < 1:
            raise InvalidInputError("trajectories", capacity, "collect at least one trajectory step")
        self.capacity, self.sample_shape = capacity, tuple(int(d) for d in sample_shape)
        self.on_disk = directory is not None or trajectory_bytes(capacity, self.sample_shape) > memory_limit
        self._directory: tempfile.TemporaryDirectory | None = None
        shape = (capacity, *self.sample_shape)
        if self.on_disk:
            if directory is None:
                self._directory = tempfile.TemporaryDirectory(prefix="fastguidance_trajectories_",
                                                              ignore_cleanup_errors=True)
                directory = self._directory.name
            self.x = np.lib.format.open_memmap(os.path.join(directory, "x.npy"), "w+", np.float16, shape)
            self.target = np.lib.format.open_memmap(os.path.join(directory, "target.npy"), "w+", np.float16, shape)
        else:
            self.x, self.target = np.zeros(shape, np.float16), np.zeros(shape, np.float16)
        self.sigma = torch.zeros(capacity)
        self.omega = torch.zeros(capacity)
        self.prompt = torch.zeros(capacity, dtype=torch.long)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def append(self, x: torch.Tensor, sigma: torch.Tensor, omega: float | torch.Tensor, prompt: int | torch.Tensor,
               target: torch.Tensor) -> int:
        """Store a batch of examples (``x``, ``target``: ``[B, *sample_shape]``); returns how many fit."""
        rows = min(x.shape[0], self.capacity - self.count)
        if rows <= 0:
            return 0
        if tuple(x.shape[1:]) != self.sample_shape or x.shape != target.shape:
            raise InvalidInputError("trajectory", tuple(x.shape), f"every example must have shape {self.sample_shape}; "
                                    "use one latent size for all trajectories")
        where = slice(self.count, self.count + rows)
        self.x[where] = x[:rows].detach().to("cpu", torch.float16).numpy()
        self.target[where] = target[:rows].detach().to("cpu", torch.float16).numpy()
        self.sigma[where] = sigma.detach().float().cpu().reshape(-1)[:rows] if torch.is_tensor(sigma) else float(sigma)
        self.omega[where] = omega.detach().float().cpu().reshape(-1)[:rows] if torch.is_tensor(omega) else float(omega)
        self.prompt[where] = prompt.detach().cpu().reshape(-1)[:rows] if torch.is_tensor(prompt) else int(prompt)
        self.count += rows
        return rows

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, σ, ω, prompt, target)`` of ``rows`` (x and target as fp32 CPU tensors)."""
        index = rows.cpu().numpy()
        x = torch.from_numpy(np.asarray(self.x[index], dtype=np.float32))
        target = torch.from_numpy(np.asarray(self.target[index], dtype=np.float32))
        return x, self.sigma[rows], self.omega[rows], self.prompt[rows], target

    def size_bytes(self) -> int:
        return trajectory_bytes(self.count, self.sample_shape)

    def close(self) -> None:
        self.x = self.target = None
        if self._directory is not None:
            self._directory.cleanup()  # the memmaps were dropped above (Windows cannot delete open files)
            self._directory = None


@dataclass(frozen=True)
class TrainingSettings:
    """The optimiser's settings (also what a checkpoint must match to be resumed)."""

    steps: int = 600
    batch: int = 16
    learning_rate: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise InvalidInputError("train_steps", self.steps, "train for at least 1 step")
        if self.batch < 1:
            raise InvalidInputError("batch", self.batch, "use a batch of at least 1")
        if not self.learning_rate > 0:
            raise InvalidInputError("learning_rate", self.learning_rate, "use a positive learning rate (1e-4 … 3e-3)")

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
        if step < self.warmup:
            return self.learning_rate * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class DistillationTrainer:
    """AdamW on the adapters' parameters with :meth:`TrainingSettings.learning_rate_at`; resumable."""

    adapters: GuidanceAdapters
    settings: TrainingSettings
    step: int = 0
    losses: list[float] = field(default_factory=list)
    #: a ``torch.amp.GradScaler`` where gradients flow through fp16 activations (else None)
    scaler: Any = None

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.adapters.parameters(), lr=self.settings.learning_rate,
                                           weight_decay=self.settings.weight_decay)

    @property
    def done(self) -> bool:
        return self.step >= self.settings.steps

    def sample_rows(self, count: int) -> torch.Tensor:
        """Rows of the next batch (seeded; a resumed run draws the same rows as an uninterrupted one)."""
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.step)
        return torch.randint(0, count, (self.settings.batch,), generator=generator)

    def train_step(self, loss_of: Callable[[], torch.Tensor]) -> float:
        """One optimiser step on ``loss_of()`` (which runs the adapted model on the batch)."""
        self.adapters.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.learning_rate_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # scaled loss; a step whose gradients overflowed is skipped and the scale lowered
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def final_loss(self, window: int = 50) -> float:
        tail = self.losses[-window:]
        return sum(tail) / len(tail) if tail else math.nan

    def save(self, path: str | Path, identity: dict[str, Any]) -> Path:
        """Write a resumable checkpoint; ``identity`` (spec, model, data settings) must match to resume."""
        tensors = {f"adapters.{key}": value for key, value in self.adapters.state_dict().items()}
        params = list(self.adapters.parameters())
        for index, param in enumerate(params):
            state = self.optimizer.state.get(param, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    tensors[f"optimizer.{index}.{name}"] = state[name]
        metadata = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
                    "losses": self.losses, "settings": _settings_dict(self.settings), "identity": identity}
        return save_tensor_file(path, tensors, metadata, overwrite=True)

    def resume(self, path: str | Path, identity: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`save` for the same identity and settings."""
        tensors, metadata = load_tensor_file(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
        if metadata.get("settings") != _settings_dict(self.settings) or metadata.get("identity") != _jsonable(identity):
            raise FastGuidanceError(f"{path} is a checkpoint of another training (other settings, model or data): "
                                    "use the same inputs to resume it, or turn off resume to start again")
        self.adapters.load_state_dict({key[len("adapters."):]: value for key, value in tensors.items()
                                       if key.startswith("adapters.")})
        params = list(self.adapters.parameters())
        for index, param in enumerate(params):
            if f"optimizer.{index}.exp_avg" in tensors:
                self.optimizer.state[param] = {
                    "step": torch.tensor(float(metadata["step"])),
                    "exp_avg": tensors[f"optimizer.{index}.exp_avg"].to(param),
                    "exp_avg_sq": tensors[f"optimizer.{index}.exp_avg_sq"].to(param)}
        self.step, self.losses = int(metadata["step"]), list(metadata["losses"])


def _settings_dict(settings: TrainingSettings) -> dict[str, Any]:
    return _jsonable(settings.__dict__)


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


class _RecomputedInBackward(torch.autograd.Function):
    """Runs ``run(args)`` without keeping its activations; recomputes them in the backward pass.

    Keeps only the tensor values of ``args`` that are its top-level entries (the inputs); runs on clones of
    them, so a block that updates its inputs in place (the host's Flux blocks: ``txt += …``) never changes
    what backward recomputes from. Gradients flow to those top-level tensors only: nested tensors (in
    ``transformer_options``) and the frozen model's parameters get none, which is what adapter training needs.
    """

    @staticmethod
    def forward(ctx, run, recompute_context, args, keys, names, *values):
        ctx.run, ctx.recompute_context, ctx.args, ctx.keys = run, recompute_context, args, keys
        ctx.save_for_backward(*values)
        out = run({**args, **{key: value.clone() for key, value in zip(keys, values)}})
        # the caller reads the output's names and non-tensor entries from ``names`` (apply returns a tuple)
        names["tensors"] = ctx.out_keys = [key for key, value in out.items() if torch.is_tensor(value)]
        names["rest"] = {key: value for key, value in out.items() if not torch.is_tensor(value)}
        return tuple(out[key] for key in ctx.out_keys)

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[5:]
        inputs = [value.detach().requires_grad_(need) for value, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad(), ctx.recompute_context():
            out = ctx.run({**ctx.args, **{key: value.clone() for key, value in zip(ctx.keys, inputs)}})
        pairs = [(out[key], grad) for key, grad in zip(ctx.out_keys, grads)
                 if grad is not None and out[key].requires_grad]
        wanted = [value for value, need in zip(inputs, needs) if need]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, None, None, None, None, *[next(found) if need else None for need in needs])


def recomputed_in_backward(run: Callable[[dict], dict], args: dict,
                           recompute_context: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174) of one block: ``run(args) → dict``.

    Between forward and backward only the block's tensor inputs are kept (one block's activations exist at
    a time, during its recomputation), for one more forward pass of the block per training step. The result
    equals ``run(args)``; so do the gradients, up to the order of floating-point sums. ``recompute_context``
    wraps the recomputation (the hooks the forward pass ran under, e.g. copies of saved activations).
    A block none of whose inputs needs a gradient is simply run: autograd keeps nothing for it anyway.
    """
    keys = [key for key, value in args.items() if torch.is_tensor(value)]
    values = [args[key] for key in keys]
    if not torch.is_grad_enabled() or not any(value.requires_grad for value in values):
        return run(args)
    rest = {key: value for key, value in args.items() if key not in keys}
    names: dict = {}
    outputs = _RecomputedInBackward.apply(run, recompute_context, rest, keys, names, *values)
    return {**names["rest"], **dict(zip(names["tensors"], outputs))}


def train_on_store(trainer: DistillationTrainer, store: TrajectoryStore,
                   predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   progress: Callable[[int, int, float], None] | None = None,
                   checkpoint: Callable[[DistillationTrainer], None] | None = None, checkpoint_every: int = 0) -> list[float]:
    """Train until ``trainer.done``: ``predict(x, σ, ω, prompt) → prediction`` comparable with the stored target.

    ``checkpoint(trainer)`` is called every ``checkpoint_every`` steps (0: never) and by the caller
    on interruption. The loss is :func:`fastguidance.guidance_adapters.adapters.distillation_loss`.
    """
    if len(store) == 0:
        raise FastGuidanceError("no trajectory steps were collected: nothing to train on")
    while not trainer.done:
        x, sigma, omega, prompt, target = store.batch(trainer.sample_rows(len(store)))
        def loss_of() -> torch.Tensor:
            prediction = predict(x, sigma, omega, prompt)
            return distillation_loss(prediction, target.to(prediction.device))

        loss = trainer.train_step(loss_of)
        if progress is not None:
            progress(trainer.step, trainer.settings.steps, loss)
        if checkpoint is not None and checkpoint_every and trainer.step % checkpoint_every == 0 and not trainer.done:
            checkpoint(trainer)
    trainer.adapters.eval()
    return trainer.losses
