import torch
import pytest

from fastguidance.engine import Action, GuidancePolicy, GuidanceRun, StepContext, combine_actions


class Scripted(GuidancePolicy):
    """Proposes a fixed action per (step, sample) from a table; records what it observes."""

    uses_guidance_cache = True

    def __init__(self, table, name="scripted"):
        self.table, self.name = table, name

    def start(self, run):
        return {"observed": []}

    def propose(self, state, context):
        return self.table.get(context.step)

    def observe(self, state, context, x, cond, uncond, full):
        state["observed"].append((context.step, list(full)))


class Estimator(GuidancePolicy):
    name = "estimator"

    def propose(self, state, context):
        return Action.ESTIMATE if context.step >= 1 else None

    def estimate(self, state, context, x, cond):
        return cond * 0.5


SIGMAS = [10.0, 5.0, 2.0, 1.0, 0.0]


def tensors(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, 4, 4, generator=generator) for _ in range(3))


def run_call(run, step, x, cond, uncond):
    plan = run.plan(torch.full((x.shape[0],), SIGMAS[step]))
    return plan, run.complete(plan, x, cond, uncond if plan.evaluate_uncond else None)


def test_combination_rule_highest_rank_wins_and_owner_is_kept():
    proposals = [
        (Action.FULL, Action.REUSE, Action.REUSE, Action.FULL),
        (Action.COND_ONLY, Action.FULL, Action.ESTIMATE, Action.FULL),
    ]
    actions, owners = combine_actions(proposals, 4)
    assert actions == (Action.COND_ONLY, Action.REUSE, Action.ESTIMATE, Action.FULL)
    assert owners == (1, 0, 1, None)


def test_no_policy_means_full_cfg_and_real_uncond():
    run = GuidanceRun([], SIGMAS, batch_size=2)
    x, cond, uncond = tensors()
    plan, u_hat = run_call(run, 0, x, cond, uncond)
    assert plan.evaluate_uncond and u_hat is uncond
    assert run.finish().text().startswith("FastGuidance: 0/1 uncond evaluations skipped")


def test_actions_produce_their_estimates():
    x, cond, uncond = tensors()
    policy = Scripted({1: Action.REUSE, 2: Action.COND_ONLY})
    run = GuidanceRun([policy], SIGMAS, batch_size=2)
    _, u0 = run_call(run, 0, x, cond, uncond)  # FULL: caches g = c - u
    assert u0 is uncond
    cond1 = cond + 1.0
    plan, u1 = run_call(run, 1, x, cond1, uncond)
    assert not plan.evaluate_uncond
    # REUSE: û = c − (σ/σ_j)·g_j, the guidance of call j reused in noise space
    assert torch.allclose(u1, cond1 - (SIGMAS[1] / SIGMAS[0]) * (cond - uncond))
    _, u2 = run_call(run, 2, x, cond1, uncond)
    assert u2 is cond1  # COND_ONLY: û = c
    summary = run.finish()
    assert (summary.calls, summary.uncond_skipped, summary.evaluations) == (3, 2, 4)
    assert summary.speedup == pytest.approx(6 / 4)


def test_reuse_without_a_cached_guidance_falls_back_to_full():
    run = GuidanceRun([Scripted({0: Action.REUSE})], SIGMAS, batch_size=2)
    plan = run.plan(torch.full((2,), SIGMAS[0]))
    assert plan.actions == (Action.FULL, Action.FULL)


def test_mixed_batch_evaluates_uncond_but_gives_each_sample_its_own_action():
    x, cond, uncond = tensors()
    run = GuidanceRun([Scripted({1: [Action.COND_ONLY, Action.FULL]})], SIGMAS, batch_size=2)
    run_call(run, 0, x, cond, uncond)
    plan, u_hat = run_call(run, 1, x, cond, uncond)
    assert plan.evaluate_uncond
    assert torch.equal(u_hat[0], cond[0]) and torch.equal(u_hat[1], uncond[1])
    assert run.records[-1].evaluations == 2


def test_guidance_cache_only_learns_from_samples_that_were_full():
    x, cond, uncond = tensors()
    table = {1: [Action.REUSE, Action.FULL], 2: Action.REUSE}
    run = GuidanceRun([Scripted(table)], SIGMAS, batch_size=2)
    run_call(run, 0, x, cond, uncond)
    cond1, uncond1 = cond + 2.0, uncond - 1.0
    run_call(run, 1, x, cond1, uncond1)  # sample 1 full: its cache updates; sample 0 keeps step 0's
    _, u2 = run_call(run, 2, x, cond, uncond)
    assert torch.allclose(u2[0], cond[0] - (SIGMAS[2] / SIGMAS[0]) * (cond[0] - uncond[0]))
    assert torch.allclose(u2[1], cond[1] - (SIGMAS[2] / SIGMAS[1]) * (cond1[1] - uncond1[1]))


def test_estimate_comes_from_the_owning_policy():
    x, cond, uncond = tensors()
    run = GuidanceRun([Estimator()], SIGMAS, batch_size=2)
    run_call(run, 0, x, cond, uncond)
    plan, u1 = run_call(run, 1, x, cond, uncond)
    assert plan.actions == (Action.ESTIMATE, Action.ESTIMATE)
    assert torch.equal(u1, cond * 0.5)


def test_policies_observe_real_predictions_with_the_full_mask():
    x, cond, uncond = tensors()
    policy = Scripted({1: [Action.COND_ONLY, Action.FULL]})
    run = GuidanceRun([policy], SIGMAS, batch_size=2)
    run_call(run, 0, x, cond, uncond)
    run_call(run, 1, x, cond, uncond)
    assert run._states[0]["observed"] == [(0, [True, True]), (1, [False, True])]


def test_step_context_uses_the_schedule():
    seen = []

    class Spy(GuidancePolicy):
        def propose(self, state, context: StepContext):
            seen.append((context.call, context.step, context.total_steps, context.batch_size))

    run = GuidanceRun([Spy()], SIGMAS, batch_size=3)
    x, cond, uncond = tensors(batch=3)
    for sigma in (10.0, 7.0, 5.0):  # 7.0 is a midpoint call of step 0
        plan = run.plan(torch.full((3,), sigma))
        run.complete(plan, x, cond, uncond)
    assert seen == [(0, 0, 4, 3), (1, 0, 4, 3), (2, 1, 4, 3)]


def test_runs_are_independent_with_a_shared_policy_object():
    x, cond, uncond = tensors()
    policy = Scripted({0: None})
    first, second = GuidanceRun([policy], SIGMAS, 2), GuidanceRun([policy], SIGMAS, 2)
    run_call(first, 0, x, cond, uncond)
    assert second._states[0]["observed"] == [] and len(second.records) == 0


def test_bad_proposal_length_is_reported():
    run = GuidanceRun([Scripted({0: [Action.FULL]}, name="short")], SIGMAS, batch_size=2)
    with pytest.raises(ValueError, match="short proposed 1 actions for a batch of 2"):
        run.plan(torch.full((2,), 10.0))


def test_complete_refuses_a_missing_uncond_when_the_plan_needs_it():
    run = GuidanceRun([], SIGMAS, batch_size=2)
    x, cond, _ = tensors()
    plan = run.plan(torch.full((2,), 10.0))
    with pytest.raises(ValueError, match="no uncond"):
        run.complete(plan, x, cond, None)


def test_to_dict_is_plain_data():
    import json

    x, cond, uncond = tensors()
    run = GuidanceRun([Scripted({1: Action.COND_ONLY})], SIGMAS, batch_size=2)
    for step in range(4):
        run_call(run, step, x, cond, uncond)
    run.finish()
    data = json.loads(json.dumps(run.to_dict()))
    assert data["summary"]["uncond_skipped"] == 1
    assert [r["actions"][0] for r in data["records"]] == ["full", "cond_only", "full", "full"]


def test_evaluations_per_sample_count_each_samples_actions():
    x, cond, uncond = tensors()
    run = GuidanceRun([Scripted({1: [Action.COND_ONLY, Action.FULL], 2: Action.COND_ONLY})], SIGMAS, batch_size=2)
    for step in range(3):
        run_call(run, step, x, cond, uncond)
    assert run.evaluations_per_sample() == [2 + 1 + 1, 2 + 2 + 1]
    assert run.summary().evaluations == 2 + 2 + 1


def test_adapter_guidance_overrides_every_other_action_and_costs_one_evaluation_per_call():
    from fastguidance.guidance_adapters.policy import AdapterGuidance

    x, cond, uncond = tensors()
    run = GuidanceRun([Scripted({0: Action.FULL, 1: Action.REUSE, 2: Action.COND_ONLY}), AdapterGuidance(None)],
                      SIGMAS, batch_size=2)
    for step in range(4):
        plan, u_hat = run_call(run, step, x, cond, uncond)
        assert plan.actions == (Action.ADAPTER, Action.ADAPTER) and not plan.evaluate_uncond
        assert u_hat is cond  # CFG of (c, c) is the adapted pass itself
    summary = run.finish()
    assert (summary.calls, summary.evaluations) == (4, 4) and summary.speedup == 2.0
    assert run.to_dict()["records"][0]["actions"] == ["adapter", "adapter"]
    assert run.to_dict()["policies"][1] == {"method": "agd", "omega": None, "strength": 1.0}
