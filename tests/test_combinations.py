"""Every pair of methods under a guidance weight (engine docstring, docs/methods.md "Weights when methods
combine"): the weight scales the guidance term of every sample that keeps one (FULL, REUSE, ESTIMATE), never
a cond-only or adapter sample, and each call's record says what was applied.

Each pair is run twice on the same predictions: as it is, and with the weighting policy's weights turned
off. Both runs take the same actions (policies learn from unweighted predictions), so call by call and
sample by sample the weighted run's ``û_w`` must be ``c − w·(c − û)`` of the unweighted run's ``û`` where the
action keeps a guidance term, and ``û`` itself elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.compress_guidance import CompressGuidance, compression_weights, guided_step_indices
from fastguidance.engine import GUIDED_ACTIONS, Action, GuidancePolicy, GuidanceRun
from fastguidance.guidance_adapters.policy import AdapterGuidance
from fastguidance.linear_ag import LinearAG, LinearAGCoefficients, regressor_names
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas

STEPS, BATCH, SHAPE = 12, 2, (3, 4, 4)
SCHEDULE = [float(value) for value in make_sigmas(DiscreteVPSchedule(), "karras", STEPS)]


class Unweighted(GuidancePolicy):
    """``policy`` with its guidance weights off; everything else delegated (same actions, same learning)."""

    def __init__(self, policy: GuidancePolicy):
        self.policy = policy
        for name in ("name", "wants_cosine", "cosine_space", "uses_guidance_cache", "reads_sigma"):
            setattr(self, name, getattr(policy, name))

    def start(self, run):
        return self.policy.start(run)

    def propose(self, state, context):
        return self.policy.propose(state, context)

    def measured(self, state, record, cosine):
        self.policy.measured(state, record, cosine)

    def observe(self, state, context, x, cond, uncond, full):
        self.policy.observe(state, context, x, cond, uncond, full)

    def estimate(self, state, context, x, cond):
        return self.policy.estimate(state, context, x, cond)


def linear_ag(mode="alternate", seed=0) -> LinearAG:
    """LinearAG with small random coefficients for one call per step of SCHEDULE (window 2)."""
    generator = torch.Generator().manual_seed(seed)
    size = len(regressor_names(2))
    table = LinearAGCoefficients(
        coefficients=0.1 * torch.randn(STEPS, size, generator=generator),
        call_sigmas=torch.tensor(SCHEDULE[:-1], dtype=torch.float64),
        call_steps=torch.arange(STEPS), schedule=torch.tensor(SCHEDULE, dtype=torch.float64),
        held_out_error=torch.full((STEPS,), 0.1), info={"window": 2, "sampler": "euler", "scheduler": "karras"})
    return LinearAG(table, mode=mode)


def predictions(seed=0):
    """x, c, u per step: the uncond drifts towards the cond, so AG's cosine rises and latches mid-run."""
    generator = torch.Generator().manual_seed(seed)
    calls = []
    for step in range(STEPS):
        x = torch.randn(BATCH, *SHAPE, generator=generator)
        c = torch.randn(BATCH, *SHAPE, generator=generator)
        u = c + (1.0 - step / STEPS) ** 3 * torch.randn(BATCH, *SHAPE, generator=generator)
        calls.append((x, c, u))
    return calls


def drive(policies):
    run = GuidanceRun(policies, SCHEDULE, BATCH)
    results = []
    for step, (x, c, u) in enumerate(predictions()):
        plan = run.plan(torch.full((BATCH,), SCHEDULE[step]))
        results.append((c, run.complete(plan, x, c, u if plan.evaluate_uncond else None)))
    run.finish()
    return run, results


def check_weights(policies, weighted_index):
    """Run ``policies`` with and without the weights of ``policies[weighted_index]``; compare call by call.
    Returns the run's records for the pair's own assertions."""
    weighted_run, weighted = drive(policies)
    reference = list(policies)
    reference[weighted_index] = Unweighted(policies[weighted_index])
    plain_run, plain = drive(reference)
    asked = policies[weighted_index].start(weighted_run) if isinstance(policies[weighted_index], CompressGuidance) else None
    for record, plain_record, (c, u_w), (_, u) in zip(weighted_run.records, plain_run.records, weighted, plain):
        assert record.actions == plain_record.actions
        w = asked.weights.get(record.step, 1.0) if asked is not None else 1.0
        for b, action in enumerate(record.actions):
            if action in GUIDED_ACTIONS and w != 1.0:
                assert record.weights[b] == w
                assert torch.allclose(u_w[b], c[b] - w * (c[b] - u[b]), atol=1e-6)
            else:
                assert record.weights[b] == 1.0
                assert torch.equal(u_w[b], u[b])
    return weighted_run.records, asked


def compress(mode="compress"):
    return CompressGuidance(compression=3.0, skew=1.0, mode=mode)


def test_the_weights_asked_for_are_not_all_one():
    guided = guided_step_indices(STEPS, 4, 1.0)
    weights = compression_weights(SCHEDULE, guided, "count")
    assert guided == [0, 3, 6, 9] and set(weights.values()) == {3.0}


def test_linear_ag_estimate_on_a_compressed_guided_step_carries_the_weight():
    """The issue's case: LinearAG's ESTIMATE outranks FULL on CompG's guided steps; the estimate's guidance is
    weighted (before: unweighted, while the record said w)."""
    records, asked = check_weights([linear_ag("alternate"), compress()], weighted_index=1)
    estimated = [r for r in records if r.actions[0] == Action.ESTIMATE and r.step in asked.weights]
    assert estimated and all(r.weights == (3.0, 3.0) for r in estimated)
    assert all(r.actions[0] == Action.COND_ONLY and r.weights == (1.0, 1.0) for r in records if r.step not in asked.guided)


def test_linear_ag_with_compress_guidance_reuse_has_no_weight():
    records, _ = check_weights([linear_ag("alternate"), compress("reuse")], weighted_index=1)
    assert {r.actions[0] for r in records} >= {Action.ESTIMATE, Action.REUSE, Action.FULL}
    assert all(r.weights == (1.0, 1.0) and r.guidance_weight == 1.0 for r in records)


@pytest.mark.parametrize("after_cutoff", ["cond_only", "reuse"])
def test_adaptive_guidance_with_compress_guidance(after_cutoff):
    """AG's cutoff on a compressed guided step: cond only has no guidance to weight (the record says 1.0 though
    CompG asked for 3); AG's reuse keeps a guidance term, weighted."""
    ag = AdaptiveGuidance(threshold=0.99, convergence=1.0, cosine_space="denoised", after_cutoff=after_cutoff)
    records, asked = check_weights([ag, compress()], weighted_index=1)
    cut = [r for r in records if r.actions[0] != Action.FULL and r.step in asked.weights]
    assert cut, "AG never cut on a guided step: the test would check nothing"
    expected = (1.0, 1.0) if after_cutoff == "cond_only" else (3.0, 3.0)
    assert all(r.weights == expected for r in cut)


@pytest.mark.parametrize("mode", ["compress", "reuse"])
def test_adaptive_guidance_with_compress_guidance_per_sample(mode):
    """Samples latch on their own: in one call, one sample may be weighted and the other not."""
    ag = AdaptiveGuidance(threshold=0.99, convergence=1.0)
    check_weights([ag, compress(mode)], weighted_index=1)


def test_adapters_with_compress_guidance_ignore_the_weight():
    records, asked = check_weights([AdapterGuidance(omega=5.0), compress()], weighted_index=1)
    assert all(r.actions == (Action.ADAPTER,) * BATCH and r.weights == (1.0, 1.0) for r in records)
    assert any(w != 1.0 for w in asked.weights.values())


def test_weights_of_two_policies_multiply_and_the_record_holds_the_product():
    class Doubling(GuidancePolicy):
        name = "doubling"

        def guidance_weight(self, state, context):
            return 2.0

    run, results = drive([compress(), Doubling()])
    asked = compress().start(run)
    for record in run.records:
        if record.step in asked.guided:
            assert record.weights == (2.0 * asked.weights[record.step],) * BATCH
        else:
            assert record.weights == (1.0, 1.0) and math.isclose(record.guidance_weight, 1.0)
