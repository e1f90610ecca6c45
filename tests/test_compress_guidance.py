import pytest
import torch

from fastguidance.engine import Action, GuidanceRun
from fastguidance.errors import InvalidInputError
from fastguidance.guidance import cfg_combine
from fastguidance.compress_guidance import COMPRESS_MODES, CompressGuidance
from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.compress_guidance import MAX_SKEW, compression_weights, guided_step_count, guided_step_indices
from fastguidance.research.sampling import sample
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas
from toy_models import GaussianModel, ScriptedCosineModel

SCHEDULE = DiscreteVPSchedule()
SCALE = 5.0


def sigmas(steps=20, scheduler="karras"):
    return make_sigmas(SCHEDULE, scheduler, steps).tolist()


# -- the guided steps ------------------------------------------------------------------------------


def test_guided_steps_are_the_distinct_values_of_the_papers_formula():
    # G = {floor(N·(j/n)^k) : j = 0 … n−1}; duplicates collapse, so larger k guides fewer steps
    assert guided_step_indices(20, 5, 2.0) == [0, 3, 7, 12]
    assert guided_step_indices(20, 5, 1.0) == [0, 4, 8, 12, 16]
    assert guided_step_indices(10, 4, 2.0) == [0, 2, 5]
    assert guided_step_indices(20, 4, 0.5) == [0, 10, 14, 17]
    assert guided_step_indices(20, 1, 2.0) == [0]
    assert guided_step_indices(0, 5, 2.0) == []


def test_guided_step_counts_of_the_papers_table_8():
    # Dinh et al., Table 8: N = 250 sampling steps, n = 50, k = 1 … 6
    counts = [len(guided_step_indices(250, 50, float(k))) for k in range(1, 7)]
    assert counts == [50, 47, 41, 36, 32, 28]


@pytest.mark.parametrize("skew", [0.1, 0.5, 1.0, 1.5, 2.0, 3.0, MAX_SKEW])
def test_guided_steps_are_sorted_distinct_in_range_and_start_at_zero(skew):
    for total in range(1, 61):
        for count in range(1, total + 1):
            guided = guided_step_indices(total, count, skew)
            assert 1 <= len(guided) <= count, (total, count, guided)
            assert len(guided) == count or skew != 1.0, (total, count, guided)  # k = 1 keeps all n
            assert guided[0] == 0
            assert all(a < b for a, b in zip(guided, guided[1:])), guided
            assert guided[-1] < total, (total, count, guided)


def test_larger_skew_puts_the_guided_steps_earlier():
    total, count = 20, 5
    first_half = {skew: sum(1 for step in guided_step_indices(total, count, skew) if step < total // 2)
                  for skew in (1.0, 2.0, 3.0)}
    share = {skew: first_half[skew] / len(guided_step_indices(total, count, skew)) for skew in first_half}
    assert first_half == {1.0: 3, 2.0: 3, 3.0: 3}
    assert share[1.0] < share[2.0] <= share[3.0]


def test_guided_step_count_from_the_rate_or_the_number():
    assert guided_step_count(20, compression=4.0) == 5
    assert guided_step_count(30, compression=3.0) == 10
    assert guided_step_count(20, compression=1.0) == 20
    assert guided_step_count(7, compression=100.0) == 1  # at least the first step
    assert guided_step_count(20, guided_steps=6, compression=4.0) == 6  # an explicit number wins
    assert guided_step_count(10, guided_steps=25) == 10  # more than the steps: every step
    assert guided_step_indices(10, 25, 2.0) == list(range(10))
    assert guided_step_indices(10, 10, 3.0) == list(range(10))  # n = N guides every step whatever k


def test_compression_weights_by_count_cover_every_step_once():
    guided = guided_step_indices(20, 5, 2.0)
    weights = compression_weights(list(range(20, -1, -1)), guided, "count")
    assert weights == {0: 3, 3: 4, 7: 5, 12: 8}
    assert sum(weights.values()) == 20


def test_compression_weights_by_sigma_span_on_a_non_uniform_schedule():
    # N = 5, guided steps 0, 2 and 3. w_j = (σ_{t_j} − σ_{t_{j+1}}) / (σ_{t_j} − σ_{t_j + 1}), written out:
    schedule = [10.0, 6.0, 3.0, 1.0, 0.5, 0.0]
    weights = compression_weights(schedule, [0, 2, 3], "sigma")
    assert weights == pytest.approx({0: (10.0 - 3.0) / (10.0 - 6.0),   # covers steps 0, 1: 1.75
                                     2: (3.0 - 1.0) / (3.0 - 1.0),     # covers itself only: 1
                                     3: (1.0 - 0.0) / (1.0 - 0.5)})    # covers steps 3, 4 to σ = 0: 2
    # on an evenly spaced schedule the span is the count
    assert compression_weights([4.0, 3.0, 2.0, 1.0, 0.0], [0, 2], "sigma") == {0: 2.0, 2: 2.0}
    # a repeated sigma (no span of its own) falls back to the count
    assert compression_weights([4.0, 4.0, 2.0, 0.0], [0, 2], "sigma") == {0: 2.0, 2: 1.0}
    # the default weighting is the count, on any schedule
    assert compression_weights(schedule, [0, 2, 3]) == {0: 2.0, 2: 1.0, 3: 2.0}


def test_compress_guidance_defaults_are_the_benchs_best():
    policy = CompressGuidance()
    assert (policy.mode, policy.skew, policy.weighting) == ("compress", 1.0, "count")


# -- invalid settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,bad", [
    ({"compression": 0.5}, "compression"),
    ({"compression": 0.0}, "compression"),
    ({"guided_steps": -1}, "guided_steps"),
    ({"skew": 0.0}, "skew"),
    ({"skew": -1.0}, "skew"),
    ({"skew": MAX_SKEW + 0.5}, "skew"),
    ({"mode": "zeros"}, "mode"),
    ({"weighting": "steps"}, "weighting"),
])
def test_invalid_settings_are_refused_naming_the_input(settings, bad):
    with pytest.raises(InvalidInputError) as caught:
        CompressGuidance(**settings)
    assert caught.value.input_name == bad
    assert str(caught.value).startswith(f"{bad} = {settings[bad]!r} is not valid: ")


def test_compression_is_ignored_when_guided_steps_is_given():
    policy = CompressGuidance(compression=0.5, guided_steps=3)
    assert policy.guided_steps == 3 and COMPRESS_MODES == ("reuse", "compress")


# -- the maths, driving the engine as a host does ---------------------------------------------------


def drive(policy, steps=10, batch=2, seed=0, shape=(4, 8, 8)):
    """Drive a run call by call with random predictions; returns (run, [(step, c, u, u_hat)])."""
    schedule = sigmas(steps)
    run = GuidanceRun([policy], schedule, batch)
    generator = torch.Generator().manual_seed(seed)
    calls = []
    for step, sigma in enumerate(schedule[:-1]):
        x = torch.randn(batch, *shape, generator=generator)
        c = torch.randn(batch, *shape, generator=generator)
        u = torch.randn(batch, *shape, generator=generator)
        plan = run.plan(torch.full((batch,), sigma))
        u_hat = run.complete(plan, x, c, u if plan.evaluate_uncond else None)
        calls.append((step, c, u, u_hat))
    return run, calls


def test_reuse_applies_the_last_guided_steps_guidance_on_skipped_steps():
    run, calls = drive(CompressGuidance(compression=3.0, skew=2.0, mode="reuse"), steps=10)
    guided = guided_step_indices(10, 3, 2.0)
    assert guided == [0, 1, 4]
    assert [r.actions for r in run.records] == [(Action.FULL,) * 2 if s in guided else (Action.REUSE,) * 2
                                                for s in range(10)]
    schedule = [float(value) for value in sigmas(10)]
    last_guidance = last_sigma = None
    for step, c, u, u_hat in calls:
        if step in guided:
            assert torch.equal(u_hat, u)  # guided: the real uncond
            last_guidance, last_sigma = c - u, schedule[step]
        else:
            reused = (schedule[step] / last_sigma) * last_guidance  # noise-space reuse (engine docstring)
            assert torch.allclose(u_hat, c - reused, atol=1e-5)
            # so CFG gives c + (s − 1)·(σ/σ_last)·g_last
            assert torch.allclose(cfg_combine(c, u_hat, SCALE), c + (SCALE - 1) * reused, atol=1e-4)
    assert all(record.guidance_weight == 1.0 for record in run.records)


@pytest.mark.parametrize("weighting", ["count", "sigma"])
def test_compress_puts_the_skipped_guidance_on_the_guided_step(weighting):
    run, calls = drive(CompressGuidance(compression=3.0, skew=2.0, mode="compress", weighting=weighting), steps=10)
    guided = [0, 1, 4]
    schedule = [float(value) for value in sigmas(10)]
    weights = compression_weights(schedule, guided, weighting)
    if weighting == "count":
        assert weights == {0: 1.0, 1: 3.0, 4: 6.0}
    else:
        assert weights[0] == 1.0 and weights[1] > 1.0 and weights[4] > 1.0
        assert weights[1] == pytest.approx((schedule[1] - schedule[4]) / (schedule[1] - schedule[2]))
    for (step, c, u, u_hat), record in zip(calls, run.records):
        if step in guided:
            m = weights[step]
            assert record.actions == (Action.FULL,) * 2 and record.guidance_weight == m
            assert torch.equal(u_hat, u if m == 1 else c - m * (c - u))
            assert torch.allclose(cfg_combine(c, u_hat, SCALE), c + m * (SCALE - 1) * (c - u), atol=1e-4)
        else:
            assert record.actions == (Action.COND_ONLY,) * 2 and record.evaluations == 1
            assert torch.equal(u_hat, c)  # not guided: CFG yields c
            assert torch.equal(cfg_combine(c, u_hat, SCALE), c)


# -- end to end with the core sampler ----------------------------------------------------------------


def reference_euler(model, noise, schedule, scale, guided, mode):
    """Euler with Compress Guidance written out by hand (the model is evaluated twice every step)."""
    weights = compression_weights(schedule, guided)
    x = noise * schedule[0]
    last_guidance = last_sigma = None
    for step, (sigma, sigma_next) in enumerate(zip(schedule[:-1], schedule[1:])):
        c, u = model(x, x.new_full((x.shape[0],), sigma), ["cond", "uncond"])
        if step in guided:
            last_guidance, last_sigma = c - u, sigma
            if mode == "compress" and weights[step] != 1:
                u = c - weights[step] * (c - u)
        else:
            u = c - (sigma / last_sigma) * last_guidance if mode == "reuse" else c
        denoised = cfg_combine(c, u, scale)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


@pytest.mark.parametrize("mode", COMPRESS_MODES)
def test_sampling_matches_the_method_written_out(mode):
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 0.4])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    schedule = sigmas(12)
    guided = guided_step_indices(12, 3, 2.0)
    assert guided == [0, 1, 5]
    result = sample(model, noise, schedule, "cond", "uncond", SCALE, "euler",
                    [CompressGuidance(compression=4.0, skew=2.0, mode=mode)])
    expected = reference_euler(model, noise, schedule, SCALE, guided, mode)
    # reuse rescales by σ/σ_last: equal up to the rounding of that product
    assert torch.allclose(result.latent, expected, rtol=1e-5, atol=1e-4)
    plain = sample(model, noise, schedule, "cond", "uncond", SCALE, "euler").latent
    assert not torch.allclose(result.latent, plain, atol=1e-3)  # it does change something


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("mode", COMPRESS_MODES)
def test_one_call_per_step_samplers_spend_n_plus_guided_evaluations(sampler, mode):
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 0.4])
    result = sample(model, torch.randn(2, 4, 8, 8), sigmas(20), "cond", "uncond", SCALE, sampler,
                    [CompressGuidance(compression=4.0, skew=2.0, mode=mode)])
    guided = [0, 3, 7, 12]  # n = 5 requested; k = 2 collapses two of them (the paper's rule)
    summary = result.run.summary()
    assert summary.calls == 20 and summary.evaluations == 24 and summary.uncond_skipped == 16
    assert result.run.evaluations_per_sample() == [24, 24]
    assert [len(conds) == 2 for conds in model.calls] == [step in guided for step in range(20)]
    assert summary.text("CompG").startswith("CompG: 16/20 uncond evaluations skipped, 1.67x fewer")


def test_every_call_of_a_guided_step_is_guided_with_dpm_2():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8))
    result = sample(model, torch.randn(1, 4, 8, 8), sigmas(20), "cond", "uncond", SCALE, "dpm_2",
                    [CompressGuidance(compression=4.0, skew=2.0, mode="reuse")])
    guided = {0, 3, 7, 12}
    records = result.run.records
    assert len(records) == 2 * 20 - 1  # a midpoint call per step, except the last
    assert [r.step for r in records] == [s for s in range(19) for _ in (0, 1)] + [19]
    for record in records:
        assert (record.evaluations == 2) == (record.step in guided), record
    assert result.run.summary().evaluations == 39 + 2 * len(guided)


def test_ag_cutoff_overrides_reuse():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8), rates=[0.5])
    schedule = sigmas(20)
    guided = [0, 3, 7, 12]
    threshold = float(model.expected_cosine(schedule[5])[0])  # reached between guided steps 3 and 7
    result = sample(model, torch.randn(1, 4, 8, 8), schedule, "cond", "uncond", SCALE, "euler",
                    [CompressGuidance(compression=4.0, skew=2.0, mode="reuse"),
                     AdaptiveGuidance(threshold=threshold, cosine_space="noise", convergence=1.0)])
    # AG measures the cosine on guided steps only; the first one at or above the threshold is step 7
    latch = next(s for s in guided if float(model.expected_cosine(schedule[s])[0]) >= threshold)
    assert latch == 7
    actions = [record.actions[0] for record in result.run.records]
    expected = [Action.FULL if s in guided else Action.REUSE for s in range(latch + 1)]
    expected += [Action.COND_ONLY] * (20 - latch - 1)  # step 12 was to be guided: the cutoff wins
    assert actions == expected
    assert result.run.summary().evaluations == 20 + 3


@pytest.mark.parametrize("mode", COMPRESS_MODES)
@pytest.mark.parametrize("settings", [{"compression": 1.0}, {"guided_steps": 20}, {"guided_steps": 50, "skew": 1.0}])
@pytest.mark.parametrize("sampler", ["euler", "dpm_2", "dpmpp_2m"])
def test_guiding_every_step_is_exactly_plain_cfg(mode, settings, sampler):
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 0.4])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    plain = sample(model, noise, sigmas(20), "cond", "uncond", SCALE, sampler)
    every = sample(model, noise, sigmas(20), "cond", "uncond", SCALE, sampler, [CompressGuidance(mode=mode, **settings)])
    assert torch.equal(plain.latent, every.latent)
    assert every.run.summary().uncond_skipped == 0


def test_video_latents_and_the_gaussian_mean():
    # 5-D latents. On Gaussian data c − u = σ²/(s² + σ²)·(μ_c − μ_u), so plain CFG ends at
    # μ_u + w·(μ_c − μ_u) = 2. Reuse at σ < σ_j applies (σ/σ_j)·σ_j²/(s² + σ_j²)·(μ_c − μ_u), which is
    # less than the true σ²/(s² + σ²)·(μ_c − μ_u) once σ is near s: it guides a little less.
    model = GaussianModel(mean_cond=1.0, mean_uncond=0.0, std=0.3)
    noise = torch.randn(16, 1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = sample(model, noise, sigmas(30), "cond", "uncond", 2.0, "dpmpp_2m").latent
    result = sample(model, noise, sigmas(30), "cond", "uncond", 2.0, "dpmpp_2m",
                    [CompressGuidance(compression=3.0, skew=2.0, mode="reuse")])
    assert result.latent.shape == noise.shape and result.run.summary().evaluations == 30 + len(guided_step_indices(30, 10, 2.0))
    assert float(plain.mean()) == pytest.approx(2.0, abs=0.05)
    assert 1.8 < float(result.latent.mean()) < 1.98
