import math

import pytest
import torch

from fastguidance.errors import InvalidInputError
from fastguidance.schedules import DiscreteVPSchedule, karras_sigmas, make_sigmas, normal_sigmas, step_index


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 20, 50])
def test_schedules_have_steps_plus_one_descending_sigmas_ending_in_zero(scheduler, steps):
    schedule = DiscreteVPSchedule()
    sigmas = make_sigmas(schedule, scheduler, steps)
    assert sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0.0
    assert torch.all(sigmas[:-1] > 0)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert math.isclose(float(sigmas[0]), schedule.sigma_max, rel_tol=1e-5)


def test_vp_schedule_matches_stable_diffusion_range():
    schedule = DiscreteVPSchedule()
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-3)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_karras_endpoints():
    sigmas = karras_sigmas(0.1, 10.0, 5)
    assert float(sigmas[0]) == pytest.approx(10.0) and float(sigmas[-2]) == pytest.approx(0.1)


def test_percent_to_sigma_is_monotonic_with_host_conventions():
    schedule = DiscreteVPSchedule()
    assert schedule.percent_to_sigma(0.0) == math.inf
    assert schedule.percent_to_sigma(1.0) == 0.0
    values = [schedule.percent_to_sigma(p) for p in (0.1, 0.5, 0.9)]
    assert values[0] > values[1] > values[2] > 0


def test_bad_steps_and_scheduler_are_refused_with_the_input_name():
    with pytest.raises(InvalidInputError, match="steps"):
        normal_sigmas(DiscreteVPSchedule(), 0)
    with pytest.raises(InvalidInputError, match="scheduler"):
        make_sigmas(DiscreteVPSchedule(), "exponential", 10)


def test_step_index_exact_sigmas():
    sigmas = make_sigmas(DiscreteVPSchedule(), "karras", 10).tolist()
    for i, sigma in enumerate(sigmas[:-1]):
        assert step_index(sigmas, sigma) == i


def test_step_index_midpoints_belong_to_the_step_they_start_from():
    sigmas = make_sigmas(DiscreteVPSchedule(), "normal", 10).tolist()
    for i in range(len(sigmas) - 2):
        midpoint = math.exp(0.5 * (math.log(sigmas[i]) + math.log(sigmas[i + 1])))
        assert step_index(sigmas, midpoint) == i
    # a midpoint in the last interval (towards sigma 0) is the last step
    assert step_index(sigmas, sigmas[-2] / 2) == len(sigmas) - 2


def test_step_index_tolerates_rounding_and_clamps():
    sigmas = [10.0, 5.0, 1.0, 0.0]
    assert step_index(sigmas, 5.0 * (1 + 1e-7)) == 1  # float noise above the stored value
    assert step_index(sigmas, 12.0) == 0  # above the schedule
    assert step_index(sigmas, 0.0) == 2  # never the final 0
