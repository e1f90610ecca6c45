"""FastGuidance Tune and Load FastGuidance Preset inside the real host, on the tiny SD1.5 model."""

from __future__ import annotations

import pytest
import torch

import host_models
from conftest import counted, ksampler, latent, make_conds, pack_module

STEPS = 6
SIZE = 16  # latents of at least 11×11: SSIM's window
SEED = 3
CFG = 6.0
TARGET = 0.95
PRESET = "tuned.safetensors"


def evaluations_per_image(counter) -> int:
    """Model evaluations of a batch-1 run: every conditioning in every forward pass."""
    return sum(len(call) for call in counter.calls)


def sample(host, model, steps=STEPS):
    positive, negative = make_conds()
    return ksampler(host, model, positive, negative, cfg=CFG, steps=steps, seed=SEED, latent_image=latent(1, SIZE))


def run_tune(host, model, filename="tuned", target=TARGET, overwrite=False, **optional):
    positive, negative = make_conds()
    return host.node("FastGuidance_Tune").execute(model, positive, negative, latent(1, SIZE), SEED, "euler", "normal",
                                                  STEPS, CFG, target, True, True, filename, overwrite, **optional)


def load_preset(host, model, preset=PRESET, allow_other_model=False, allow_other_schedule=False):
    return host.node("FastGuidance_LoadPreset").execute(model, preset, allow_other_model, allow_other_schedule)


@pytest.fixture(scope="module")
def presets(host, tmp_path_factory):
    """An empty models/fastguidance_presets for this module (the host's registry entry restored after)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("fastguidance_presets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "fastguidance_presets", ([str(folder)], {".safetensors"}))
        patch.setattr(folder_paths, "filename_list_cache", {})
        yield folder


@pytest.fixture(scope="module")
def tuned(host, tiny_model, presets):
    """One Tune run on the tiny model (about ten samplings of six steps): its outputs and its preset."""
    model, text, chart = run_tune(host, tiny_model)[:3]
    metadata = pack_module(host, "fastguidance.tune").load_preset(presets / PRESET)
    return model, text, chart, metadata


def test_tuned_model_meets_the_target_it_reports_with_the_evaluations_it_reports(host, tiny_model, tuned):
    model, text, chart, metadata = tuned
    assert metadata["method"] in ("ag", "compg"), text  # this model has a setting that keeps 0.95
    assert "chosen: " + metadata["method"] in text
    stock_model, stock_counter = counted(tiny_model)
    stock = sample(host, stock_model)
    tuned_model, tuned_counter = counted(model)
    out = sample(host, tuned_model)
    # plain CFG: two conditionings per call, one call per step for euler (counted, as the node counts)
    assert metadata["cfg_evaluations"] == evaluations_per_image(stock_counter) == 2 * STEPS
    assert evaluations_per_image(tuned_counter) == metadata["evaluations"] < metadata["cfg_evaluations"]
    fidelity = pack_module(host, "fastguidance.tune").fidelity(out, stock)[0]
    assert fidelity >= TARGET
    assert fidelity == pytest.approx(metadata["ssim_min"], abs=1e-6)  # the trial was this very run
    assert metadata["model_fingerprint"] == pack_module(host, "nodes.model_identity").model_fingerprint(tiny_model)
    assert (metadata["sampler"], metadata["scheduler"], metadata["steps"], metadata["cfg"]) == ("euler", "normal", STEPS, CFG)
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.dtype == torch.float32
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0 and float(chart.std()) > 0.01


def test_the_tune_node_leaves_the_input_model_unpatched(host, tiny_model, tuned):
    assert "fastguidance" not in tiny_model.model_options.get("transformer_options", {})
    assert "fastguidance" in tuned[0].model_options["transformer_options"]


def test_an_existing_preset_is_refused_before_sampling(host, tiny_model, tuned):
    model, counter = counted(tiny_model)
    with pytest.raises(Exception, match=r"tuned\.safetensors already exists.*overwrite"):
        run_tune(host, model)
    assert counter.calls == []


def test_load_preset_gives_the_tuned_result(host, tiny_model, tuned, runs):
    model, summary = load_preset(host, tiny_model)[:2]
    assert torch.equal(sample(host, model), sample(host, tuned[0]))
    assert tuned[3]["method"] in summary and PRESET in summary
    assert runs[-1].summary().evaluations == tuned[3]["evaluations"]


def test_a_preset_for_another_model_is_refused_by_name(host, tuned):
    other = host_models.patcher(host_models.tiny_model(seed=1))
    with pytest.raises(Exception, match=r"preset = 'tuned\.safetensors'.*tuned for model .*allow_other_model"):
        load_preset(host, other)
    allowed = load_preset(host, other, allow_other_model=True)[0]
    assert torch.isfinite(sample(host, allowed)).all()


def test_a_run_with_another_step_count_is_refused_unless_allowed(host, tiny_model, tuned):
    model = load_preset(host, tiny_model)[0]
    with pytest.raises(Exception, match=rf"steps = {STEPS + 2}.*{PRESET}.*{STEPS} steps.*allow_other_schedule"):
        sample(host, model, steps=STEPS + 2)
    allowed = load_preset(host, tiny_model, allow_other_schedule=True)[0]
    assert torch.isfinite(sample(host, allowed, steps=STEPS + 2)).all()


def test_a_preset_without_a_method_gives_exactly_the_stock_result(host, tiny_model, presets):
    tune = pack_module(host, "fastguidance.tune")
    fingerprint = pack_module(host, "nodes.model_identity").model_fingerprint(tiny_model)
    result = tune.TuneResult(TARGET, 2.0 * STEPS, {}, [], {}, 1)  # nothing met the target
    made_for = {"model_fingerprint": fingerprint, "sampler": "euler", "scheduler": "normal", "steps": STEPS, "cfg": CFG}
    tune.save_preset(presets / "plain.safetensors", result, made_for)
    model, summary = load_preset(host, tiny_model, "plain.safetensors")[:2]
    assert model is tiny_model and "plain CFG" in summary
    assert (sample(host, model) - sample(host, tiny_model)).abs().max().item() == 0.0


def test_validate_inputs_names_the_input_value_and_fix(host):
    node = host.nodes.NODE_CLASS_MAPPINGS["FastGuidance_Tune"]
    assert node.validate_inputs(target=0.95, steps=20, cfg=7.0, filename="ok") is True
    for inputs, words in [({"target": 1.5}, "target = 1.5"), ({"target": "0.9"}, "target = '0.9'"),
                          ({"steps": 1}, "steps = 1"), ({"steps": 2.5}, "steps = 2.5"), ({"cfg": 1.0}, "cfg = 1.0"),
                          ({"cfg": -1.0}, "cfg = -1.0"), ({"filename": "a/b"}, "filename = 'a/b'"),
                          ({"tune_ag": False, "tune_compg": False, "linear_ag_calibration": "none"}, "tune_ag = False"),
                          ({"linear_ag_calibration": "missing.safetensors"}, "linear_ag_calibration = 'missing")]:
        message = node.validate_inputs(**inputs)
        assert isinstance(message, str) and words in message, (inputs, message)
