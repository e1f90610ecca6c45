import pytest
import torch

from fastguidance.guidance import cfg_combine, per_sample_cosine


def test_cosine_is_per_sample_and_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=generator)
    cond = torch.randn(3, 4, 5, 5, generator=generator)
    uncond = torch.randn(3, 4, 5, 5, generator=generator)
    got = per_sample_cosine(x, cond, uncond)
    for b in range(3):
        a, c = (x[b] - cond[b]).flatten().double(), (x[b] - uncond[b]).flatten().double()
        assert abs(float(got[b]) - float(a @ c / (a.norm() * c.norm()))) < 1e-6


def test_cosine_of_one_sample_does_not_depend_on_the_batch():
    generator = torch.Generator().manual_seed(1)
    x, cond, uncond = (torch.randn(4, 4, 6, 6, generator=generator) for _ in range(3))
    together = per_sample_cosine(x, cond, uncond)
    alone = torch.cat([per_sample_cosine(x[b:b + 1], cond[b:b + 1], uncond[b:b + 1]) for b in range(4)])
    assert torch.equal(together, alone)


def test_cosine_is_fp32_for_half_inputs_and_works_on_video_latents():
    generator = torch.Generator().manual_seed(2)
    x, cond, uncond = (torch.randn(2, 4, 3, 6, 6, generator=generator).half() for _ in range(3))
    got = per_sample_cosine(x, cond, uncond)
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.all(got.abs() <= 1.0 + 1e-6)


def test_cosine_of_identical_predictions_is_one_and_of_zero_vectors_is_finite():
    x = torch.ones(2, 3, 4, 4)
    cond = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(per_sample_cosine(x, cond, cond), torch.ones(2))
    assert torch.isfinite(per_sample_cosine(x, x, x)).all()


def test_cfg_combine_is_the_hosts_formula():
    cond, uncond = torch.tensor([2.0]), torch.tensor([0.5])
    assert torch.equal(cfg_combine(cond, uncond, 7.0), uncond + (cond - uncond) * 7.0)
    assert torch.equal(cfg_combine(cond, cond, 7.0), cond)


def test_denoised_cosine_compares_the_predictions_themselves():
    generator = torch.Generator().manual_seed(3)
    x, cond, uncond = (torch.randn(2, 4, 5, 5, generator=generator) for _ in range(3))
    got = per_sample_cosine(x, cond, uncond, space="denoised")
    for b in range(2):
        a, c = cond[b].flatten().double(), uncond[b].flatten().double()
        assert abs(float(got[b]) - float(a @ c / (a.norm() * c.norm()))) < 1e-6
    assert not torch.allclose(got, per_sample_cosine(x, cond, uncond))


def test_noise_cosine_at_high_sigma_is_near_one_whatever_the_predictions():
    """Why the denoised space exists: two opposite pictures in [-1, 1] still give γ ≥ 1 − ½(2/σ)²."""
    sigma = 14.6
    x = sigma * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cond, uncond = torch.ones(1, 3, 32, 32), -torch.ones(1, 3, 32, 32)
    assert float(per_sample_cosine(x, cond, uncond)) >= 1 - 0.5 * (2 / sigma) ** 2 - 1e-3
    assert float(per_sample_cosine(x, cond, uncond, space="denoised")) == pytest.approx(-1.0)


def test_unknown_cosine_space_is_refused():
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        per_sample_cosine(x, x, x, space="latent")
