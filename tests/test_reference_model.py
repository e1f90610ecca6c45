"""The shipped reference model and classifier: they load, sample, judge, and CFG matters."""


import pytest
import torch

from fastguidance.errors import TensorFileError
from fastguidance.policies import AdaptiveGuidance
from fastguidance.policies.adaptive import MAX_THRESHOLD
from fastguidance.reference.classifier import adherence, attribute_accuracy
from fastguidance.reference.model import to_image
from fastguidance.reference.scenes import make_batch
from fastguidance.reference.weights import (CLASSIFIER_PATH, MODEL_PATH, load_classifier, load_model,
                                            save_classifier)
from fastguidance.sampling import sample
from fastguidance.schedules import make_sigmas


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_PATH)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(CLASSIFIER_PATH)


@pytest.fixture(scope="module")
def prompts():
    batch = make_batch(24, seed=123, held_out=False)
    return batch.scenes


def generate(model, scenes, scale, steps=12, policies=(), seed=0):
    noise = torch.randn(len(scenes), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cond, uncond = model.encode([s.prompt for s in scenes]), model.encode([""])
        result = sample(model, noise, make_sigmas(model.schedule, "karras", steps), cond, uncond, scale, "dpmpp_2m",
                        policies, percent_to_sigma=model.schedule.percent_to_sigma)
    return to_image(result.latent), result


def test_weights_carry_their_metadata(model, classifier):
    assert model.metadata["format"] == "fastguidance.reference_model"
    assert model.metadata["parameters"] == model.count_parameters()
    assert model.metadata["training"]["steps"] > 0
    assert classifier.metadata["training"]["test_accuracy"] >= 0.95


def test_model_output_has_the_host_conditioning_shape(model):
    text = model.encode(["a red circle left of a small blue square", ""])
    assert text.tokens.shape == (2, 16, model.config.text_dim)
    assert text.pooled.shape == (2, model.config.text_dim)


def test_model_samples_images(model, prompts):
    images, _ = generate(model, prompts[:4], scale=5.0, steps=6)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    assert images.std() > 0.05  # not a flat image


def test_classifier_is_accurate_on_rendered_scenes(classifier):
    test = make_batch(400, seed=99_991, held_out=None)
    assert attribute_accuracy(classifier, test.images, test.scenes) >= 0.95
    assert adherence(classifier, test.images, test.scenes).mean() >= 0.95


def test_cfg_beats_no_guidance_on_adherence(model, classifier, prompts):
    unguided, _ = generate(model, prompts, scale=1.0)
    guided, _ = generate(model, prompts, scale=5.0)
    margin = adherence(classifier, guided, prompts).mean() - adherence(classifier, unguided, prompts).mean()
    # The 4,000-step model: +8.7 points on these 24 prompts, +10.7 on the benchmark's 96 (the issue's
    # bar for judging methods is 20, not reached: see README). Here: CFG must clearly matter.
    assert margin >= 0.06, f"CFG adds only {margin:.3f} adherence on the reference model"


def test_adaptive_guidance_skips_evaluations_on_the_reference_model(model, prompts):
    _, result = generate(model, prompts, scale=5.0, policies=[AdaptiveGuidance(threshold=0.991)])
    per_image = result.run.evaluations_per_sample()
    assert sum(per_image) / len(per_image) < 2 * 12


@pytest.mark.xfail(strict=True, reason="on the reference model the noise-space cosine starts above 0.9999 and falls "
                                       "during sampling (README, Measured results), the opposite of what Adaptive "
                                       "Guidance needs; issue 3 asks for a model on which it rises")
def test_cosine_rises_during_sampling_on_the_reference_model(model, prompts):
    """AG's premise (paper §3): γ = cos(x − c, x − u) rises towards 1, so a threshold cuts late steps."""
    _, result = generate(model, prompts, scale=5.0, policies=[AdaptiveGuidance(threshold=MAX_THRESHOLD)])
    cosines = [sum(v for v in record.cosine if v is not None) / len(prompts) for record in result.run.records]
    assert cosines[-1] > cosines[0] and cosines[0] < 0.991, cosines


def test_corrupt_and_foreign_files_are_refused(tmp_path, classifier):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(TensorFileError, match="not a readable safetensors"):
        load_model(broken)
    with pytest.raises(TensorFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    foreign = tmp_path / "classifier.safetensors"
    save_classifier(classifier, {"note": "test"}, foreign)
    with pytest.raises(TensorFileError, match="fastguidance.adherence_classifier"):
        load_model(foreign)
    with pytest.raises(FileExistsError):
        save_classifier(classifier, {}, foreign)
