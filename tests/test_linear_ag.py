"""LinearAG: the regression, its file, the run-time policies and their combination with AG."""

import math

import pytest
import torch

from fastguidance.engine import Action, GuidanceRun
from fastguidance.errors import FastGuidanceError, InvalidInputError, TensorFileError
from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.linear_ag import (LinearAG, LinearAGCalibration, LinearAGCoefficients, ScheduleMismatchError,
                                    regressor_names)
from fastguidance.research.sampling import sample
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas

SCHEDULE = DiscreteVPSchedule()
STEPS = 10


class LinearUncondModel:
    """Cond: exact denoiser of N(μ, s²) with a random image μ. Uncond: exactly ``a·c + b·x + bias``,
    so the guidance ``g = c − u = (1 − a)·c − b·x − bias`` is linear in the regressors."""

    def __init__(self, a=0.5, b=0.2, bias=0.1, shape=(3, 8, 8), seed=0):
        self.mean = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        self.a, self.b, self.bias = a, b, bias
        self.calls = []

    def __call__(self, x, sigma, conds):
        self.calls.append(tuple(conds))
        view = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        cond = self.mean + 0.25 / (0.25 + view**2) * (x - self.mean)
        return [cond if name == "cond" else self.a * cond + self.b * x + self.bias for name in conds]


def sigmas(steps=STEPS):
    return make_sigmas(SCHEDULE, "karras", steps)


def noise(batch, seed):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def calibrate(model, runs=3, batch=4, window=2, steps=STEPS, sampler="euler", regularization=1e-8):
    calibration = LinearAGCalibration(window)
    for run in range(runs):
        sample(model, noise(batch, 100 + run), sigmas(steps), "cond", "uncond", 5.0, sampler, [calibration.policy()])
    return calibration.fit(regularization, {"sampler": sampler, "scheduler": "karras", "name": "test.safetensors"})


@pytest.fixture(scope="module")
def coefficients():
    return calibrate(LinearUncondModel())


def test_regression_recovers_the_known_coefficients(coefficients):
    names = regressor_names(2)
    first_call = dict(zip(names, coefficients.coefficients[0].tolist()))
    # g = c − u = 0.5·c − 0.2·x − 0.1; the first call has no history, so the solution is unique
    assert first_call["c_t"] == pytest.approx(0.5, abs=1e-3)
    assert first_call["x_t"] == pytest.approx(-0.2, abs=1e-3)
    assert first_call["1"] == pytest.approx(-0.1, abs=1e-3)
    assert all(abs(first_call[name]) < 1e-6 for name in names[2:-1])
    assert float(coefficients.held_out_error.max()) < 1e-2  # fp32 Gram sums of collinear regressors
    assert coefficients.info["paths"] == 12 and coefficients.info["held_out_paths"] == 3


def test_calibration_runs_cfg_on_every_call_and_counts_paths():
    model = LinearUncondModel()
    calibration = LinearAGCalibration(2)
    sample(model, noise(5, 0), sigmas(), "cond", "uncond", 5.0, "euler", [calibration.policy()])
    assert all(call == ("cond", "uncond") for call in model.calls) and len(model.calls) == STEPS
    assert calibration.paths == 5 and calibration.held_out_paths == 1


def test_estimates_of_an_exactly_linear_uncond_reproduce_cfg(coefficients):
    model = LinearUncondModel()
    start = noise(2, 7)
    reference = sample(model, start, sigmas(), "cond", "uncond", 5.0, "euler").latent
    estimated = sample(model, start, sigmas(), "cond", "uncond", 5.0, "euler",
                       [LinearAG(coefficients, mode="after_step", after_step=1)])
    assert estimated.run.summary().uncond_skipped == STEPS - 1
    assert (estimated.latent - reference).abs().max() < 0.05  # of values up to ~30: fp32 regression noise


def test_a_wrong_estimate_changes_the_result():
    """The estimate is really used: a calibration on another uncond gives another image."""
    other = calibrate(LinearUncondModel(a=0.9, b=-0.3, bias=0.0))
    model = LinearUncondModel()
    start = noise(2, 7)
    reference = sample(model, start, sigmas(), "cond", "uncond", 5.0, "euler").latent
    estimated = sample(model, start, sigmas(), "cond", "uncond", 5.0, "euler",
                       [LinearAG(other, mode="after_step", after_step=1)]).latent
    assert (estimated - reference).abs().max() > 0.05


@pytest.mark.parametrize("mode,options,estimated_steps", [
    ("alternate", {}, [1, 3, 5, 7, 9]),
    ("after_step", {"after_step": 6}, [6, 7, 8, 9]),
    ("error_bound", {"error_bound": 0.5}, list(range(1, STEPS))),
])
def test_policy_modes_choose_the_documented_steps(coefficients, mode, options, estimated_steps):
    result = sample(LinearUncondModel(), noise(2, 1), sigmas(), "cond", "uncond", 5.0, "euler",
                    [LinearAG(coefficients, mode=mode, **options)])
    chosen = [record.step for record in result.run.records if record.actions[0] == Action.ESTIMATE]
    assert chosen == estimated_steps
    assert result.run.summary().evaluations == 2 * STEPS - len(estimated_steps)


def test_error_bound_uses_the_calibrated_errors(coefficients):
    errors = coefficients.held_out_error.clone()
    errors[3] = 0.9  # pretend step 3 was badly predicted
    worse = LinearAGCoefficients(coefficients.coefficients, coefficients.call_sigmas, coefficients.call_steps,
                                 coefficients.schedule, errors, coefficients.info)
    result = sample(LinearUncondModel(), noise(1, 1), sigmas(), "cond", "uncond", 5.0, "euler",
                    [LinearAG(worse, mode="error_bound", error_bound=0.5)])
    assert [r.step for r in result.run.records if r.actions[0] == Action.FULL] == [0, 3]


def test_settings_that_never_estimate_say_the_run_stays_plain_cfg(coefficients):
    """GuidancePolicy.may_skip_uncond: a step cache beside the engine is then left exactly as alone."""
    errors = coefficients.held_out_error + 0.1  # every call measured at least 0.1 wrong
    table = LinearAGCoefficients(coefficients.coefficients, coefficients.call_sigmas, coefficients.call_steps,
                                 coefficients.schedule, errors, coefficients.info)

    def may_skip(**settings):
        return GuidanceRun([LinearAG(table, **settings)], sigmas(), 1).may_skip_uncond()

    assert may_skip() and may_skip(mode="after_step", after_step=STEPS - 1)
    assert not may_skip(mode="after_step", after_step=STEPS)
    lowest = float(errors[~errors.isnan()].min())
    assert may_skip(mode="error_bound", error_bound=lowest) and not may_skip(mode="error_bound", error_bound=0.09)
    for settings in ({"mode": "after_step", "after_step": STEPS}, {"mode": "error_bound", "error_bound": 0.09}):
        result = sample(LinearUncondModel(), noise(1, 1), sigmas(), "cond", "uncond", 5.0, "euler",
                        [LinearAG(table, **settings)])
        assert result.run.summary().uncond_skipped == 0  # what it says is what it does


def test_adaptive_guidance_cutoff_overrides_the_estimate(coefficients):
    result = sample(LinearUncondModel(), noise(2, 1), sigmas(), "cond", "uncond", 5.0, "euler",
                    [LinearAG(coefficients, mode="alternate"), AdaptiveGuidance(threshold=0.0, convergence=1.0)])
    # AG latches after the first measured call; from then on COND_ONLY outranks ESTIMATE
    assert [r.actions[0] for r in result.run.records] == [Action.FULL] + [Action.COND_ONLY] * (STEPS - 1)


def test_file_round_trip_keeps_everything(coefficients, tmp_path):
    path = coefficients.save(tmp_path / "lag.safetensors")
    loaded = LinearAGCoefficients.load(path)
    for name in ("coefficients", "call_sigmas", "call_steps", "schedule"):
        assert torch.equal(getattr(loaded, name), getattr(coefficients, name).to(getattr(loaded, name).dtype))
    assert torch.allclose(loaded.held_out_error, coefficients.held_out_error, equal_nan=True)
    assert loaded.window == 2 and loaded.info["sampler"] == "euler" and loaded.info["paths"] == 12
    assert loaded.made_for() == coefficients.made_for()


def test_an_existing_file_is_never_overwritten_silently(coefficients, tmp_path):
    path = coefficients.save(tmp_path / "lag.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        coefficients.save(path)
    assert path.read_bytes() == before
    coefficients.save(path, overwrite=True)


def test_corrupt_and_foreign_files_are_refused(coefficients, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(TensorFileError, match="not a readable safetensors"):
        LinearAGCoefficients.load(corrupt)
    with pytest.raises(TensorFileError, match="does not exist.*LinearAGCalibrate"):
        LinearAGCoefficients.load(tmp_path / "missing.safetensors")
    from fastguidance.tensorfile import save_tensor_file
    foreign = save_tensor_file(tmp_path / "foreign.safetensors", {"w": torch.zeros(2)},
                               {"format": "fastguidance.adapter", "version": 1})
    with pytest.raises(TensorFileError, match="fastguidance.linear_ag"):
        LinearAGCoefficients.load(foreign)
    partial = save_tensor_file(tmp_path / "partial.safetensors", {"coefficients": coefficients.coefficients},
                               {"format": "fastguidance.linear_ag", "version": 1, "window": 2})
    with pytest.raises(FastGuidanceError, match="missing parts"):
        LinearAGCoefficients.load(partial)


def test_another_step_count_is_refused_with_what_the_file_was_made_for(coefficients):
    with pytest.raises(ScheduleMismatchError, match=r"calibrated for 10 steps of euler / karras.*this run samples 14 steps"):
        sample(LinearUncondModel(), noise(1, 1), sigmas(14), "cond", "uncond", 5.0, "euler", [LinearAG(coefficients)])


def test_another_sampler_with_the_same_schedule_is_refused(coefficients):
    # dpm_2 makes two calls per step: its second call is at a midpoint sigma the file does not know
    with pytest.raises(ScheduleMismatchError, match="model call 1 .*another sampler"):
        sample(LinearUncondModel(), noise(1, 1), sigmas(), "cond", "uncond", 5.0, "dpm_2",
               [LinearAG(coefficients, mode="after_step", after_step=1)])


def test_sigma_interpolation_picks_calibrated_rows_at_calibrated_sigmas_and_runs_elsewhere(coefficients):
    model = LinearUncondModel()
    start = noise(2, 3)
    exact = sample(model, start, sigmas(), "cond", "uncond", 5.0, "euler", [LinearAG(coefficients)]).latent
    interpolated = sample(model, start, sigmas(), "cond", "uncond", 5.0, "euler",
                          [LinearAG(coefficients, interpolate_sigmas=True)]).latent
    assert torch.equal(exact, interpolated)
    other = sample(model, start, sigmas(14), "cond", "uncond", 5.0, "euler",
                   [LinearAG(coefficients, mode="alternate", interpolate_sigmas=True)])
    assert other.run.summary().uncond_skipped == 7 and torch.isfinite(other.latent).all()


def test_calibration_refuses_mixed_schedules_and_too_few_paths():
    calibration = LinearAGCalibration(1)
    sample(LinearUncondModel(), noise(1, 0), sigmas(), "cond", "uncond", 5.0, "euler", [calibration.policy()])
    with pytest.raises(InvalidInputError, match="paths"):
        calibration.fit()
    with pytest.raises(FastGuidanceError, match="same schedule"):
        sample(LinearUncondModel(), noise(1, 0), sigmas(12), "cond", "uncond", 5.0, "euler", [calibration.policy()])
    small = LinearAGCalibration(1)
    sample(LinearUncondModel(), noise(3, 0), sigmas(), "cond", "uncond", 5.0, "euler", [small.policy()])
    with pytest.raises(FastGuidanceError, match="no held-out path"):
        small.fit()


@pytest.mark.parametrize("kwargs,name", [({"mode": "sometimes"}, "mode"), ({"after_step": 0}, "after_step"),
                                         ({"error_bound": -1.0}, "error_bound")])
def test_bad_policy_settings_are_refused(coefficients, kwargs, name):
    with pytest.raises(InvalidInputError, match=name):
        LinearAG(coefficients, **kwargs)


@pytest.mark.parametrize("window,regularization,name", [(0, 1e-3, "window"), (5, 1e-3, "window"),
                                                        (2, 0.0, "regularization")])
def test_bad_calibration_settings_are_refused(window, regularization, name):
    with pytest.raises(InvalidInputError, match=name):
        calibration = LinearAGCalibration(window)
        calibration.fit(regularization)


def test_held_out_error_is_one_when_the_guidance_is_unpredictable():
    """An uncond with fresh randomness each call cannot be regressed: the error is near 1 (no better than û = c)."""

    class RandomUncond(LinearUncondModel):
        def __call__(self, x, sigma, conds):
            outputs = super().__call__(x, sigma, conds)
            if len(outputs) == 2:
                outputs[1] = outputs[0] + torch.randn_like(x)
            return outputs

    torch.manual_seed(0)
    table = calibrate(RandomUncond(), runs=4, regularization=1e-3)
    assert all(0.9 < error < 1.1 for error in table.held_out_error.tolist() if not math.isnan(error))
