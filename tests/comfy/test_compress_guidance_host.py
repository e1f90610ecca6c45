"""Compress Guidance inside the real host: counted model calls follow the schedule, parity, composition."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import counted, ksampler, latent, node_defaults
from fastguidance.compress_guidance import compression_weights, guided_step_count, guided_step_indices

STEPS = 12
#: compression 4 over 12 steps: 3 guided steps, skew 2 puts them at the distinct values of floor(12·(j/3)²)
GUIDED = [0, 1, 5]
MODES = ("reuse", "compress")
#: the paper's AG rule (noise cosine, no convergence condition), in which the AG thresholds here are measured
AG_PAPER_RULE = {"cosine_space": "noise", "convergence": 1.0}


def schedule(model, steps=STEPS, scheduler="normal") -> list[float]:
    """The sigmas KSampler samples (steps + 1 values ending in 0), computed by the host."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).tolist()


def patch(host, model, compression=4.0, guided_steps=0, skew=2.0, mode="reuse"):
    return host.node("FastGuidance_CompressGuidance").execute(model, compression, guided_steps, skew, mode)[0]


def guider(host, model, positive, negative, cfg=6.0, compression=4.0, guided_steps=0, skew=2.0, mode="reuse"):
    node = host.node("FastGuidance_CompressGuider")
    return node.execute(model, positive, negative, cfg, compression, guided_steps, skew, mode)[0]


def stock_guider(model, positive, negative, cfg=6.0):
    import comfy.samplers

    stock = comfy.samplers.CFGGuider(model)
    stock.set_conds(positive, negative)
    stock.set_cfg(cfg)
    return stock


def custom_sample(host, guider, steps=STEPS, seed=3, sampler_name="euler"):
    import comfy.samplers

    noise = host.call("RandomNoise", seed)[0]
    sampler = host.call("KSamplerSelect", sampler_name)[0]
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps).cpu()
    return host.call("SamplerCustomAdvanced", noise, guider, sampler, sigmas, latent())[0]["samples"]


def test_the_schedule_of_these_tests():
    assert guided_step_indices(STEPS, 3, 2.0) == GUIDED


@pytest.mark.parametrize("mode", MODES)
def test_ksampler_forward_passes_follow_the_schedule(host, tiny_model, conds, runs, mode):
    positive, negative = conds
    model, counter = counted(tiny_model)
    ksampler(host, patch(host, model, mode=mode), positive, negative, steps=STEPS)
    run = runs[-1]
    # one forward pass per step (cond and uncond batched), with the uncond exactly on the guided steps
    assert len(counter.calls) == STEPS
    assert [1 in call for call in counter.calls] == [step in GUIDED for step in range(STEPS)]
    assert counter.cond_passes == STEPS and counter.uncond_passes == len(GUIDED)
    summary = run.summary()
    assert (summary.calls, summary.evaluations, summary.uncond_skipped) == (STEPS, STEPS + 3, STEPS - 3)
    skipped = "REUSE" if mode == "reuse" else "COND_ONLY"
    assert [r.actions[0].name for r in run.records] == ["FULL" if s in GUIDED else skipped for s in range(STEPS)]
    # compress (the node weighs by count): each guided step carries the guidance of the steps it covers, itself
    # and the skipped ones up to the next guided step or the end
    weights = {0: 1.0, 1: 4.0, 5: 7.0} if mode == "compress" else {}
    assert run.policies[0].weighting == "count"
    if mode == "compress":
        assert compression_weights(schedule(tiny_model), GUIDED, "count") == weights
    assert [r.guidance_weight for r in run.records] == [weights.get(s, 1.0) for s in range(STEPS)]


@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_weights_by_noise_level_span_use_the_sampled_sigmas(host, tiny_model, conds, runs, denoise):
    """The core's span weighting (not on the node) gets the sigmas KSampler samples, also the segment of denoise < 1."""
    positive, negative = conds
    compress = sys.modules[host.pack.__name__ + ".fastguidance.compress_guidance"]
    engine_patch = sys.modules[host.pack.__name__ + ".nodes.engine_patch"]
    policy = compress.CompressGuidance(compression=4.0, skew=2.0, mode="compress", weighting="sigma")
    ksampler(host, engine_patch.install_policy(tiny_model, policy, None), positive, negative, steps=STEPS,
             denoise=denoise)
    run = runs[-1]
    # KSampler with denoise d samples the last STEPS + 1 sigmas of a schedule of STEPS / d steps
    sigmas = schedule(tiny_model, int(STEPS / denoise))[-(STEPS + 1):]
    assert run.total_steps == STEPS and list(run.schedule) == pytest.approx(sigmas, rel=1e-6)
    weights = compression_weights(sigmas, GUIDED, "sigma")
    assert weights[0] == pytest.approx(1.0)  # step 0 covers only itself (step 1 is guided)
    assert weights[1] == pytest.approx((sigmas[1] - sigmas[5]) / (sigmas[1] - sigmas[2]))
    assert weights[5] == pytest.approx(sigmas[5] / (sigmas[5] - sigmas[6]))  # to the end of the schedule
    assert weights != pytest.approx({0: 1.0, 1: 4.0, 5: 7.0}, rel=1e-3)  # not the count of covered steps
    assert [r.guidance_weight for r in run.records] == pytest.approx([weights.get(s, 1.0) for s in range(STEPS)],
                                                                     rel=1e-5)


def test_the_node_defaults_guide_evenly_and_compress(host, tiny_model, conds, runs):
    """The schema defaults (compression 4, skew 1, mode compress): an evenly spread schedule, weights by count."""
    positive, negative = conds
    defaults = node_defaults(host, "FastGuidance_CompressGuidance")
    model, counter = counted(tiny_model)
    ksampler(host, host.node("FastGuidance_CompressGuidance").execute(model, **defaults)[0], positive, negative,
             steps=STEPS)
    run = runs[-1]
    assert run.policies[0].describe() == {"method": "compg", "weighting": "count", **defaults}
    guided = guided_step_indices(STEPS, guided_step_count(STEPS, defaults["guided_steps"], defaults["compression"]),
                                 defaults["skew"])
    assert guided == [0, 4, 8]
    assert [1 in call for call in counter.calls] == [step in guided for step in range(STEPS)]
    assert run.summary().evaluations == STEPS + len(guided)
    weights = {0: 4.0, 4: 4.0, 8: 4.0}  # each guided step covers itself and the three skipped after it
    assert compression_weights(schedule(tiny_model), guided, run.policies[0].weighting) == weights
    assert [r.guidance_weight for r in run.records] == [weights.get(s, 1.0) for s in range(STEPS)]


@pytest.mark.parametrize("mode", MODES)
def test_guider_with_samplercustomadvanced_follows_the_schedule(host, tiny_model, conds, runs, mode):
    positive, negative = conds
    model, counter = counted(tiny_model)
    out = custom_sample(host, guider(host, model, positive, negative, mode=mode))
    assert torch.isfinite(out).all()
    assert len(counter.calls) == STEPS
    assert [1 in call for call in counter.calls] == [step in GUIDED for step in range(STEPS)]
    assert runs[-1].summary().evaluations == STEPS + 3


def test_guided_steps_input_overrides_compression(host, tiny_model, conds, runs):
    positive, negative = conds
    model, counter = counted(tiny_model)
    ksampler(host, patch(host, model, compression=4.0, guided_steps=5, skew=1.0), positive, negative, steps=STEPS)
    guided = guided_step_indices(STEPS, 5, 1.0)
    assert guided == [0, 2, 4, 7, 9]
    assert [1 in call for call in counter.calls] == [step in guided for step in range(STEPS)]


def test_every_call_of_a_guided_step_is_guided_with_dpm_2(host, tiny_model, conds, runs):
    positive, negative = conds
    model, counter = counted(tiny_model)
    ksampler(host, patch(host, model), positive, negative, steps=STEPS, sampler_name="dpm_2")
    records = runs[-1].records
    assert len(records) == len(counter.calls) == 2 * STEPS - 1  # a midpoint call per step but the last
    assert [r.step for r in records] == [s for s in range(STEPS - 1) for _ in (0, 1)] + [STEPS - 1]
    assert [r.evaluations == 2 for r in records] == [r.step in GUIDED for r in records]
    assert [1 in call for call in counter.calls] == [r.step in GUIDED for r in records]


@pytest.mark.parametrize("mode", MODES)
def test_parity_with_ksampler_at_compression_one(host, tiny_model, conds, runs, mode):
    positive, negative = conds
    stock = ksampler(host, tiny_model, positive, negative, steps=STEPS)
    patched = ksampler(host, patch(host, tiny_model, compression=1.0, mode=mode), positive, negative, steps=STEPS)
    assert (patched - stock).abs().max().item() == 0.0
    assert runs[-1].summary().uncond_skipped == 0 and runs[-1].summary().calls == STEPS
    every = ksampler(host, patch(host, tiny_model, guided_steps=STEPS + 5, mode=mode), positive, negative, steps=STEPS)
    assert (every - stock).abs().max().item() == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_parity_of_the_guider_with_the_stock_cfg_guider(host, tiny_model, conds, runs, mode):
    positive, negative = conds
    stock = custom_sample(host, stock_guider(tiny_model, positive, negative))
    ours = custom_sample(host, guider(host, tiny_model, positive, negative, compression=1.0, mode=mode))
    assert (ours - stock).abs().max().item() == 0.0
    assert runs[-1].summary().calls == STEPS and runs[-1].summary().uncond_skipped == 0


@pytest.mark.parametrize("mode", MODES)
def test_patch_and_guider_agree_and_differ_from_cfg(host, tiny_model, conds, mode):
    positive, negative = conds
    patched = ksampler(host, patch(host, tiny_model, mode=mode), positive, negative, steps=STEPS)
    guided = custom_sample(host, guider(host, tiny_model, positive, negative, mode=mode))
    stock = ksampler(host, tiny_model, positive, negative, steps=STEPS)
    assert (patched - guided).abs().max().item() < 1e-5
    relative = ((patched - stock).norm() / stock.norm()).item()
    assert 0.0 < relative < 0.5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sampler_name", ["euler", "heun", "dpmpp_2m", "euler_cfg_pp"])
def test_what_post_cfg_hooks_see(host, tiny_model, conds, runs, mode, sampler_name):
    """A skipped uncond is c − (σ/σ_last)·g_last (reuse) or c (compress), never zeros."""
    positive, negative = conds
    model, counter = counted(tiny_model)
    seen = []

    def post_cfg(args):
        seen.append((args["cond_denoised"], args["uncond_denoised"]))
        return args["denoised"]

    model.set_model_sampler_post_cfg_function(post_cfg)
    out = ksampler(host, patch(host, model, mode=mode), positive, negative, steps=STEPS, sampler_name=sampler_name)
    assert torch.isfinite(out).all()
    records = runs[-1].records
    assert len(records) == len(seen) == len(counter.calls)
    assert {r.step for r in records if r.evaluations == 2} == set(GUIDED)
    last_guidance = last_sigma = None
    for record, (cond, uncond) in zip(records, seen):
        assert uncond.abs().sum() > 0
        if record.evaluations == 2:
            # reuse: the real uncond; compress: not cached, not used
            last_guidance, last_sigma = cond - uncond, record.sigma
        elif mode == "reuse":
            expected = cond - (record.sigma / last_sigma) * last_guidance  # reused in noise space
            assert torch.allclose(uncond, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(uncond, cond)


@pytest.fixture(scope="module")
def guided_cosines(host, tiny_model):
    """The cosine AG measures on each guided step of CompG(compression 2) with a threshold that never cuts."""
    engine_patch = sys.modules[host.pack.__name__ + ".nodes.engine_patch"]
    captured = []
    original = engine_patch._report
    engine_patch._report = lambda config, host_run, name: captured.append(host_run.run)
    try:
        from conftest import make_conds

        positive, negative = make_conds()
        model = host.node("FastGuidance_AdaptiveGuidance").execute(
            patch(host, tiny_model, compression=2.0), 1.0001, 0.0, 1.0, "cond_only", **AG_PAPER_RULE)[0]
        ksampler(host, model, positive, negative, steps=STEPS)
    finally:
        engine_patch._report = original
    run = captured[-1]
    run.finish()
    return {r.step: r.cosine[0] for r in run.records if r.evaluations == 2}


@pytest.mark.parametrize("order", ["compg_then_ag", "ag_then_compg"])
def test_two_patches_one_engine_ag_cutoff_overrides_reuse(host, tiny_model, conds, runs, guided_cosines, order):
    guided = guided_step_indices(STEPS, 6, 2.0)  # floor(12·(j/6)²) for j = 0…5: 0 and 0 coincide
    assert guided == [0, 1, 3, 5, 8] and sorted(guided_cosines) == guided
    threshold = guided_cosines[3]
    latch = next(step for step in guided if guided_cosines[step] >= threshold)  # 3 unless cosines fall
    assert "REUSE" in ["FULL" if s in guided else "REUSE" for s in range(latch + 1)]  # step 2 reuses before the cut
    positive, negative = conds
    model, counter = counted(tiny_model)

    def with_ag(m):
        return host.node("FastGuidance_AdaptiveGuidance").execute(m, threshold, 0.0, 1.0, "cond_only",
                                                                  **AG_PAPER_RULE)[0]

    if order == "compg_then_ag":
        both = with_ag(patch(host, model, compression=2.0))
    else:
        both = patch(host, with_ag(model), compression=2.0)
    engine_patch = sys.modules[host.pack.__name__ + ".nodes.engine_patch"]
    config = both.model_options["transformer_options"][engine_patch.ENGINE_KEY]
    assert sorted(p.name for p in config.policies) == ["ag", "compg"] and config.chained is None
    ksampler(host, both, positive, negative, steps=STEPS)
    expected = ["FULL" if s in guided else "REUSE" for s in range(latch + 1)] + ["COND_ONLY"] * (STEPS - latch - 1)
    assert [r.actions[0].name for r in runs[-1].records] == expected
    assert len(counter.calls) == STEPS
    assert counter.uncond_passes == sum(1 for s in guided if s <= latch)


@pytest.mark.parametrize("node_id", ["FastGuidance_CompressGuidance", "FastGuidance_CompressGuider"])
def test_validate_inputs_names_the_input(host, node_id):
    node = host.nodes.NODE_CLASS_MAPPINGS[node_id]
    assert node.validate_inputs(compression=4.0, guided_steps=0, skew=2.0, mode="reuse") is True
    assert node.validate_inputs() is True  # every input fed by a link: nothing to check yet
    message = node.validate_inputs(compression=0.5, guided_steps=0, skew=2.0, mode="reuse")
    assert isinstance(message, str) and message.startswith("compression = 0.5 is not valid")
    # the tooltip's range is the contract, also where guided_steps makes compression unused
    assert node.validate_inputs(compression=0.5, guided_steps=4).startswith("compression = 0.5 is not valid: use a number from 1 to 100")
    assert "guided_steps" in node.validate_inputs(guided_steps=-2)
    assert node.validate_inputs(skew=0.0).startswith("skew = 0.0")
    assert "mode" in node.validate_inputs(mode="zeros")


def test_execute_refuses_bad_settings(host, tiny_model):
    from fastguidance.errors import InvalidInputError

    with pytest.raises(ValueError, match="skew") as caught:
        patch(host, tiny_model, skew=0.0)
    assert type(caught.value).__name__ == InvalidInputError.__name__
