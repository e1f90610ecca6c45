import math

import pytest
import torch

from fastguidance.engine import Action, GuidanceRun
from fastguidance.errors import InvalidInputError
from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.research.sampling import sample
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas
from toy_models import GaussianModel, ScriptedCosineModel

SCHEDULE = DiscreteVPSchedule()


def paper_ag(**settings):
    """AG with the paper's rule (noise cosine, no convergence condition): ScriptedCosineModel scripts
    the noise cosine exactly, so the latch step is known."""
    return AdaptiveGuidance(**{"cosine_space": "noise", "convergence": 1.0, **settings})


def sigmas(steps=20, scheduler="karras"):
    return make_sigmas(SCHEDULE, scheduler, steps)


def expected_cutoff_step(model, schedule, threshold, sample_index):
    """First step whose cosine reaches the threshold (the latch happens after that step)."""
    for step, sigma in enumerate(schedule[:-1]):
        if float(model.expected_cosine(sigma)[sample_index]) >= threshold:
            return step
    return None


@pytest.mark.parametrize("threshold,bad", [(-0.1, "threshold"), (1.5, "threshold")])
def test_threshold_outside_range_is_refused(threshold, bad):
    with pytest.raises(InvalidInputError, match=bad):
        paper_ag(threshold=threshold)


def test_window_with_start_after_end_is_refused_with_the_fix():
    with pytest.raises(InvalidInputError, match="start_percent.*start_percent <= end_percent"):
        AdaptiveGuidance(start_percent=0.8, end_percent=0.2)


def test_bad_percent_and_mode_are_refused():
    with pytest.raises(InvalidInputError, match="end_percent"):
        AdaptiveGuidance(end_percent=1.5)
    with pytest.raises(InvalidInputError, match="after_cutoff"):
        AdaptiveGuidance(after_cutoff="zeros")
    with pytest.raises(InvalidInputError, match="cosine_space.*noise, denoised"):
        AdaptiveGuidance(cosine_space="latent")


def test_policies_of_one_run_must_share_the_cosine_space():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8))
    policies = [paper_ag(threshold=0.99), AdaptiveGuidance(threshold=0.99, cosine_space="denoised")]
    with pytest.raises(InvalidInputError, match="cosine_space.*same cosine_space on every"):
        sample(model, torch.randn(1, 4, 8, 8), sigmas(), "cond", "uncond", 5.0, "euler", policies)


def test_denoised_space_records_the_cosine_of_the_predictions():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def recording(x, sigma, conds):
        out = model(x, sigma, conds)
        if len(conds) == 2:
            seen.append(float(torch.nn.functional.cosine_similarity(out[0].flatten(), out[1].flatten(), dim=0)))
        return out

    result = sample(recording, noise, sigmas(6), "cond", "uncond", 5.0, "euler",
                    [AdaptiveGuidance(threshold=1.0001, cosine_space="denoised")])
    assert [record.cosine[0] for record in result.run.records] == pytest.approx(seen, abs=1e-5)


def test_threshold_above_one_is_exactly_plain_cfg():
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 3.0])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample(model, noise, sigmas(), "cond", "uncond", 7.0, "dpmpp_2m")
    never = sample(model, noise, sigmas(), "cond", "uncond", 7.0, "dpmpp_2m", [paper_ag(threshold=1.0001)])
    assert torch.equal(plain.latent, never.latent)
    assert never.run.summary().uncond_skipped == 0


def test_each_sample_latches_at_its_own_step_and_stays_cond_only():
    # rates differ: sample 1's cosine rises faster, so it crosses the threshold earlier
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 0.4])
    schedule = sigmas(20).tolist()
    threshold = 0.99
    result = sample(model, torch.randn(2, 4, 8, 8), schedule, "cond", "uncond", 5.0, "euler",
                    [paper_ag(threshold=threshold)])
    records = result.run.records
    for b in range(2):
        crossing = expected_cutoff_step(model, schedule, threshold, b)
        actions = [record.actions[b] for record in records]
        assert actions[: crossing + 1] == [Action.FULL] * (crossing + 1)
        assert actions[crossing + 1:] == [Action.COND_ONLY] * (len(actions) - crossing - 1)
        # the measured cosine is the model's, per sample
        assert records[crossing].cosine[b] == pytest.approx(float(model.expected_cosine(schedule[crossing])[b]), abs=1e-5)
    # the uncond is saved only once both samples are past their cutoff
    last_crossing = max(expected_cutoff_step(model, schedule, threshold, b) for b in range(2))
    skipped = [record.evaluations == 1 for record in records]
    assert skipped == [False] * (last_crossing + 1) + [True] * (len(records) - last_crossing - 1)
    # the model was called with the uncond exactly when the record says so
    assert [len(c) == 1 for c in model.calls] == skipped


def test_a_sample_gives_the_same_result_alone_and_in_a_batch():
    model = ScriptedCosineModel(shape=(2, 4, 8, 8), rates=[1.0, 0.4])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    policy = [paper_ag(threshold=0.99)]
    batch = sample(model, noise, sigmas(), "cond", "uncond", 5.0, "euler", policy).latent
    alone = ScriptedCosineModel(shape=(1, 4, 8, 8), rates=[1.0])
    alone.e_c, alone.e_perp = model.e_c[:1], model.e_perp[:1]
    single = sample(alone, noise[:1], sigmas(), "cond", "uncond", 5.0, "euler", policy).latent
    assert torch.allclose(batch[:1], single, atol=1e-6)


def test_window_keeps_guidance_outside_it():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8), rates=[0.2])  # cosine high from the start
    schedule = sigmas(20).tolist()
    policy = paper_ag(threshold=0.95, start_percent=0.5, end_percent=0.8)
    result = sample(model, torch.randn(1, 4, 8, 8), schedule, "cond", "uncond", 5.0, "euler", [policy],
                    percent_to_sigma=SCHEDULE.percent_to_sigma)
    sigma_start, sigma_end = SCHEDULE.percent_to_sigma(0.5), SCHEDULE.percent_to_sigma(0.8)
    for record in result.run.records:
        if not sigma_end <= record.sigma <= sigma_start:
            assert record.actions == (Action.FULL,)
    in_window = [r for r in result.run.records if sigma_end <= r.sigma <= sigma_start]
    assert in_window[0].actions == (Action.FULL,)  # latches on its first measurement in the window
    assert all(r.actions == (Action.COND_ONLY,) for r in in_window[1:])
    assert len(in_window) >= 3


def test_reuse_after_cutoff_keeps_the_last_guidance_term():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8), rates=[0.5])
    schedule = sigmas(10).tolist()
    result = sample(model, torch.randn(1, 4, 8, 8), schedule, "cond", "uncond", 5.0, "euler",
                    [paper_ag(threshold=0.99, after_cutoff="reuse")])
    actions = [record.actions[0] for record in result.run.records]
    assert Action.REUSE in actions and Action.COND_ONLY not in actions
    first = actions.index(Action.REUSE)
    assert all(a == Action.REUSE for a in actions[first:])


def test_cfg_one_passes_through_without_a_decision():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8))
    result = sample(model, torch.randn(1, 4, 8, 8), sigmas(5), "cond", "uncond", 1.0, "euler",
                    [paper_ag(threshold=0.5)])
    assert result.run.summary().calls == 0
    assert all(c == ("cond",) for c in model.calls)


def test_ag_on_gaussian_data_keeps_the_guided_mean_when_it_does_not_cut():
    model = GaussianModel(mean_cond=1.0, mean_uncond=0.0, std=0.3)
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    guided = sample(model, noise, sigmas(30), "cond", "uncond", 2.0, "dpmpp_2m", [paper_ag(threshold=1.0001)])
    assert float(guided.latent.mean()) == pytest.approx(2.0, abs=0.05)


def test_summary_line_reads_like_the_log():
    model = ScriptedCosineModel(shape=(1, 4, 8, 8), rates=[0.5])
    result = sample(model, torch.randn(1, 4, 8, 8), sigmas(30).tolist(), "cond", "uncond", 5.0, "euler",
                    [paper_ag(threshold=0.99)])
    summary = result.run.summary()
    text = summary.text("AG")
    assert text == (f"AG: {summary.uncond_skipped}/30 uncond evaluations skipped, "
                    f"{60 / (60 - summary.uncond_skipped):.2f}x fewer model evaluations "
                    f"({60 - summary.uncond_skipped} of 60)")
    assert 0 < summary.uncond_skipped < 30


# -- the defaults: the convergence condition and the run's advice -----------------------------------------


def test_defaults_measure_the_denoised_cosine_with_the_convergence_condition():
    policy = AdaptiveGuidance()
    assert (policy.threshold, policy.cosine_space, policy.convergence) == (0.9998, "denoised", 0.5)
    assert policy.describe()["convergence"] == 0.5
    with pytest.raises(InvalidInputError, match="convergence.*1.0 turns the condition off"):
        AdaptiveGuidance(convergence=1.5)
    with pytest.raises(InvalidInputError, match="convergence"):
        AdaptiveGuidance(convergence=-0.1)


def drive_cosines(policy, cosines, steps=None):
    """Hand a run the given per-call cosines (one sample) as a host would; returns the run."""
    steps = steps or len(cosines)
    schedule = sigmas(steps).tolist()
    run = GuidanceRun([policy], schedule, 1)
    for step, cosine in enumerate(cosines):
        plan = run.plan(torch.tensor([schedule[step]]))
        # 1-D "predictions" whose cosine in the policy's space is exactly `cosine`
        angle = math.acos(max(-1.0, min(1.0, cosine)))
        x = torch.zeros(1, 2)
        cond = torch.tensor([[1.0, 0.0]])
        uncond = torch.tensor([[math.cos(angle), math.sin(angle)]])
        if policy.cosine_space == "noise":
            cond, uncond = x - cond, x - uncond
        run.complete(plan, x, cond, uncond if plan.evaluate_uncond else None)
    run.finish()
    return run


def test_convergence_keeps_a_high_first_cosine_from_cutting_at_the_first_step():
    cosines = [0.9999, 0.99992, 0.99996, 0.99998, 0.99999, 0.99999]
    paper = drive_cosines(paper_ag(threshold=0.9995), cosines)
    assert paper.records[1].actions == (Action.COND_ONLY,)  # latched on the first cosine
    guarded = drive_cosines(paper_ag(threshold=0.9995, convergence=0.5), cosines)
    actions = [record.actions[0] for record in guarded.records]
    # 1 − γ: 1e-4, 8e-5, 4e-5 (≤ half of 1e-4 at step 2) → cond only from step 3
    assert actions == [Action.FULL] * 3 + [Action.COND_ONLY] * 3


def test_convergence_never_cuts_while_the_cosine_falls():
    falling = [0.99993, 0.99990, 0.99985, 0.9997, 0.9995, 0.999]
    run = drive_cosines(paper_ag(threshold=0.991, convergence=0.5), falling)
    assert run.summary().uncond_skipped == 0
    advice = run.advice()
    assert len(advice) == 1 and advice[0].startswith("Adaptive Guidance never cut guidance (highest cosine 0.99993")
    assert "plain CFG" in advice[0] and "lower the threshold" in advice[0]


def test_advice_says_when_guidance_was_cut_at_the_first_step_with_the_fix():
    run = drive_cosines(paper_ag(threshold=0.991), [0.9999, 0.9998, 0.9997])
    advice = run.advice()
    assert len(advice) == 1 and "cut guidance at the first step for 1 of 1 image(s)" in advice[0]
    assert "unguided" in advice[0] and "cosine_space denoised, threshold 0.9998" in advice[0]
    assert run.to_dict()["advice"] == advice


def test_no_advice_for_a_run_that_cut_later_or_asked_for_plain_cfg():
    rising = [0.96, 0.98, 0.995, 0.9996, 0.99995, 0.99999]
    assert drive_cosines(AdaptiveGuidance(), rising).advice() == []
    assert drive_cosines(AdaptiveGuidance(threshold=1.0001), rising).advice() == []


@pytest.mark.parametrize("name", ["threshold", "start_percent", "end_percent", "convergence"])
def test_text_in_a_number_input_is_refused_naming_the_input(name):
    # ComfyUI passes the raw value to validate_inputs for the inputs it names: no TypeError may escape
    with pytest.raises(InvalidInputError, match=name):
        AdaptiveGuidance(**{name: "abc"})
