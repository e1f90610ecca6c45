"""Adapter Guidance Distillation (AGD): small adapters that make one forward pass return CFG's result.

Jensen et al., "Efficient Distillation of Classifier-Free Guidance using Adapters", arXiv 2503.07274
(seed ``001_…``; reference code cristianpjensen/agd, MIT, read, not copied). A frozen base model gets
residual adapters after its cross-attention blocks, conditioned on the guidance scale ``ω``
(Fourier features + MLP), the noise level and the prompt; they are trained so that the single
conditional pass matches the CFG prediction ``ε_u + ω·(ε_c − ε_u)`` on **CFG-guided trajectories**.

This module is the model-agnostic core:

- :class:`AdapterConditioner`: ``(ω, σ, pooled prompt vector) → e``, computed once per model call
  (Fourier features of ``ω`` and ``log σ``, a projection of the pooled vector, an MLP);
- :class:`OffsetAdapter` (``n + f(e)``, the paper's offset adapter, best for DiT) and
  :class:`CrossAttentionAdapter` (``n + Attn(n + g(e), tokens)``, the paper's choice for
  text-to-image UNets), each added to one attention block's output ``n``;
- :class:`GuidanceAdapters`: the set for a model's attach points, with :meth:`GuidanceAdapters.bind`
  returning the function a host calls at each attach point during one model call (the per-call
  state lives in that bound object, never in the modules).

Initialisation follows the paper's finding (Xavier initialisation beat zero initialisation): hidden
layers are Xavier-initialised; the adapters' output projections start small (``0.1×`` Xavier) so
that training starts near the base model's conditional prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import InvalidInputError, TensorFileError
from ..tensorfile import (interpreting, load_tensor_file, module_from_file, read_tensor_file_header,
                          require_tensors_fit, save_tensor_file)
from ..validation import is_finite_number

ADAPTER_KINDS = ("cross_attention", "offset")
FORMAT = "fastguidance.adapters"
FORMAT_VERSION = 1
MISSING_HINT = "train adapters for this model first"


class FourierFeatures(nn.Module):
    """``v → [sin(2π·f_k·v), cos(2π·f_k·v)]`` with fixed log-spaced frequencies ``f_k`` (``[B] → [B, 2K]``)."""

    def __init__(self, count: int = 8, min_frequency: float = 0.05, max_frequency: float = 4.0):
        super().__init__()
        frequencies = torch.exp(torch.linspace(math.log(min_frequency), math.log(max_frequency), count))
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        # ``frequencies`` is a buffer: it moves with the module (the host's ModelPatcher), so on the
        # module's device this ``to`` is a no-op; it only copies for values on another device
        angles = 2 * math.pi * values.float().reshape(-1, 1) * self.frequencies.to(values.device)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def _xavier(linear: nn.Linear, gain: float = 1.0) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight, gain=gain)
    nn.init.zeros_(linear.bias)
    return linear


class AdapterConditioner(nn.Module):
    """``(ω, σ, pooled) → e ∈ R^E``: what every adapter of a model call is conditioned on."""

    def __init__(self, pooled_dim: int, embed_dim: int = 128, fourier: int = 8):
        super().__init__()
        self.omega_features = FourierFeatures(fourier, 0.05, 2.0)
        self.sigma_features = FourierFeatures(fourier, 0.05, 2.0)
        self.pooled = _xavier(nn.Linear(pooled_dim, embed_dim)) if pooled_dim > 0 else None
        self.mlp = nn.Sequential(_xavier(nn.Linear(4 * fourier + (embed_dim if pooled_dim > 0 else 0), embed_dim)),
                                 nn.SiLU(), _xavier(nn.Linear(embed_dim, embed_dim)))

    def forward(self, omega: torch.Tensor, sigma: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        parts = [self.omega_features(omega), self.sigma_features(torch.log(sigma.float().clamp(min=1e-4)))]
        if self.pooled is not None:
            if pooled is None:
                raise InvalidInputError("pooled", None, "these adapters read the prompt's pooled vector: pass it")
            parts.append(self.pooled(pooled.float()))
        return self.mlp(torch.cat(parts, dim=1))


class OffsetAdapter(nn.Module):
    """``n + W₂·SiLU(W₁·e)``: a per-channel offset of the attention output (the same for every token)."""

    def __init__(self, channels: int, embed_dim: int, hidden: int):
        super().__init__()
        self.hidden = _xavier(nn.Linear(embed_dim, hidden))
        self.out = _xavier(nn.Linear(hidden, channels), gain=0.1)

    def delta(self, n: torch.Tensor, embedding: torch.Tensor, tokens=None, mask=None) -> torch.Tensor:
        hidden = self.hidden(embedding.to(self.hidden.weight.dtype))
        return self.out(torch.nn.functional.silu(hidden)).unsqueeze(1)

    def forward(self, n: torch.Tensor, embedding: torch.Tensor, tokens=None, mask=None) -> torch.Tensor:
        return n + self.delta(n, embedding, tokens, mask).to(n.dtype)


class CrossAttentionAdapter(nn.Module):
    """``n + W_o·Attn(W_q·n + W_e·e, W_k·tokens, W_v·tokens)``: a small cross-attention to the prompt."""

    def __init__(self, channels: int, text_dim: int, embed_dim: int, hidden: int, heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise InvalidInputError("width", hidden, f"use a multiple of {heads} (the adapter's attention heads)")
        self.heads = heads
        self.query = _xavier(nn.Linear(channels, hidden))
        self.embed = _xavier(nn.Linear(embed_dim, hidden))
        self.key = _xavier(nn.Linear(text_dim, hidden))
        self.value = _xavier(nn.Linear(text_dim, hidden))
        self.out = _xavier(nn.Linear(hidden, channels), gain=0.1)

    def delta(self, n: torch.Tensor, embedding: torch.Tensor, tokens: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = n.shape
        dtype = self.query.weight.dtype  # the projections' dtype (GuidanceAdapters.compute_in)
        q = self.query(n.to(dtype)) + self.embed(embedding.to(dtype)).unsqueeze(1)
        k, v = self.key(tokens.to(dtype)), self.value(tokens.to(dtype))

        def heads(t: torch.Tensor) -> torch.Tensor:  # the attention itself in fp32, whatever the projections'
            return t.float().reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        attended = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask)
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1).to(dtype))

    def forward(self, n: torch.Tensor, embedding: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return n + self.delta(n, embedding, tokens, mask).to(n.dtype)


@dataclass(frozen=True)
class AdapterSpec:
    """What a set of adapters is built for (stored in the adapter file's metadata)."""

    attach_points: Mapping[str, int]  # attach point name → channels of its attention output
    text_dim: int  # width of the prompt tokens
    pooled_dim: int  # width of the pooled vector (0: none)
    kind: str = "cross_attention"
    hidden: int = 64
    embed_dim: int = 128

    def to_dict(self) -> dict[str, Any]:
        return {"attach_points": dict(self.attach_points), "text_dim": self.text_dim, "pooled_dim": self.pooled_dim,
                "kind": self.kind, "hidden": self.hidden, "embed_dim": self.embed_dim}


class GuidanceAdapters(nn.Module):
    """The adapters of one model: a conditioner and one adapter per attach point."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        if spec.kind not in ADAPTER_KINDS:
            raise InvalidInputError("kind", spec.kind, f"choose one of {', '.join(ADAPTER_KINDS)}")
        if not spec.attach_points:
            raise InvalidInputError("attach_points", {}, "the model has no attach point for adapters")
        if spec.hidden < 4:
            raise InvalidInputError("width", spec.hidden, "use an adapter width of at least 4 (64–128 is typical)")
        self.spec = spec
        self.conditioner = AdapterConditioner(spec.pooled_dim, spec.embed_dim)
        self.adapters = nn.ModuleDict({
            _module_key(name): (CrossAttentionAdapter(channels, spec.text_dim, spec.embed_dim, spec.hidden)
                                if spec.kind == "cross_attention" else OffsetAdapter(channels, spec.embed_dim, spec.hidden))
            for name, channels in spec.attach_points.items()})

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compute_in(self, dtype: torch.dtype) -> "GuidanceAdapters":
        """Run the adapters of the attach points in ``dtype`` (their weights cast once, in place): a bf16 or fp16
        model's own, so that they take half the memory and no attach point converts the model's activations
        (its full width) to fp32 and back. Two parts stay in fp32, both small: the conditioner, which runs once
        per call on ``[B]`` values and whose Fourier features of ``ω`` and ``log σ`` reach angles of
        ``2π·2·30 ≈ 377`` rad, which bf16's 8-bit mantissa would get wrong by more than a radian; and the
        cross-attention adapters' attention (logits and softmax, at the adapters' width), where bf16 logits of
        a few tens err by tenths. Tolerances, stated and checked by tests: the bundled adapters' images
        (tests/test_adapters.py) and every attach point's output on a bf16 and an fp16 host model
        (tests/comfy/test_guidance_adapter_host.py) within 3% of fp32's; ``benchmarks/adapter_precision.py``
        sets what they move a host model's sampling beside what the model's own precision moves it."""
        self.adapters.to(dtype)
        return self

    def copy_on(self, device: torch.device | str) -> "GuidanceAdapters":
        """A copy of the adapters on ``device`` for one use, this module left where it is: what a host that
        loaded only part of them (its offload device holds the rest) needs for one model call, as it copies
        the weights of the layers it could not load for each call. Its weights keep their dtypes."""
        with torch.device("meta"):
            copy = GuidanceAdapters(self.spec)
        copy.load_state_dict({name: tensor.to(device) for name, tensor in self.state_dict().items()}, assign=True)
        for name, buffer in self.named_buffers():  # computed constants, not in the state dict
            owner, _, key = name.rpartition(".")
            copy.get_submodule(owner)._buffers[key] = buffer.to(device)
        return copy.eval().requires_grad_(False)

    def bind(self, omega: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, row_scale: torch.Tensor | float | None = None) -> "BoundAdapters":
        """The adapters for one model call: the embedding is computed once here, for every attach point.

        ``row_scale`` (optional) multiplies the adapter output: one number for every row, or ``[B]``, one
        per sample: the host's strength on the conditional rows and 0 on rows that must stay the plain
        model (an uncond in the batch). :func:`adapter_row_scale` makes it without a host→device copy.
        """
        return BoundAdapters(self, self.conditioner(omega, sigma, pooled), tokens, mask, row_scale)


@dataclass
class BoundAdapters:
    """One model call's adapters; call it at an attach point: ``n = bound(name, n)``."""

    adapters: GuidanceAdapters
    embedding: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None
    row_scale: torch.Tensor | float | None = None

    def __call__(self, name: str, n: torch.Tensor) -> torch.Tensor:
        key = _module_key(name)
        if key not in self.adapters.adapters:
            raise KeyError(f"no adapter for attach point {name!r}; these adapters were made for "
                           f"{sorted(self.adapters.spec.attach_points)}")
        delta = self.adapters.adapters[key].delta(n, self.embedding, self.tokens, self.mask)
        if torch.is_tensor(self.row_scale):
            delta = delta * self.row_scale.reshape(-1, *([1] * (delta.dim() - 1))).to(delta)
        elif self.row_scale is not None:
            delta = delta * self.row_scale
        return n + delta.to(n.dtype)


def adapter_row_scale(cond_or_uncond: Sequence[int] | None, batch: int, strength: float,
                      device: torch.device | str) -> torch.Tensor | float | None:
    """The ``row_scale`` of one model call's batch (:meth:`GuidanceAdapters.bind`), made without host data.

    ``cond_or_uncond`` lists the batch's chunks as the host does (0 = cond, 1 = uncond; ``None`` or
    empty: all cond), each ``batch / len(cond_or_uncond)`` rows. Cond rows get ``strength``, uncond rows
    0. Returns ``None`` when every row is 1 (nothing to scale), a Python number when every row shares
    one value, else a ``[batch]`` float32 tensor filled on ``device`` chunk by chunk (fills, no
    host→device copy: ``torch.tensor(rows).to(device)`` would block the host on every call).
    """
    kinds = list(cond_or_uncond) if cond_or_uncond else [0]
    values = [float(strength) if kind == 0 else 0.0 for kind in kinds]
    if all(value == values[0] for value in values):
        return None if values[0] == 1.0 else values[0]
    per_chunk = batch // len(kinds)
    scale = torch.empty(batch, dtype=torch.float32, device=device)
    for index, value in enumerate(values):
        scale[index * per_chunk:(index + 1) * per_chunk].fill_(value)
    return scale


def prompt_vector(tokens: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """What the conditioner reads of the prompt: the model's pooled vector, or the token mean where it has none
    (SD1.x passes only tokens)."""
    return pooled if pooled is not None else tokens.float().mean(dim=1)


def _module_key(name: str) -> str:
    return name.replace(".", "__")


def cfg_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """The distillation target, CFG's prediction ``ε_u + ω·(ε_c − ε_u)`` per sample."""
    view = omega.reshape(-1, *([1] * (eps_cond.dim() - 1))).to(eps_cond.dtype)
    return eps_uncond + view * (eps_cond - eps_uncond)


def distillation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the single-pass prediction to the CFG target (the paper's L2 loss; L1 did worse)."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def save_adapters(adapters: GuidanceAdapters, path: str | Path, info: dict[str, Any], overwrite: bool = False) -> Path:
    """Write adapter weights with their spec and ``info`` (architecture, fingerprint, ω range, training)."""
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "method": "agd", **info, "spec": adapters.spec.to_dict(),
                "parameters": adapters.count_parameters()}
    return save_tensor_file(path, adapters.state_dict(), metadata, overwrite)


def load_adapters(path: str | Path) -> tuple[GuidanceAdapters, dict[str, Any]]:
    """The adapters of a file and its metadata, every check made (the values' too: finite weights)."""
    tensors, metadata = load_tensor_file(path, FORMAT, FORMAT_VERSION, MISSING_HINT)
    spec = _spec_of(path, metadata)
    adapters = module_from_file(path, "guidance adapter", lambda: GuidanceAdapters(spec), tensors)
    return adapters.eval().requires_grad_(False), metadata


def read_adapters_header(path: str | Path) -> dict[str, Any]:
    """The metadata of an adapter file, with every check of :func:`load_adapters` that needs no tensor
    value (format, version, spec, architecture, ω range, each tensor's name and shape): what the loader
    node checks when a prompt is queued, reading the file's header only (a Wan 14B file holds about
    480 MB of weights)."""
    entries, metadata = read_tensor_file_header(path, FORMAT, FORMAT_VERSION, MISSING_HINT)
    spec = _spec_of(path, metadata)
    require_tensors_fit(path, "guidance adapter", lambda: GuidanceAdapters(spec), entries)
    return metadata


def _spec_of(path: str | Path, metadata: dict[str, Any]) -> AdapterSpec:
    """The spec of an adapter file's metadata, or :class:`TensorFileError` saying what is wrong with it."""
    with interpreting(path, "guidance adapter"):
        spec = AdapterSpec(**metadata["spec"])
        if not isinstance(metadata.get("architecture"), str):
            raise TensorFileError(f"{path} does not name the architecture it was trained for: train it again")
        omega_range = metadata.get("omega_range")
        if omega_range is not None and not (isinstance(omega_range, list) and len(omega_range) == 2
                                            and all(is_finite_number(value) for value in omega_range)
                                            and omega_range[0] <= omega_range[1]):
            raise TensorFileError(f"{path} has an invalid omega_range {omega_range!r} (expected [low, high]): "
                                  "train it again")
    return spec
