"""Adaptive Guidance inside the real host: parity, counted savings, samplers, graphs (COMFYUI.md)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from conftest import counted, ksampler, latent, make_conds, node_defaults, pack_module
import host_models

STEPS = 10
#: the paper's cosine rule (noise directions, no convergence condition): the thresholds of these tests are
#: measured with it. The node's defaults are another rule, tested on every sampling type at the end.
PAPER_RULE = {"cosine_space": "noise", "convergence": 1.0}


def patch(host, model, threshold=0.991, start_percent=0.0, end_percent=1.0, after_cutoff="cond_only", **optional):
    node = host.node("FastGuidance_AdaptiveGuidance")
    return node.execute(model, threshold, start_percent, end_percent, after_cutoff, **{**PAPER_RULE, **optional})[0]


@pytest.fixture(scope="module")
def cutting_threshold(host, tiny_model):
    """A threshold that this tiny model reaches mid-run: the cosine measured at step 4 of 10."""
    captured = []
    engine_patch = sys.modules[host.pack.__name__ + ".nodes.engine_patch"]
    original = engine_patch._report
    engine_patch._report = lambda config, host_run, name: captured.append(host_run.run)
    try:
        positive, negative = make_conds()
        ksampler(host, patch(host, tiny_model, threshold=1.0001), positive, negative, steps=STEPS)
    finally:
        engine_patch._report = original
    captured[-1].finish()
    cosines = [record.cosine[0] for record in captured[-1].records]
    assert cosines[-1] > cosines[0], f"the tiny model's cosines should rise: {cosines}"
    return cosines[4]


def test_parity_with_ksampler_when_ag_never_cuts(host, tiny_model, conds, runs):
    positive, negative = conds
    stock = ksampler(host, tiny_model, positive, negative)
    patched = ksampler(host, patch(host, tiny_model, threshold=1.0001), positive, negative)
    assert (patched - stock).abs().max().item() == 0.0
    assert runs[-1].summary().uncond_skipped == 0 and runs[-1].summary().calls == STEPS


def custom_sample(host, guider, steps=STEPS, seed=3, sampler_name="euler"):
    import comfy.samplers

    noise = host.call("RandomNoise", seed)[0]
    sampler = host.call("KSamplerSelect", sampler_name)[0]
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps).cpu()
    return host.call("SamplerCustomAdvanced", noise, guider, sampler, sigmas, latent())[0]["samples"]


def test_parity_of_the_guider_with_the_stock_cfg_guider(host, tiny_model, conds, runs):
    import comfy.samplers

    positive, negative = conds
    stock_guider = comfy.samplers.CFGGuider(tiny_model)
    stock_guider.set_conds(positive, negative)
    stock_guider.set_cfg(6.0)
    guider = host.node("FastGuidance_AdaptiveGuider").execute(tiny_model, positive, negative, 6.0, 1.0001, 0.0, 1.0,
                                                              "cond_only")[0]
    assert (custom_sample(host, guider) - custom_sample(host, stock_guider)).abs().max().item() == 0.0
    assert runs[-1].summary().calls == STEPS


def test_patch_on_samplercustomadvanced_counts_savings(host, tiny_model, conds, runs, cutting_threshold):
    import comfy.samplers

    positive, negative = conds
    model, counter = counted(tiny_model)
    guider = comfy.samplers.CFGGuider(patch(host, model, threshold=cutting_threshold))
    guider.set_conds(positive, negative)
    guider.set_cfg(6.0)
    custom_sample(host, guider)
    summary = runs[-1].summary()
    assert summary.uncond_skipped > 0
    assert counter.uncond_passes == summary.calls - summary.uncond_skipped
    assert counter.cond_passes == summary.calls


def test_savings_match_counted_forward_passes(host, tiny_model, conds, runs, cutting_threshold):
    positive, negative = conds
    model, counter = counted(tiny_model)
    ksampler(host, patch(host, model, threshold=cutting_threshold), positive, negative)
    run = runs[-1]
    summary = run.summary()
    assert 0 < summary.uncond_skipped < STEPS
    # one forward pass per call (cond and uncond batched together), the uncond only where the record says
    assert len(counter.calls) == STEPS
    assert [1 in call for call in counter.calls] == [record.evaluations == 2 for record in run.records]
    # latched: once cut, every later step is cond-only
    evaluations = [record.evaluations for record in run.records]
    first_cut = evaluations.index(1)
    assert evaluations[first_cut:] == [1] * (STEPS - first_cut)
    assert run.records[first_cut - 1].cosine[0] >= cutting_threshold


def test_cut_result_stays_close_to_cfg(host, tiny_model, conds, cutting_threshold):
    positive, negative = conds
    stock = ksampler(host, tiny_model, positive, negative)
    cut = ksampler(host, patch(host, tiny_model, threshold=cutting_threshold), positive, negative)
    relative = ((cut - stock).norm() / stock.norm()).item()
    assert 0.0 < relative < 0.5


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde",
                                          "uni_pc", "euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_samplers_run_and_save(host, tiny_model, conds, runs, cutting_threshold, sampler_name):
    positive, negative = conds
    model, counter = counted(tiny_model)
    seen = []

    def post_cfg(args):  # what CFG++ samplers and post-CFG nodes see
        seen.append((args["cond_denoised"], args["uncond_denoised"]))
        return args["denoised"]

    model.set_model_sampler_post_cfg_function(post_cfg)
    out = ksampler(host, patch(host, model, threshold=cutting_threshold), positive, negative,
                   sampler_name=sampler_name, batch=2, latent_image=latent(2))
    assert torch.isfinite(out).all()
    run = runs[-1]
    summary = run.summary()
    assert summary.calls == len(seen) == len(counter.calls)
    assert summary.uncond_skipped > 0
    assert counter.uncond_passes == summary.calls - summary.uncond_skipped
    for record, (cond, uncond) in zip(run.records, seen):
        assert uncond.abs().sum() > 0, "a skipped uncond must be an estimate, never zeros"
        for b, action in enumerate(record.actions):
            if action.name == "COND_ONLY":
                assert torch.equal(uncond[b], cond[b])


def test_batch_of_two_gives_each_sample_its_own_result(host, tiny_model, runs, cutting_threshold):
    positive, negative = make_conds()
    model = patch(host, tiny_model, threshold=cutting_threshold)
    pair = ksampler(host, model, positive, negative, batch=2, latent_image=latent(2))
    single = ksampler(host, model, positive, negative, batch=1, latent_image=latent(1))
    assert torch.allclose(pair[:1], single, atol=1e-4)
    assert runs[-2].batch_size == 2 and runs[-1].batch_size == 1


def test_denoise_half_and_ksampler_advanced_bounds(host, tiny_model, conds, runs, cutting_threshold):
    positive, negative = conds
    model = patch(host, tiny_model, threshold=cutting_threshold)
    out = ksampler(host, model, positive, negative, denoise=0.5)
    assert torch.isfinite(out).all() and runs[-1].total_steps == STEPS
    advanced = host.nodes.common_ksampler(model, 3, STEPS, 6.0, "euler", "normal", positive, negative, latent(),
                                          start_step=2, last_step=8, force_full_denoise=True)[0]["samples"]
    assert torch.isfinite(advanced).all()
    assert runs[-1].total_steps == 6 and runs[-1].summary().calls == 6


def test_same_patched_model_twice_and_in_two_samplers(host, tiny_model, conds, runs, cutting_threshold):
    positive, negative = conds
    model = patch(host, tiny_model, threshold=cutting_threshold)
    first = ksampler(host, model, positive, negative)
    first_record = [r.actions for r in runs[-1].records]
    other = ksampler(host, model, positive, negative, sampler_name="dpmpp_2m", steps=12)
    second = ksampler(host, model, positive, negative)
    assert torch.equal(first, second), "state must be reset between runs"
    assert [r.actions for r in runs[-1].records] == first_record
    assert runs[-2].total_steps == 12 and torch.isfinite(other).all()


def test_chained_calc_function_is_called_for_every_evaluation(host, tiny_model, conds, runs, cutting_threshold):
    import comfy.samplers

    positive, negative = conds
    chained_calls = []

    def earlier_function(args):  # e.g. SkipLayerGuidanceDiTSimple's slot function
        chained_calls.append([c is not None for c in args["conds"]])
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])

    base = tiny_model.clone()
    base.set_model_sampler_calc_cond_batch_function(earlier_function)
    reference = ksampler(host, base, positive, negative)
    chained_calls.clear()
    same = ksampler(host, patch(host, base, threshold=1.0001), positive, negative)
    assert torch.equal(reference, same) and len(chained_calls) == STEPS
    chained_calls.clear()
    ksampler(host, patch(host, base, threshold=cutting_threshold), positive, negative)
    summary = runs[-1].summary()
    assert len(chained_calls) == STEPS and summary.uncond_skipped > 0
    assert sum(1 for c in chained_calls if c == [True, False]) == summary.uncond_skipped


def test_post_cfg_node_after_the_patch(host, tiny_model, conds, cutting_threshold):
    positive, negative = conds
    def rescale(model):
        return host.call("RescaleCFG", model, 0.7)[0]

    stock = ksampler(host, rescale(tiny_model), positive, negative)
    parity = ksampler(host, rescale(patch(host, tiny_model, threshold=1.0001)), positive, negative)
    assert (parity - stock).abs().max().item() == 0.0
    cut = ksampler(host, rescale(patch(host, tiny_model, threshold=cutting_threshold)), positive, negative)
    assert torch.isfinite(cut).all()


def test_cfg_one_passes_through_untouched(host, tiny_model, conds, runs, caplog):
    positive, negative = conds
    model, counter = counted(tiny_model)
    stock = ksampler(host, tiny_model, positive, negative, cfg=1.0)
    with caplog.at_level(logging.INFO, logger="fastguidance"):
        patched = ksampler(host, patch(host, model, threshold=0.0), positive, negative, cfg=1.0)
    assert torch.equal(stock, patched)
    assert runs[-1].summary().calls == 0 and counter.uncond_passes == 0
    assert "cfg is 1" in caplog.text


def test_guider_that_bypasses_the_slot_is_reported_once(host, tiny_model, conds, runs, caplog):
    positive, negative = conds
    guider = host.call("PerpNegGuider", patch(host, tiny_model, threshold=0.0), positive, negative, negative, 6.0, 1.0)[0]
    with caplog.at_level(logging.INFO, logger="fastguidance"):
        custom_sample(host, guider)
    messages = [r.message for r in caplog.records if "never called the guidance engine" in r.message]
    assert len(messages) == 1 and "Guider_PerpNeg" in messages[0]


def test_two_patches_share_one_engine(host, tiny_model, conds, runs, cutting_threshold):
    positive, negative = conds
    model, counter = counted(tiny_model)
    twice = patch(host, patch(host, model, threshold=1.0001), threshold=cutting_threshold)
    engine_patch = sys.modules[host.pack.__name__ + ".nodes.engine_patch"]
    config = twice.model_options["transformer_options"][engine_patch.ENGINE_KEY]
    assert len(config.policies) == 2 and config.chained is None
    ksampler(host, twice, positive, negative)
    assert len(counter.calls) == STEPS and runs[-1].summary().uncond_skipped > 0


def test_validate_inputs_names_the_input(host):
    node = host.nodes.NODE_CLASS_MAPPINGS["FastGuidance_AdaptiveGuidance"]
    assert node.validate_inputs(threshold=0.991, start_percent=0.0, end_percent=1.0, after_cutoff="cond_only") is True
    message = node.validate_inputs(threshold=0.991, start_percent=0.9, end_percent=0.1, after_cutoff="cond_only")
    assert isinstance(message, str) and "start_percent" in message
    assert "threshold" in node.validate_inputs(threshold=2.0)


def test_denoised_cosine_is_measured_on_the_hosts_predictions(host, tiny_model, conds, runs):
    """cosine_space=denoised: γ = cos(c, u) of the denoised predictions the host's sampling function sees."""
    positive, negative = conds
    seen = []

    def post_cfg(args):
        c, u = args["cond_denoised"].flatten(1).float(), args["uncond_denoised"].flatten(1).float()
        seen.append(float(torch.nn.functional.cosine_similarity(c, u)[0]))
        return args["denoised"]

    model = patch(host, tiny_model, threshold=1.0001, cosine_space="denoised").clone()
    model.set_model_sampler_post_cfg_function(post_cfg)
    plain = ksampler(host, patch(host, tiny_model, threshold=1.0001), positive, negative)
    assert (ksampler(host, model, positive, negative) - plain).abs().max().item() == 0.0  # never cuts: plain CFG
    denoised_space, noise_space = runs[-1], runs[-2]
    assert denoised_space.policies[0].cosine_space == "denoised" and noise_space.policies[0].cosine_space == "noise"
    denoised_space.finish()
    noise_space.finish()
    assert [record.cosine[0] for record in denoised_space.records] == pytest.approx(seen, abs=1e-5)
    assert [record.cosine[0] for record in noise_space.records] != pytest.approx(seen, abs=1e-3)


def test_cosine_space_and_convergence_are_optional_and_checked(host, tiny_model, conds, runs):
    """A prompt saved before these inputs existed runs the rule it was saved with, the paper's (old API prompts
    are also posted to a real server in test_server.py)."""
    node = host.nodes.NODE_CLASS_MAPPINGS["FastGuidance_AdaptiveGuidance"]
    assert node.validate_inputs(threshold=0.991, start_percent=0.0, end_percent=1.0, after_cutoff="cond_only") is True
    assert "cosine_space" in node.validate_inputs(cosine_space="latent")
    assert "convergence" in node.validate_inputs(convergence=1.5)
    patched = host.node("FastGuidance_AdaptiveGuidance").execute(tiny_model, 1.0001, 0.0, 1.0, "cond_only")[0]
    ksampler(host, patched, *conds)
    policy = runs[-1].policies[0]
    assert (policy.cosine_space, policy.convergence) == (PAPER_RULE["cosine_space"], PAPER_RULE["convergence"])


def test_two_adaptive_guidance_nodes_with_different_cosine_spaces_are_refused(host, tiny_model):
    first = patch(host, tiny_model, cosine_space="noise")
    with pytest.raises(ValueError, match="same cosine_space on every Adaptive Guidance node"):
        patch(host, first, cosine_space="denoised")


# --------------------------------------------------------------------------------------------------
# The first step, on a tiny model of each sampling type


@pytest.fixture(scope="module", params=["eps", "v_prediction", "flow", "flux"])
def typed_model(request, host):
    """(sampling type, model, positive, negative, latent channels): the tiny UNet predicting eps (σ_max ≈ 14.6),
    v (same schedule) or flow (σ from 1), and the tiny Flux DiT (flow, σ from 1); conditionings where the
    prompt matters (host_models)."""
    kind = request.param
    positive, negative = make_conds()
    if kind == "flux":
        model, channels = host_models.patcher(host_models.tiny_flux_model(seed=0)), 16
        pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
        positive = [[positive[0][0][:, :16], {"pooled_output": pooled[:1]}]]
        negative = [[negative[0][0][:, :16], {"pooled_output": pooled[1:]}]]
    else:
        model, channels = host_models.patcher(host_models.tiny_model(seed=0, sampling=kind)), 4
    sampling = model.get_model_object("model_sampling")
    expected = {"eps": ("EPS", 14.6146), "v_prediction": ("V_PREDICTION", 14.6146), "flow": ("FLOW", 1.0),
                "flux": ("FLUX", 1.0)}[kind]
    assert (model.model.model_type.name, round(float(sampling.sigma_max), 4)) == expected
    return kind, model, positive, negative, channels


def sample_typed(host, typed_model, patched):
    _, _, positive, negative, channels = typed_model
    return ksampler(host, patched, positive, negative, steps=STEPS, batch=2, latent_image=latent(2, channels=channels))


def test_the_defaults_never_cut_guidance_at_the_first_step(host, typed_model, runs):
    """At the node's defaults the first call and the next are guided for every sample, and no advice says otherwise."""
    defaults = node_defaults(host, "FastGuidance_AdaptiveGuidance")
    sample_typed(host, typed_model, host.node("FastGuidance_AdaptiveGuidance").execute(typed_model[1], **defaults)[0])
    run = runs[-1]
    policy = run.policies[0]
    assert {name: getattr(policy, name) for name in defaults} == defaults
    assert run.batch_size == 2 and len(run.records) == STEPS
    assert [[action.name for action in record.actions] for record in run.records[:2]] == [["FULL", "FULL"]] * 2, \
        [record.cosine for record in run.records[:3]]
    assert not [message for message in run.advice() if "first step" in message]


#: whether the paper's rule cuts at the first step on each tiny model. Measured: at σ_max the noise directions
#: x − prediction of the v-prediction UNet and of the Flux DiT are nearly parallel (cosine 0.999999 and 0.9998,
#: above 0.991), those of the eps and flow UNets are not (about 0.68: with random weights their outputs are far
#: from the noise a trained model predicts).
PAPER_RULE_CUTS_AT_THE_FIRST_STEP = {"eps": False, "v_prediction": True, "flow": False, "flux": True}


def test_the_papers_rule_says_in_the_log_when_it_cut_at_the_first_step(host, typed_model, runs, caplog):
    kind = typed_model[0]
    paper = pack_module(host, "fastguidance.adaptive_guidance").PAPER_SETTINGS
    assert paper == {"threshold": 0.991, **PAPER_RULE}
    with caplog.at_level(logging.WARNING, logger="fastguidance"):
        sample_typed(host, typed_model, patch(host, typed_model[1], **paper))
    run = runs[-1]
    assert [action.name for action in run.records[0].actions] == ["FULL", "FULL"]  # nothing measured before it
    cut = [sample for sample, action in enumerate(run.records[1].actions) if action.name != "FULL"]
    first_cosines = run.records[0].cosine
    assert bool(cut) == PAPER_RULE_CUTS_AT_THE_FIRST_STEP[kind], first_cosines
    logged = [record.getMessage() for record in caplog.records if "cut guidance at the first step" in record.getMessage()]
    if cut:
        assert all(first_cosines[sample] >= paper["threshold"] for sample in cut)
        assert len(logged) == 1 and f"for {len(cut)} of 2 image(s)" in logged[0], logged
    else:
        assert not logged, logged
