"""What the engine keeps per run stays proportionate on a 5-D video latent (benchmarks/engine_memory.py, README
"Memory on video latents"): counted in latents, so an added copy or a history kept in fp64 fails here."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import engine_memory  # noqa: E402
from fastguidance.adaptive_guidance import AdaptiveGuidance  # noqa: E402
from fastguidance.compress_guidance import CompressGuidance

SHAPE = (16, 3, 12, 16)  # a small video latent: channels, frames, height, width
SIGMAS = torch.linspace(1.0, 0.0, 7)


@pytest.fixture(scope="module")
def model():
    return engine_memory.StubVideoModel(SHAPE)


def in_latents(row):
    latent = math.prod(SHAPE) * 4
    return row["kept_bytes"] / latent, row["peak_bytes"] / latent


@pytest.mark.parametrize("name, policies, kept, peak", [
    ("AG denoised", lambda m: [AdaptiveGuidance(threshold=1.0001)], 0, 1),
    ("AG noise", lambda m: [AdaptiveGuidance(threshold=1.0001, cosine_space="noise")], 0, 3),
    ("CompG reuse", lambda m: [CompressGuidance(compression=2.0, mode="reuse")], 1, 3),
    ("CompG compress", lambda m: [CompressGuidance(compression=2.0, mode="compress")], 0, 2),
    ("LinearAG window 2", lambda m: [engine_memory.linear_ag(m, SHAPE, SIGMAS, 2)], 4, 7),
])
def test_kept_and_peak_memory_in_latents(model, name, policies, kept, peak):
    noise = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    kept_latents, peak_latents = in_latents(engine_memory.measure(policies(model), model, noise, SIGMAS))
    # per-sample cosines and masks are a few bytes: at most a hundredth of a latent on top
    assert kept <= kept_latents < kept + 0.01, name
    assert peak_latents < peak + 0.01, name
