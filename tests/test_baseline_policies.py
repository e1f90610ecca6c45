"""The fixed-window baselines (fastguidance.research.windows): which steps they guide, what they cost,
parity with plain CFG and with no guidance at their extremes."""

import pytest
import torch

from fastguidance.engine import Action
from fastguidance.errors import InvalidInputError
from fastguidance.research.windows import CFGWindow, GuidanceInterval
from fastguidance.research.windows import window_fraction_for, window_guided_steps
from fastguidance.research.sampling import sample
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas
from toy_models import ScriptedCosineModel

SCALE = 5.0


def sigmas(steps=20):
    return make_sigmas(DiscreteVPSchedule(), "karras", steps).tolist()


def noise(seed=3):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_window_guides_the_first_rounded_fraction_of_the_steps():
    assert [window_guided_steps(20, f) for f in (0.0, 0.2, 0.225, 0.5, 0.71, 1.0)] == [0, 4, 5, 10, 14, 20]
    assert window_guided_steps(7, 0.5) == 4  # 3.5 rounds up
    # the fraction matching a method's evaluations per image: N + n = E, clamped to [N, 2N]
    assert window_fraction_for(20, 34.1) == 0.7 and window_fraction_for(20, 25.0) == 0.25
    assert window_fraction_for(20, 11.4) == 0.0 and window_fraction_for(20, 44.0) == 1.0
    for evaluations in range(20, 41):
        assert 20 + window_guided_steps(20, window_fraction_for(20, evaluations)) == evaluations


@pytest.mark.parametrize("sampler", ["euler", "dpm_2", "dpmpp_2m"])
def test_window_actions_and_evaluations(sampler):
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 0.4])
    result = sample(model, noise(), sigmas(10), "cond", "uncond", SCALE, sampler, [CFGWindow(0.3)])
    steps = [(record.step, record.actions) for record in result.run.records]
    assert all(actions == (Action.FULL,) * 2 if step < 3 else actions == (Action.COND_ONLY,) * 2
               for step, actions in steps)
    calls_per_step = 2 if sampler == "dpm_2" else 1
    last_has_one = sampler == "dpm_2"  # dpm_2's last step (to σ = 0) is one call
    calls = 10 * calls_per_step - last_has_one
    assert result.run.summary().evaluations == calls + 3 * calls_per_step
    assert result.run.evaluations_per_sample() == [calls + 3 * calls_per_step] * 2


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_window_extremes_are_exactly_cfg_and_no_guidance(sampler):
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 0.4])
    plain = sample(model, noise(), sigmas(12), "cond", "uncond", SCALE, sampler).latent
    unguided = sample(model, noise(), sigmas(12), "cond", "uncond", 1.0, sampler).latent
    assert torch.equal(sample(model, noise(), sigmas(12), "cond", "uncond", SCALE, sampler, [CFGWindow(1.0)]).latent, plain)
    assert torch.equal(sample(model, noise(), sigmas(12), "cond", "uncond", SCALE, sampler, [CFGWindow(0.0)]).latent,
                       unguided)
    everywhere = GuidanceInterval(0.0, 1e9)
    assert torch.equal(sample(model, noise(), sigmas(12), "cond", "uncond", SCALE, sampler, [everywhere]).latent, plain)


def test_interval_guides_exactly_the_steps_inside_its_sigma_band():
    schedule = sigmas(20)
    result = sample(ScriptedCosineModel(), noise(), schedule, "cond", "uncond", SCALE, "dpmpp_2m", [GuidanceInterval()])
    guided = [record.step for record in result.run.records if record.actions[0] == Action.FULL]
    assert guided == [i for i, s in enumerate(schedule[:-1]) if 0.28 < s <= 5.42]
    assert 0 < len(guided) < 20 and guided[0] > 0 and guided[-1] < 19  # neither the first nor the last steps
    assert result.run.summary().evaluations == 20 + len(guided)


def test_bad_settings_name_the_input():
    for make, name in [(lambda: CFGWindow(-0.1), "fraction"), (lambda: CFGWindow(1.5), "fraction"),
                       (lambda: CFGWindow("half"), "fraction"), (lambda: GuidanceInterval(-1.0, 5.0), "sigma_low"),
                       (lambda: GuidanceInterval(3.0, 2.0), "sigma_high"),
                       (lambda: GuidanceInterval(0.28, float("nan")), "sigma_high")]:
        with pytest.raises(InvalidInputError) as error:
            make()
        assert error.value.input_name == name
