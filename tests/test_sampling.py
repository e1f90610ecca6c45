import pytest
import torch

from fastguidance.errors import InvalidInputError
from fastguidance.research.sampling import SAMPLERS, sample
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas
from toy_models import GaussianModel

SCHEDULE = DiscreteVPSchedule()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
def test_samplers_reach_the_data_distribution(sampler, scheduler):
    # Starting from pure noise at sigma_max loses a fraction std/sigma_max of the mean (≈ 0.05 here).
    model = GaussianModel(mean_cond=1.5, std=0.5)
    noise = torch.randn(1024, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    result = sample(model, noise, make_sigmas(SCHEDULE, scheduler, 100), "cond", "uncond", 1.0, sampler)
    assert float(result.latent.mean()) == pytest.approx(1.5, abs=0.08)
    assert float(result.latent.std()) == pytest.approx(0.5, abs=0.03)


def test_cfg_scale_moves_the_mean_by_the_guidance():
    model = GaussianModel(mean_cond=1.0, mean_uncond=0.0, std=0.2)
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    result = sample(model, noise, make_sigmas(SCHEDULE, "karras", 30), "cond", "uncond", 3.0, "euler")
    assert float(result.latent.mean()) == pytest.approx(3.0, abs=0.1)


def test_model_calls_per_sampler():
    steps = 10
    for sampler, calls in (("euler", steps), ("dpmpp_2m", steps), ("dpm_2", 2 * steps - 1)):
        model = GaussianModel()
        sample(model, torch.randn(1, 1, 2, 2), make_sigmas(SCHEDULE, "normal", steps), "cond", "uncond", 5.0, sampler)
        assert len(model.calls) == calls
        assert all(c == ("cond", "uncond") for c in model.calls)


def test_unknown_sampler_is_refused():
    with pytest.raises(InvalidInputError, match="sampler"):
        sample(GaussianModel(), torch.randn(1, 1, 2, 2), [1.0, 0.0], "cond", "uncond", 5.0, "heunpp")
