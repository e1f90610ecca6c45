"""The reference text-to-image diffusion model: small, real, trained on the procedural scenes.

Built like the host's models, at toy scale:

- :class:`Tokenizer`: a fixed vocabulary (the scene grammar), prompts → token ids ``[B, T]``;
- :class:`TextEncoder`: token + position embeddings and a small transformer → token embeddings
  ``(B, T, D)`` plus a pooled vector ``(B, D)`` (the end-of-text token's output, as CLIP's): the
  shape of ComfyUI's CONDITIONING;
- :class:`SceneUNet`: an epsilon-prediction UNet in pixel space (32×32 RGB) with cross-attention to
  the tokens at 16×16 and 8×8 and the pooled vector added to the time embedding (as SDXL's ``adm``).
  Cross-attention outputs pass through ``attn2_output`` patches before the residual add, the same
  attach point as the host UNet's ``attn2_output_patch`` (adapters attach there).

The noise schedule is Stable Diffusion's (:class:`fastguidance.schedules.DiscreteVPSchedule`):
``x = x0 + σ·ε``, model input ``x / sqrt(σ² + 1)``, time input the nearest discrete timestep,
denoised ``x0 = x − σ·ε̂`` (Karras et al. 2022, Table 1, "VP" column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidInputError
from ...schedules import DiscreteVPSchedule
from .scenes import COLOURS, COUNTS, POSITIONS, RELATIONS, SHAPES, SIZES

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
MAX_TOKENS = 16


def _vocabulary() -> tuple[str, ...]:
    words = [PAD, BOS, EOS, *COUNTS, *SIZES, *COLOURS]
    words += [*SHAPES, *(shape + "s" for shape in SHAPES)]
    for phrase in [*POSITIONS, *RELATIONS]:
        words += phrase.split()
    return tuple(dict.fromkeys(words))


class Tokenizer:
    """Whitespace tokenizer over the fixed grammar vocabulary: ``<bos> words <eos> <pad>…``."""

    def __init__(self, vocabulary: Sequence[str] | None = None, max_tokens: int = MAX_TOKENS):
        self.vocabulary = tuple(vocabulary or _vocabulary())
        self.index = {word: i for i, word in enumerate(self.vocabulary)}
        self.max_tokens = max_tokens

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.full((len(prompts), self.max_tokens), self.index[PAD], dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise InvalidInputError("prompt", prompt, f"the reference model only knows the words {' '.join(self.vocabulary[3:])}; "
                                                          f"unknown: {', '.join(unknown)}")
            tokens = [BOS, *words, EOS]
            if len(tokens) > self.max_tokens:
                raise InvalidInputError("prompt", prompt, f"use at most {self.max_tokens - 2} words")
            ids[row, : len(tokens)] = torch.tensor([self.index[t] for t in tokens])
        return ids


@dataclass
class TextConditioning:
    """A batch of encoded prompts: what the host calls CONDITIONING (tokens + pooled vector)."""

    tokens: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor  # [B, D]
    mask: torch.Tensor  # [B, T] True where a token is real (not padding)

    @staticmethod
    def cat(items: Sequence["TextConditioning"]) -> "TextConditioning":
        return TextConditioning(torch.cat([i.tokens for i in items]), torch.cat([i.pooled for i in items]),
                                torch.cat([i.mask for i in items]))

    def select(self, rows: slice | torch.Tensor) -> "TextConditioning":
        """The prompts of some rows of the batch."""
        return TextConditioning(self.tokens[rows], self.pooled[rows], self.mask[rows])

    def expand(self, batch: int) -> "TextConditioning":
        """Repeat a single prompt to a batch (a prompt of batch 1 serves any batch)."""
        if self.tokens.shape[0] == batch:
            return self
        if self.tokens.shape[0] != 1:
            raise ValueError(f"conditioning of batch {self.tokens.shape[0]} cannot serve a batch of {batch}")
        return TextConditioning(self.tokens.expand(batch, -1, -1), self.pooled.expand(batch, -1), self.mask.expand(batch, -1))


@dataclass(frozen=True)
class ModelConfig:
    width: int = 32  # channels at 32×32; 2× at 16×16 and 4× at 8×8
    text_dim: int = 64
    text_layers: int = 2
    heads: int = 4
    time_dim: int = 128
    vocabulary_size: int = len(_vocabulary())
    #: two extra input planes holding each pixel's (x, y) in [-1, 1] (CoordConv, Liu et al. 2018), so
    #: that "on the left" can be told from position alone, not only from the zero padding at the
    #: borders. False only for files saved before the option existed.
    coordinates: bool = True
    #: each cross-attention block adds a learned projection of the pixel's (x, y) to its
    #: cross-attention queries (not self-attention's), so that a pixel can attend to "left" or "top"
    #: by where it is. Off in the shipped model: with it and the "v" loss weighting a model learned
    #: position words but lost shapes (README, The reference model).
    query_coordinates: bool = False

    def to_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


class TextEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocabulary_size, config.text_dim)
        self.position = nn.Parameter(torch.zeros(MAX_TOKENS, config.text_dim))
        layer = nn.TransformerEncoderLayer(config.text_dim, config.heads, 2 * config.text_dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.text_dim)

    def forward(self, ids: torch.Tensor) -> TextConditioning:
        mask = ids != 0
        hidden = self.embed(ids) + self.position[: ids.shape[1]]
        hidden = self.norm(self.layers(hidden, src_key_padding_mask=~mask))
        eos = mask.sum(dim=1) - 1
        pooled = hidden[torch.arange(ids.shape[0]), eos]
        return TextConditioning(hidden, pooled, mask)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the (discrete) timestep (Vaswani et al. 2017; DDPM's choice)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def coordinate_planes(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2, H, W]``: each pixel's x and y, from -1 (left, top) to 1 (right, bottom) (CoordConv,
    Liu et al. 2018, "An intriguing failing of convolutional neural networks and the CoordConv solution")."""
    batch, _, height, width = x.shape
    ys = torch.linspace(-1.0, 1.0, height, device=x.device, dtype=x.dtype).reshape(1, 1, height, 1).expand(batch, 1, height, width)
    xs = torch.linspace(-1.0, 1.0, width, device=x.device, dtype=x.dtype).reshape(1, 1, 1, width).expand(batch, 1, height, width)
    return torch.cat([xs, ys], dim=1)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time = nn.Linear(time_dim, channels_out)
        self.norm2 = nn.GroupNorm(8, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class CrossAttentionBlock(nn.Module):
    """Self-attention, cross-attention to the prompt tokens, feed-forward (a SpatialTransformer)."""

    def __init__(self, channels: int, text_dim: int, heads: int, name: str, query_coordinates: bool = False):
        super().__init__()
        self.name = name
        self.coordinates_to_query = nn.Linear(2, channels) if query_coordinates else None
        self.norm_in = nn.GroupNorm(8, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: torch.Tensor, text: TextConditioning, options: dict[str, Any]) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm_in(x).reshape(batch, channels, height * width).transpose(1, 2)
        q = self.norm1(h)
        h = h + self.attn1(q, q, q, need_weights=False)[0]
        q = self.norm2(h)
        if self.coordinates_to_query is not None:
            q = q + self.coordinates_to_query(coordinate_planes(x).flatten(2).transpose(1, 2))
        n = self.attn2(q, text.tokens, text.tokens, key_padding_mask=~text.mask, need_weights=False)[0]
        for patch in options.get("attn2_output", ()):
            n = patch(n, {"block": self.name, **options})
        h = h + n
        h = h + self.ff(self.norm3(h))
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class SceneUNet(nn.Module):
    """Epsilon-prediction UNet, 32 → 16 → 8, cross-attention at 16 and 8 (down, middle, up)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c1, c2, c3 = config.width, 2 * config.width, 4 * config.width
        t, d, heads = config.time_dim, config.text_dim, config.heads
        self.config = config
        self.time_mlp = nn.Sequential(nn.Linear(c1, t), nn.SiLU(), nn.Linear(t, t))
        self.pooled_proj = nn.Linear(d, t)
        self.conv_in = nn.Conv2d(3 + 2 * config.coordinates, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, t)
        self.down2 = ResBlock(c1, c2, t)
        self.attn_down2 = CrossAttentionBlock(c2, d, heads, "input_16", config.query_coordinates)
        self.down3 = ResBlock(c2, c3, t)
        self.attn_down3 = CrossAttentionBlock(c3, d, heads, "input_8", config.query_coordinates)
        self.mid1 = ResBlock(c3, c3, t)
        self.attn_mid = CrossAttentionBlock(c3, d, heads, "middle_8", config.query_coordinates)
        self.mid2 = ResBlock(c3, c3, t)
        self.up3 = ResBlock(c3 + c3, c3, t)
        self.attn_up3 = CrossAttentionBlock(c3, d, heads, "output_8", config.query_coordinates)
        self.up2 = ResBlock(c3 + c2, c2, t)
        self.attn_up2 = CrossAttentionBlock(c2, d, heads, "output_16", config.query_coordinates)
        self.up1 = ResBlock(c2 + c1, c1, t)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                options: dict[str, Any] | None = None) -> torch.Tensor:
        options = options or {}
        emb = self.time_mlp(timestep_embedding(timesteps, self.config.width)) + self.pooled_proj(text.pooled)
        if self.config.coordinates:
            x = torch.cat([x, coordinate_planes(x)], dim=1)
        h1 = self.down1(self.conv_in(x), emb)  # 32×32
        h2 = self.attn_down2(self.down2(F.avg_pool2d(h1, 2), emb), text, options)  # 16×16
        h3 = self.attn_down3(self.down3(F.avg_pool2d(h2, 2), emb), text, options)  # 8×8
        h = self.mid2(self.attn_mid(self.mid1(h3, emb), text, options), emb)
        h = self.attn_up3(self.up3(torch.cat([h, h3], 1), emb), text, options)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.attn_up2(self.up2(torch.cat([h, h2], 1), emb), text, options)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up1(torch.cat([h, h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class ReferenceModel(nn.Module):
    """Tokenizer + text encoder + UNet + noise schedule: prompts in, denoised predictions out."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        self.tokenizer = Tokenizer()
        self.text_encoder = TextEncoder(self.config)
        self.unet = SceneUNet(self.config)
        self.schedule = DiscreteVPSchedule()

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        """Encode prompts; the empty prompt ``""`` is the unconditional one."""
        return self.text_encoder(self.tokenizer(prompts).to(self.schedule_device))

    @property
    def schedule_device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    def predict_noise(self, x: torch.Tensor, sigma: torch.Tensor, text: TextConditioning,
                      options: dict[str, Any] | None = None) -> torch.Tensor:
        sigma_view = sigma.reshape(-1, 1, 1, 1)
        scaled = x / torch.sqrt(sigma_view**2 + 1.0)
        return self.unet(scaled, self.schedule.timestep(sigma), text, options)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[TextConditioning],
                options: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """The :class:`fastguidance.research.sampling.ConditionalModel` protocol: one ``x̂0`` per conditioning,
        all conditionings evaluated in one batched forward pass."""
        batch = x.shape[0]
        text = TextConditioning.cat([cond.expand(batch) for cond in conds])
        repeats = len(conds)
        x_all, sigma_all = x.repeat(repeats, 1, 1, 1), sigma.repeat(repeats)
        eps = self.predict_noise(x_all, sigma_all, text, options)
        denoised = x_all - sigma_all.reshape(-1, 1, 1, 1) * eps
        return list(denoised.chunk(repeats))

    forward = denoise

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def to_image(x: torch.Tensor) -> torch.Tensor:
    """Model space ([-1, 1]) → image space ([0, 1])."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def from_image(images: torch.Tensor) -> torch.Tensor:
    return images * 2.0 - 1.0

