"""The engine's accounting beside a step cache (ComfyUI's EasyCache, LazyCache): what the model ran and what the
cache answered (fastguidance.engine: GuidanceRun.served_from_cache, RunSummary), and which settings keep plain
CFG (GuidancePolicy.may_skip_uncond), where a host leaves the cache's calls exactly as without the engine."""

import torch

from fastguidance.engine import Action, GuidancePolicy, GuidanceRun
from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.compress_guidance import CompressGuidance

SIGMAS = [10.0, 5.0, 2.0, 1.0, 0.0]


class CondOnlyFrom(GuidancePolicy):
    name = "cond_only_from"

    def __init__(self, step):
        self.step = step

    def propose(self, state, context):
        return Action.COND_ONLY if context.step >= self.step else None


def call(run, sigma, served=0):
    x = torch.zeros(1, 2, 2, 2)
    plan = run.plan(torch.tensor([sigma]))
    cond = torch.ones_like(x)
    run.complete(plan, x, cond, -cond if plan.evaluate_uncond else None, cached=served)
    run.served_from_cache(cache_name="EasyCache")


def test_evaluations_are_what_the_model_ran_and_the_cache_answered_the_rest():
    run = GuidanceRun([CondOnlyFrom(2)], SIGMAS, batch_size=1)
    for sigma, served in zip(SIGMAS[:-1], [0, 2, 1, 0]):  # full, full (cached), cond only (cached), cond only
        call(run, sigma, served)
    summary = run.finish()
    assert [(r.evaluations, r.cached) for r in run.records] == [(2, 0), (0, 2), (0, 1), (1, 0)]
    assert (summary.calls, summary.uncond_skipped, summary.evaluations, summary.cached) == (4, 2, 3, 3)
    assert summary.cfg_evaluations == 8 and summary.speedup == 8 / 3
    assert summary.text("FastGuidance [x]") == ("FastGuidance [x]: 2/4 uncond evaluations skipped, EasyCache answered "
                                               "3 more, 2.67x fewer model evaluations (3 of 8)")
    assert run.to_dict()["summary"]["cached"] == 3 and run.to_dict()["records"][1]["cached"] == 2


def test_calls_a_cache_answered_before_the_engine_count_at_plain_cfg_cost():
    run = GuidanceRun([CondOnlyFrom(1)], SIGMAS, batch_size=1)
    call(run, 10.0)
    call(run, 2.0)
    run.served_from_cache(calls=2, cache_name="LazyCache")
    summary = run.finish()
    assert (summary.calls, summary.cache_calls, summary.evaluations, summary.cached) == (2, 2, 3, 4)
    assert summary.cfg_evaluations == 8 and "LazyCache answered 4 more" in summary.text()


def test_without_a_cache_the_summary_and_its_text_are_unchanged():
    run = GuidanceRun([CondOnlyFrom(2)], SIGMAS, batch_size=1)
    for sigma in SIGMAS[:-1]:
        call(run, sigma)
    summary = run.finish()
    assert (summary.evaluations, summary.cached, summary.cache_calls) == (6, 0, 0)
    assert summary.text() == "FastGuidance: 2/4 uncond evaluations skipped, 1.33x fewer model evaluations (6 of 8)"


def test_settings_that_keep_plain_cfg_say_so():
    def run_of(policy):
        return GuidanceRun([policy], SIGMAS, batch_size=1)

    assert not run_of(AdaptiveGuidance(threshold=1.0001)).may_skip_uncond()
    assert run_of(AdaptiveGuidance()).may_skip_uncond()
    assert not run_of(CompressGuidance(compression=1.0)).may_skip_uncond()
    assert run_of(CompressGuidance(compression=2.0)).may_skip_uncond()
    assert run_of(CondOnlyFrom(9)).may_skip_uncond()  # a policy that does not say: it may
    assert GuidanceRun([AdaptiveGuidance(threshold=1.0001), CompressGuidance()], SIGMAS, 1).may_skip_uncond()


class Learner(GuidancePolicy):
    """Wants the cosine and the guidance cache; records what it is told."""

    name = "learner"
    wants_cosine = True
    uses_guidance_cache = True

    def start(self, run):
        return {"measured": [], "observed": []}

    def propose(self, state, context):
        return Action.REUSE if context.step == 2 else None

    def measured(self, state, record, cosine):
        state["measured"].append((record.step, cosine))

    def observe(self, state, context, x, cond, uncond, full):
        state["observed"].append((context.step, list(full)))


def test_policies_learn_nothing_from_predictions_a_cache_answered():
    """A call EasyCache answered carries stale predictions the model never made: no cosine is measured on
    them, the guidance cache keeps the last real guidance, and observe() is told they are not real."""
    run = GuidanceRun([Learner()], SIGMAS, batch_size=1)
    x = torch.zeros(1, 2, 2, 2)
    cond, real_uncond = torch.ones_like(x), -torch.ones_like(x)
    stale_uncond = torch.full_like(x, 5.0)
    plan = run.plan(torch.tensor([SIGMAS[0]]))
    run.complete(plan, x, cond, real_uncond)  # the model: learned
    plan = run.plan(torch.tensor([SIGMAS[1]]))
    run.complete(plan, x, cond, stale_uncond, cached=2)  # the cache: not learned
    plan = run.plan(torch.tensor([SIGMAS[2]]))
    assert plan.actions == (Action.REUSE,)
    u_hat = run.complete(plan, x, cond, None)
    # reused from call 0 (g = 2), not from the cached call 1 (g = −4)
    assert torch.allclose(u_hat, cond - SIGMAS[2] * (cond - real_uncond) / SIGMAS[0])
    run.finish()
    state = run._states[0]
    assert [step for step, _ in state["measured"]] == [0]
    assert state["observed"] == [(0, [True]), (1, [False]), (2, [False])]
    assert run.records[1].cosine is None and (run.records[1].evaluations, run.records[1].cached) == (0, 2)
