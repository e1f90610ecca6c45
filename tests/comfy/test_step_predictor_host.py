"""AdaDiff's nodes inside the real host: predict steps and sigmas, train on a tiny model, refusals."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import FakeClip, empty_pack_folder, make_conds


@pytest.fixture()
def predictor_folder(host, tmp_path, monkeypatch):
    return empty_pack_folder(tmp_path, monkeypatch, "fastguidance_step_predictors")


def core(host, name):
    return sys.modules[f"{host.pack.__name__}.fastguidance.{name}"]


def biased_predictor(host, folder, width=64, favourite=2, options=(10, 20, 30, 40), name="p.safetensors"):
    """A predictor whose output layer always prefers option ``favourite``."""
    module = core(host, "step_predictor")
    predictor = module.StepPredictor(width, options, hidden=8)
    with torch.no_grad():
        predictor.network[-1].bias[favourite] = 5.0
    module.save_step_predictor(predictor, folder / name, {"sampler": "euler"})
    return name


def test_predictor_gives_steps_and_matching_sigmas(host, tiny_model, predictor_folder):
    name = biased_predictor(host, predictor_folder)
    positive, _ = make_conds()
    out = host.node("FastGuidance_StepPredictor").execute(positive, name, tiny_model, "karras")
    steps, sigmas = out[0], out[1]
    assert steps == 30 and sigmas.shape == (31,) and float(sigmas[-1]) == 0.0
    assert out.ui == {"text": ["30 steps"]}


def test_batched_conditioning_takes_the_largest_choice(host, tiny_model, predictor_folder):
    name = biased_predictor(host, predictor_folder)
    module = core(host, "step_predictor")
    predictor, _ = module.load_step_predictor(predictor_folder / name)
    with torch.no_grad():  # make the choice depend on the first feature: positive → 40, negative → 10
        predictor.network[-1].bias.zero_()
    # two prompts in one CONDITIONING: both are read; the node returns the largest choice
    positive = [[torch.cat([make_conds()[0][0][0], make_conds(seed=5)[0][0][0]]), {}]]
    out = host.node("FastGuidance_StepPredictor").execute(positive, name, tiny_model, "normal")
    assert out[0] in (10, 20, 30, 40) and out.ui["text"][0].startswith(f"{out[0]} steps")


def test_another_conditioning_width_is_refused(host, tiny_model, predictor_folder):
    name = biased_predictor(host, predictor_folder, width=768)
    positive, _ = make_conds()
    with pytest.raises(Exception, match="reads 768 features.*another conditioning width"):
        host.node("FastGuidance_StepPredictor").execute(positive, name, tiny_model, "karras")


def test_missing_predictor_is_refused(host, tiny_model, predictor_folder):
    positive, _ = make_conds()
    with pytest.raises(Exception, match="predictor.*Train Step Predictor"):
        host.node("FastGuidance_StepPredictor").execute(positive, "missing.safetensors", tiny_model, "karras")


def test_training_on_a_tiny_model_writes_a_predictor_and_a_curve(host, tiny_model, predictor_folder):
    node = host.node("FastGuidance_TrainStepPredictor", "9")
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = node.execute(tiny_model, FakeClip(), "a red cube\nthree blue spheres on a table", "", "euler", "normal",
                           5.0, "2, 4", 0.3, 3, 2, 96, 96, 0, "tiny", False)
    curve, report = out[0], out[1]
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert "tiny.safetensors" in report and "mean" in report
    predictor, metadata = core(host, "step_predictor").load_step_predictor(predictor_folder / "tiny.safetensors")
    assert predictor.options == (2, 4) and metadata["iterations"] == 3 and len(metadata["reward_curve"]) == 3
    assert metadata["quality"] == "SSIM of latents" and metadata["conditioning_width"] == 64
    with pytest.raises(Exception, match="filename.*already exists"):
        node.execute(tiny_model, FakeClip(), "a red cube", "", "euler", "normal", 5.0, "2, 4", 0.3, 1, 1, 96, 96, 0,
                     "tiny", False)
    # the trained file drives the predictor node
    steps = host.node("FastGuidance_StepPredictor").execute(FakeClip().encode_from_tokens_scheduled("a red cube"),
                                                            "tiny.safetensors", tiny_model, "normal")[0]
    assert steps in (2, 4)


def test_trainer_validates_its_text_inputs(host):
    node = host.node("FastGuidance_TrainStepPredictor")
    assert "step_options" in node.validate_inputs(step_options="10")
    assert "filename" in node.validate_inputs(filename="../x")
    assert "prompts" in node.validate_inputs(prompts="  \n ")
    assert node.validate_inputs(step_options="10, 20", filename="ok", prompts="a cat") is True


def test_a_predictor_of_another_model_is_refused_unless_allowed(host, tiny_model, predictor_folder):
    module = core(host, "step_predictor")
    predictor = module.StepPredictor(64, (10, 20), hidden=8)
    module.save_step_predictor(predictor, predictor_folder / "other.safetensors",
                               {"model_fingerprint": "0123456789abcdef", "architecture": "SDXL"})
    positive, _ = make_conds()
    node = host.node("FastGuidance_StepPredictor")
    with pytest.raises(Exception, match="trained on another model \\(SDXL.*allow_other_model"):
        node.execute(positive, "other.safetensors", tiny_model, "karras", False)
    assert node.execute(positive, "other.safetensors", tiny_model, "karras", True)[0] in (10, 20)
