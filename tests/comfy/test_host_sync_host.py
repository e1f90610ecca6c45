"""Device↔host traffic of the pack's glue in the real host, per model call (issue 20).

The CI test (``tests/test_host_sync.py``) counts the core's per-call path; here the same counter
(:mod:`host_traffic`) runs inside ComfyUI's KSampler and counts only the pack's code of each call: the
engine's ``sampler_calc_cond_batch_function`` without the host's evaluations, and, inside those, the
adapters' ``APPLY_MODEL`` wrapper without the model and their attach-point patch. The host's own work
(conditioning, memory estimates, the UNet) is not under test and not counted.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ksampler, make_conds, pack_module
from host_traffic import TrafficCounter, count_host_reads, summary

STEPS = 6


@pytest.fixture()
def traffic(host, monkeypatch):
    """Counts the pack's per-call code in every model call of the models patched during the test."""
    engine_patch = pack_module(host, "nodes.engine_patch")
    adapter_patch = pack_module(host, "nodes.adapter_patch")
    counter = TrafficCounter()
    count_host_reads(counter, monkeypatch)
    slot, evaluate, evaluate_cond_only = (engine_patch.engine_calc_cond_batch, engine_patch._evaluate,
                                          engine_patch._evaluate_cond_only)
    apply_model, attention_patch = adapter_patch.adapter_apply_model, adapter_patch.AttentionOutputPatch.__call__

    def counted_slot(args):
        with counter.call():
            return slot(args)

    def paused(function):
        def run(*args, **kwargs):
            with counter.paused():
                return function(*args, **kwargs)
        return run

    def counted_apply_model(executor, *args, **kwargs):
        with counter.counting():
            return apply_model(paused(executor), *args, **kwargs)

    def counted_attention_patch(self, n, extra_options):
        with counter.counting():
            return attention_patch(self, n, extra_options)

    # patched before any model is patched: install_policy and attach store these functions
    monkeypatch.setattr(engine_patch, "engine_calc_cond_batch", counted_slot)
    monkeypatch.setattr(engine_patch, "_evaluate", paused(evaluate))
    monkeypatch.setattr(engine_patch, "_evaluate_cond_only", paused(evaluate_cond_only))
    monkeypatch.setattr(adapter_patch, "adapter_apply_model", counted_apply_model)
    monkeypatch.setattr(adapter_patch.AttentionOutputPatch, "__call__", counted_attention_patch)
    return counter


def random_adapters(host, model):
    adapters_core = pack_module(host, "fastguidance.guidance_adapters.adapters")
    adapter_patch = pack_module(host, "nodes.adapter_patch")
    torch.manual_seed(0)
    spec = adapters_core.AdapterSpec(adapter_patch.attach_points(model), text_dim=64, pooled_dim=0, hidden=16,
                                     embed_dim=32)
    return adapters_core.GuidanceAdapters(spec).eval().requires_grad_(False)


def methods(host, model):
    adaptive = pack_module(host, "fastguidance.adaptive_guidance")
    compress = pack_module(host, "fastguidance.compress_guidance")
    engine_patch = pack_module(host, "nodes.engine_patch")
    adapter_patch = pack_module(host, "nodes.adapter_patch")

    def patched(*items):
        result = model
        for policy in items:
            result = engine_patch.install_policy(result, policy, None)
        return result

    ag = adaptive.AdaptiveGuidance(threshold=0.95, cosine_space="noise", convergence=1.0)
    return {
        "ag": (patched(ag), 1),
        "ag reuse": (patched(adaptive.AdaptiveGuidance(threshold=0.95, cosine_space="noise", convergence=1.0,
                                                       after_cutoff="reuse")), 1),
        "compg compress": (patched(compress.CompressGuidance(compression=3.0)), 1),
        "ag + compg reuse": (patched(ag, compress.CompressGuidance(compression=2.0, mode="reuse")), 1),
        "adapters strength 0.5": (adapter_patch.install_adapters(model, random_adapters(host, model), 5.0, 0.5, None,
                                                                 None), 0),
        "adapters strength 1, sampler cfg": (adapter_patch.install_adapters(model, random_adapters(host, model), None,
                                                                            1.0, None, None), 0),
    }


@pytest.mark.parametrize("method", ["ag", "ag reuse", "compg compress", "ag + compg reuse", "adapters strength 0.5",
                                    "adapters strength 1, sampler cfg"])
def test_the_packs_code_in_each_model_call_reads_at_most_the_documented_value(host, tiny_model, traffic, method):
    model, reads = methods(host, tiny_model)[method]
    positive, negative = make_conds(batch=1)
    result = ksampler(host, model, positive, negative, steps=STEPS, batch=2)
    assert torch.isfinite(result).all()
    calls = traffic.calls
    text = summary(calls)
    assert len(calls) == STEPS, text
    assert all(call.reads == reads for call in calls), text
    assert all(call.blocking_uploads == 0 and call.async_uploads == 0 for call in calls), text
    assert all(call.host_tensors == 0 for call in calls), text
