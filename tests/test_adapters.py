"""AGD core: Fourier encoding, adapter shapes and size, the CFG target, and a short training that lowers the loss."""

import pytest
import torch

from fastguidance.adapters import (AdapterSpec, CrossAttentionAdapter, FourierFeatures, GuidanceAdapters, OffsetAdapter,
                                   cfg_target)
from fastguidance.errors import InvalidInputError
from fastguidance.reference.adapters import (adapter_spec, attach_points, collect_trajectories, single_pass_noise,
                                             train_adapters)
from fastguidance.reference.weights import load_model


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_fourier_features_are_bounded_and_tell_scales_apart():
    features = FourierFeatures(8)(torch.tensor([1.0, 1.5, 7.5]))
    assert features.shape == (3, 16) and features.abs().max() <= 1.0
    assert (features[0] - features[1]).abs().max() > 0.05 and (features[1] - features[2]).abs().max() > 0.05


@pytest.mark.parametrize("adapter", [OffsetAdapter(32, 16, 8), CrossAttentionAdapter(32, 24, 16, 8)])
def test_adapters_keep_the_shape_and_start_near_the_identity(adapter):
    torch.manual_seed(0)
    n = torch.randn(2, 10, 32)
    out = adapter(n, torch.randn(2, 16), torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == n.shape
    assert 0 < (out - n).abs().mean() < 0.5 * n.abs().mean()  # Xavier, small output projection: not zero, not large


def test_reference_adapters_are_one_to_five_percent_of_the_model(model):
    points = attach_points(model)
    assert len(points) == 5 and all(channels > 0 for channels in points.values())
    adapters = GuidanceAdapters(adapter_spec(model))
    share = adapters.count_parameters() / sum(p.numel() for p in model.unet.parameters())
    assert 0.01 <= share <= 0.05, share


def test_cfg_target_is_cfg():
    eps_c, eps_u = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(cfg_target(eps_c, eps_u, torch.tensor([1.0, 4.0])), torch.tensor([[1.0] * 3, [4.0] * 3]))


def test_bad_specs_and_unknown_attach_points_are_refused(model):
    with pytest.raises(InvalidInputError, match="kind"):
        GuidanceAdapters(AdapterSpec({"a": 8}, 8, 0, kind="lora"))
    with pytest.raises(InvalidInputError, match="attach_points"):
        GuidanceAdapters(AdapterSpec({}, 8, 0))
    adapters = GuidanceAdapters(AdapterSpec({"a": 8}, 8, 0, hidden=8, embed_dim=8))
    bound = adapters.bind(torch.ones(1), torch.ones(1), torch.zeros(1, 3, 8))
    with pytest.raises(KeyError, match="made for"):
        bound("b", torch.zeros(1, 4, 8))


def test_a_short_training_on_cfg_trajectories_lowers_the_loss(model):
    torch.manual_seed(0)
    prompts = ["a red circle on the left", "two blue squares", "a small green triangle above a large yellow circle",
               "three purple triangles"]
    data = collect_trajectories(model, prompts, (1.0, 8.0), steps=6, seed=0)
    assert len(data) == 24 and data.x.dtype == torch.float16 and data.size_bytes() < 1_000_000
    adapters = GuidanceAdapters(adapter_spec(model))
    losses = train_adapters(model, adapters, data, steps=40, batch=16, lr=3e-3, warmup=5)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    # the adapted single pass depends on ω (the guidance scale is an input, not baked in)
    text = model.encode(prompts[:1])
    x, sigma = data.x[:1].float(), data.sigma[:1]
    with torch.no_grad():
        low = single_pass_noise(model, adapters, x, sigma, text, torch.tensor([1.0]))
        high = single_pass_noise(model, adapters, x, sigma, text, torch.tensor([8.0]))
    assert (low - high).abs().max() > 1e-4
