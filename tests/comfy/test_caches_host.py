"""FastGuidance beside the host's step caches and its other guidance nodes (issue 18 §3).

Counts are real model evaluations: a forward pre-hook on the first layer of the diffusion model fires
only when the model runs (EasyCache answers inside the model call, before that layer; LazyCache
before the engine). One "evaluation" is one batch evaluation: the rows of a forward pass over the
batch size (CFG spends 2 per step, cond-only 1), the unit of the engine's run summary.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from conftest import ksampler, latent, make_conds, node_defaults, pack_module
import host_models

STEPS = 10
AG, COMPG = "FastGuidance_AdaptiveGuidance", "FastGuidance_CompressGuidance"
CACHE_FIRST, METHOD_FIRST = "cache_first", "method_first"
ORDERS = (CACHE_FIRST, METHOD_FIRST)


@contextlib.contextmanager
def evaluations(module: torch.nn.Module, batch: int = 1):
    """Batch evaluations the model really runs inside the block (rows of ``module``'s inputs / batch)."""
    rows: list[int] = []

    def count(_module, args, kwargs):
        rows.append((args[0] if args else next(iter(kwargs.values()))).shape[0])

    handle = module.register_forward_pre_hook(count, with_kwargs=True)
    counted = type("Counted", (), {})()
    try:
        yield counted
    finally:
        handle.remove()
        counted.passes = len(rows)
        counted.evaluations = sum(rows) // batch


def first_layer(model) -> torch.nn.Module:
    """The first layer every forward pass of the tiny UNet or tiny Flux runs."""
    diffusion_model = model.model.diffusion_model
    return diffusion_model.img_in if hasattr(diffusion_model, "img_in") else diffusion_model.input_blocks[0][0]


def method(host, model, name: str):
    """``model`` patched by a FastGuidance method: AG with the paper's rule, AG or CompG at the node's defaults,
    or one of them at the setting that keeps plain CFG (``ag_off``: threshold above 1, ``compg_off``: compression 1)."""
    if name == "ag_paper":
        return host.node(AG).execute(model, 0.991, 0.0, 1.0, "cond_only", cosine_space="noise", convergence=1.0)[0]
    node_id = AG if name.startswith("ag") else COMPG
    settings = node_defaults(host, node_id)
    if name == "ag_off":
        settings["threshold"] = 1.0001
    elif name == "compg_off":
        settings["compression"], settings["guided_steps"] = 1.0, 0
    return host.node(node_id).execute(model, **settings)[0]


def easycache(host, model, start_percent=0.15):
    return host.call("EasyCache", model, 0.2, start_percent, 0.95, False)[0]


def lazycache(host, model):
    return host.call("LazyCache", model, 0.2, 0.15, 0.95, False)[0]


def chain(host, model, order: str, cache, method_name: str):
    """The cache node and the method node on one model, in the given order."""
    if order == CACHE_FIRST:
        return method(host, cache(host, model), method_name)
    return cache(host, method(host, model, method_name))


def is_full(record) -> bool:
    """The engine evaluated the uncond in this call (some sample's action was FULL)."""
    return any(action.name == "FULL" for action in record.actions)


def sample(host, model, conds, **kwargs):
    """KSampler on the tiny UNet (cfg 6, euler, 10 steps); returns (latent, evaluations the model ran)."""
    with evaluations(first_layer(model), kwargs.get("batch", 1)) as counted:
        out = ksampler(host, model, *conds, steps=STEPS, **kwargs)
    return out, counted.evaluations


# --------------------------------------------------------------------------------------------------
# EasyCache


@pytest.mark.parametrize("start_percent", [0.0, 0.15])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method_name", ["ag_paper", "ag", "compg"])
def test_easycache_beside_a_method_spends_fewer_evaluations_than_either_alone(host, tiny_model, conds, runs,
                                                                             method_name, order, start_percent):
    """The issue's case: EasyCache alone skipped 5 of 10 steps, 1 of 10 beside AG or CompG. Now the combined run
    spends fewer model evaluations than the better of the two alone, and its summary counts the real ones."""
    _, cache_alone = sample(host, easycache(host, tiny_model, start_percent), conds)
    _, method_alone = sample(host, method(host, tiny_model, method_name), conds)
    cache = lambda h, m: easycache(h, m, start_percent)  # noqa: E731
    _, combined = sample(host, chain(host, tiny_model, order, cache, method_name), conds)
    assert combined < min(cache_alone, method_alone), (combined, cache_alone, method_alone)
    summary = runs[-1].summary()
    assert summary.calls == STEPS and summary.cache_name == "EasyCache"
    assert summary.evaluations == combined
    assert summary.cached > 0 and summary.uncond_skipped > 0
    assert summary.evaluations + summary.cached + summary.uncond_skipped == 2 * STEPS
    assert [record.evaluations + record.cached for record in runs[-1].records] == \
        [2 if is_full(record) else 1 for record in runs[-1].records]


def test_the_log_line_and_the_page_message_name_what_easycache_answered(host, tiny_model, conds, runs, caplog):
    model = easycache(host, method(host, tiny_model, "ag"))
    with caplog.at_level(logging.INFO, logger="fastguidance"):
        _, counted = sample(host, model, conds)
    summary = runs[-1].summary()
    lines = [record.getMessage() for record in caplog.records if record.name == "fastguidance"]
    assert summary.text("FastGuidance [ag]") in lines
    assert f"EasyCache answered {summary.cached} more" in summary.text()
    assert f"({counted} of {2 * STEPS})" in summary.text()
    message = runs[-1].to_dict()
    assert message["summary"]["cached"] == summary.cached and message["summary"]["cache_name"] == "EasyCache"
    assert sum(record["cached"] for record in message["records"]) == summary.cached
    assert all(record["evaluations"] + record["cached"] in (1, 2) for record in message["records"])


@pytest.mark.parametrize("method_name", ["ag", "compg"])
def test_with_the_stock_batching_easycache_decides_on_the_uncond_and_skips_nothing_beside_a_method(
        host, tiny_model, conds, runs, monkeypatch, method_name):
    """The cause (COMFYUI.md §7): EasyCache decides on the first conditioning of its first call, which the host
    batches uncond first; calls that skip the uncond never contain it. Without the engine's one cond-first call
    EasyCache, from the first step on, answers nothing beside AG or CompG (the host's code is unchanged)."""
    _, cache_alone = sample(host, easycache(host, tiny_model, 0.0), conds)
    with monkeypatch.context() as patched:
        patched.setattr(pack_module(host, "nodes.engine_patch"), "_easycache_window", lambda *args: None)
        _, combined = sample(host, easycache(host, method(host, tiny_model, method_name), 0.0), conds)
    assert runs[-1].summary().cached == 0 and runs[-1].summary().uncond_skipped > 0
    _, fixed = sample(host, easycache(host, method(host, tiny_model, method_name), 0.0), conds)
    assert runs[-1].summary().cached > 0
    assert fixed < min(combined, cache_alone)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method_name", ["ag_off", "compg_off"])
def test_a_method_that_keeps_cfg_beside_easycache_is_exactly_easycache(host, tiny_model, conds, runs, method_name,
                                                                        order):
    alone, cache_alone = sample(host, easycache(host, tiny_model), conds)
    combined, counted = sample(host, chain(host, tiny_model, order, easycache, method_name), conds)
    assert (combined - alone).abs().max().item() == 0.0
    assert counted == cache_alone == runs[-1].summary().evaluations
    assert runs[-1].summary().uncond_skipped == 0 and runs[-1].summary().cached == 2 * STEPS - cache_alone


def test_easycache_and_a_method_on_a_batch_of_two(host, tiny_model, runs):
    import comfy_extras.nodes_easycache as host_easycache

    if not hasattr(host_easycache.EasyCacheHolder, "can_apply_cache_diff"):
        pytest.skip("0.3.64's EasyCache fails alone on a batch of 2: apply_cache_diff adds each conditioning's "
                    "cached difference to the whole batch (RuntimeError: size 4 against 2); 0.33 slices per conditioning")
    conds = make_conds(batch=2)
    _, cache_alone = sample(host, easycache(host, tiny_model), conds, batch=2)
    _, method_alone = sample(host, method(host, tiny_model, "ag_paper"), conds, batch=2)
    _, combined = sample(host, easycache(host, method(host, tiny_model, "ag_paper")), conds, batch=2)
    assert combined < min(cache_alone, method_alone)
    assert runs[-1].summary().evaluations == combined and runs[-1].batch_size == 2


# --------------------------------------------------------------------------------------------------
# LazyCache: it answers whole sampler calls before they reach the engine


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method_name", ["ag", "compg"])
def test_lazycache_beside_a_method_spends_fewer_evaluations_than_either_alone(host, tiny_model, conds, runs,
                                                                             method_name, order):
    _, cache_alone = sample(host, lazycache(host, tiny_model), conds)
    _, method_alone = sample(host, method(host, tiny_model, method_name), conds)
    _, combined = sample(host, chain(host, tiny_model, order, lazycache, method_name), conds)
    assert combined < min(cache_alone, method_alone), (combined, cache_alone, method_alone)
    summary = runs[-1].summary()
    assert summary.cache_name == "LazyCache" and summary.evaluations == combined
    assert summary.cache_calls == STEPS - summary.calls > 0 and summary.cfg_evaluations == 2 * STEPS
    assert summary.cached == 2 * summary.cache_calls


@pytest.mark.parametrize("order", ORDERS)
def test_a_method_that_keeps_cfg_beside_lazycache_is_exactly_lazycache(host, tiny_model, conds, runs, order):
    alone, cache_alone = sample(host, lazycache(host, tiny_model), conds)
    combined, counted = sample(host, chain(host, tiny_model, order, lazycache, "ag_off"), conds)
    assert (combined - alone).abs().max().item() == 0.0 and counted == cache_alone


def test_without_a_cache_nothing_is_counted_twice(host, tiny_model, conds, runs):
    """No wrapper beside the engine: the records are the plan (no counting wrappers are added)."""
    _, counted = sample(host, method(host, tiny_model, "ag"), conds)
    summary = runs[-1].summary()
    assert summary.evaluations == counted and summary.cached == 0 and summary.cache_name == ""


# --------------------------------------------------------------------------------------------------
# Skip Layer Guidance (tiny Flux DiT: two double blocks, one single block)

FLUX_STEPS = 6
SKIPPED_BLOCK = 1  # the double block SLG skips


@pytest.fixture(scope="module")
def flux(host):
    """(model, positive, negative) for the tiny Flux, the prompt mattering (as in the AG host tests)."""
    model = host_models.patcher(host_models.tiny_flux_model(seed=0))
    positive, negative = make_conds()
    pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
    return (model, [[positive[0][0][:, :16], {"pooled_output": pooled[:1]}]],
            [[negative[0][0][:, :16], {"pooled_output": pooled[1:]}]])


def sample_flux(host, flux, model):
    """KSampler (cfg 4, euler, simple) on the tiny Flux; returns (latent, evaluations the model ran, evaluations
    that ran the double block SLG skips)."""
    diffusion_model = flux[0].model.diffusion_model
    with evaluations(diffusion_model.img_in) as passes, evaluations(diffusion_model.double_blocks[SKIPPED_BLOCK]) as kept:
        out = ksampler(host, model, flux[1], flux[2], cfg=4.0, scheduler="simple", steps=FLUX_STEPS,
                       latent_image=latent(1, channels=16))
    return out, passes.evaluations, kept.evaluations


def slg_simple(host, model):
    return host.call("SkipLayerGuidanceDiTSimple", model, 0.0, 1.0, str(SKIPPED_BLOCK), "")[0]


def slg_dit(host, model):
    return host.call("SkipLayerGuidanceDiT", model, 3.0, 0.0, 1.0, str(SKIPPED_BLOCK), "", 0.0)[0]


def slg_sd3(host, model):
    return host.call("SkipLayerGuidanceSD3", model, str(SKIPPED_BLOCK), 3.0, 0.0, 1.0)[0]


SLG_NODES = {"SkipLayerGuidanceDiTSimple": slg_simple, "SkipLayerGuidanceDiT": slg_dit,
             "SkipLayerGuidanceSD3": slg_sd3}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("slg", SLG_NODES)
def test_skip_layer_guidance_with_a_method_that_keeps_cfg_is_exactly_skip_layer_guidance(host, flux, runs, slg, order):
    """SkipLayerGuidanceDiTSimple takes the engine's slot without chaining: applied after the FastGuidance node,
    the engine puts itself back in front for the run and runs it. The others add a post-CFG function."""
    model, apply = flux[0], SLG_NODES[slg]
    alone, passes_alone, _ = sample_flux(host, flux, apply(host, model))
    plain, _, _ = sample_flux(host, flux, model)
    patched = method(host, apply(host, model), "ag_off") if order == CACHE_FIRST else apply(host, method(host, model, "ag_off"))
    combined, passes, _ = sample_flux(host, flux, patched)
    assert (alone - plain).abs().max().item() > 0.0  # SLG changes the picture
    assert (combined - alone).abs().max().item() == 0.0
    assert passes == passes_alone and runs[-1].summary().calls == FLUX_STEPS


@pytest.mark.parametrize("order", ORDERS)
def test_skip_layer_guidance_simple_modifies_every_uncond_the_engine_evaluates(host, flux, runs, order):
    model = flux[0]
    patched = method(host, slg_simple(host, model), "ag_paper") if order == CACHE_FIRST \
        else slg_simple(host, method(host, model, "ag_paper"))
    _, passes, kept = sample_flux(host, flux, patched)
    records = runs[-1].records
    full = sum(1 for record in records if is_full(record))
    assert len(records) == FLUX_STEPS and 0 < full < FLUX_STEPS  # AG cut, SLG's uncond was evaluated before
    assert passes - kept == full  # every uncond pass skipped the block; SLG evaluates cond and uncond apart
    assert passes == FLUX_STEPS + full == runs[-1].summary().evaluations


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("slg", ["SkipLayerGuidanceDiT", "SkipLayerGuidanceSD3"])
def test_post_cfg_skip_layer_guidance_keeps_its_pass_beside_a_method(host, flux, runs, slg, order):
    model, apply = flux[0], SLG_NODES[slg]
    patched = method(host, apply(host, model), "ag_paper") if order == CACHE_FIRST \
        else apply(host, method(host, model, "ag_paper"))
    _, passes, kept = sample_flux(host, flux, patched)
    summary = runs[-1].summary()
    assert summary.uncond_skipped > 0
    assert passes - kept == FLUX_STEPS  # its extra cond pass with the block skipped, at every step of its window
    assert passes == summary.evaluations + FLUX_STEPS  # the engine's count is its own evaluations


# --------------------------------------------------------------------------------------------------
# The host's newer guidance nodes (0.33)


def host_node(host, node_id: str):
    if node_id not in host.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip(f"{node_id} is not in this host (added after 0.3.64)")
    return node_id


@pytest.mark.parametrize("order", ORDERS)
def test_cfg_override_window_passes_through_the_engine(host, tiny_model, conds, runs, order):
    """CFG Override sets cfg 1 in its window (here the second half): those calls have no uncond, so the engine
    leaves them alone; it decides on the others. With a method that keeps CFG it is exactly CFG Override alone."""
    node_id = host_node(host, "CFGOverride")
    override = lambda h, m: h.call(node_id, m, 1.0, 0.5, 1.0)[0]  # noqa: E731
    alone, counted_alone = sample(host, override(host, tiny_model), conds)
    kept, counted = sample(host, chain(host, tiny_model, order, override, "ag_off"), conds)
    assert (kept - alone).abs().max().item() == 0.0 and counted == counted_alone
    overridden = STEPS - runs[-1].summary().calls
    assert 0 < overridden < STEPS and counted_alone == 2 * STEPS - overridden
    _, counted = sample(host, chain(host, tiny_model, order, override, "ag"), conds)
    summary = runs[-1].summary()
    assert summary.calls == STEPS - overridden and summary.uncond_skipped > 0 and summary.cached == 0
    assert counted == summary.evaluations + overridden


def custom_sample(host, guider, steps=STEPS):
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps)
    return host.call("SamplerCustomAdvanced", host.call("RandomNoise", 3)[0], guider, host.call("KSamplerSelect", "euler")[0],
                     sigmas.cpu(), latent())[0]["samples"]


def test_dual_model_cfg_guider(host, tiny_model, conds, runs, caplog):
    """Without a negative model it is the stock CFGGuider, so the engine works; with one it evaluates the conds
    itself (its own calc_cond_batch calls), the engine is never called and says so, and the result is unchanged."""
    node_id = host_node(host, "DualModelGuider")
    positive, negative = conds
    patched = method(host, tiny_model, "ag")
    with evaluations(first_layer(tiny_model)) as counted:
        custom_sample(host, host.call(node_id, patched, positive, 6.0, None, negative)[0])
    assert runs[-1].summary().calls == STEPS and runs[-1].summary().uncond_skipped > 0
    assert counted.evaluations == runs[-1].summary().evaluations
    negative_model = host_models.patcher(host_models.tiny_model(seed=1))
    stock = custom_sample(host, host.call(node_id, tiny_model, positive, 6.0, negative_model, negative)[0])
    runs.clear()
    with caplog.at_level(logging.WARNING, logger="fastguidance"):
        dual = custom_sample(host, host.call(node_id, patched, positive, 6.0, negative_model, negative)[0])
    assert (dual - stock).abs().max().item() == 0.0
    assert "never called the guidance engine" in caplog.text and runs[-1].summary().calls == 0


@pytest.mark.parametrize("order", ORDERS)
def test_normalized_attention_guidance_needs_the_uncond_in_the_batch(host, tiny_model, conds, runs, order):
    """NAG (cfg 1, the uncond kept by disable_cfg1_optimization) pushes the cond's self-attention away from the
    uncond's in the same batch. With a method that keeps CFG: exactly NAG alone. A method that skips the uncond
    removes NAG from those calls (the README says so): the run is cond only there, and the picture changes."""
    node_id = host_node(host, "NAGuidance")
    nag = lambda h, m: h.call(node_id, m, 5.0, 0.5, 1.5)[0]  # noqa: E731
    alone, counted_alone = sample(host, nag(host, tiny_model), conds, cfg=1.0)
    plain, _ = sample(host, tiny_model, conds, cfg=1.0)
    kept, counted = sample(host, chain(host, tiny_model, order, nag, "ag_off"), conds, cfg=1.0)
    assert (alone - plain).abs().max().item() > 0.0 and counted_alone == 2 * STEPS
    assert (kept - alone).abs().max().item() == 0.0 and counted == counted_alone
    cut, counted = sample(host, chain(host, tiny_model, order, nag, "compg"), conds, cfg=1.0)
    summary = runs[-1].summary()
    assert summary.uncond_skipped > 0 and counted == summary.evaluations < counted_alone
    assert (cut - alone).abs().max().item() > 0.0
