"""The shipped reference model and classifier: they load, sample, judge, and CFG matters."""


import pytest
import torch

from fastguidance.errors import InvalidInputError, TensorFileError
from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.adaptive_guidance import MAX_THRESHOLD
from fastguidance.research.reference.classifier import adherence, attribute_accuracy
from fastguidance.research.reference.model import (CrossAttentionBlock, ModelConfig, ReferenceModel, TextConditioning,
                                                   coordinate_planes, to_image)
from fastguidance.research.reference.scenes import make_batch
from fastguidance.research.reference.train import _loss_weights, diffusion_loss, train_model
from fastguidance.research.reference.weights import (CLASSIFIER_PATH, FORMAT_VERSION, MODEL_FORMAT, MODEL_PATH,
                                                     load_classifier, load_model, save_classifier, save_model)
from fastguidance.tensorfile import load_tensor_file, save_tensor_file
from fastguidance.research.sampling import sample
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


@pytest.fixture(scope="module")
def many_prompts():
    """Enough prompts for adherence differences of a few points to be more than noise."""
    return make_batch(64, seed=123, held_out=False).scenes


@pytest.fixture(scope="module")
def cfg_images(model, many_prompts):
    return generate(model, many_prompts, scale=5.0)[0]


#: share of named positions the classifier finds in CFG images of the position prompts below
POSITION_ACCURACY = 0.7


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


def test_cfg_beats_no_guidance_on_adherence(model, classifier, many_prompts, cfg_images):
    unguided, _ = generate(model, many_prompts, scale=1.0)
    margin = adherence(classifier, cfg_images, many_prompts).mean() - adherence(classifier, unguided, many_prompts).mean()
    # The shipped model: +6.2 points on these 64 prompts at 12 steps, +15.5 on the benchmark's 96 at
    # 20 steps (the bar for judging methods is 20, not reached: see README). Here: CFG must
    # clearly matter.
    assert margin >= 0.04, f"CFG adds only {margin:.3f} adherence on the reference model"


@pytest.mark.xfail(strict=True, reason="the reference model ignores position words: 'on the left', 'at the top' and no "
                                       "position give the same pictures from the same noise (README, The reference model)")
def test_cfg_puts_shapes_where_the_prompt_says(model, classifier):
    """Named positions (chance level: 20%) should come out where the prompt puts them."""
    from fastguidance.research.reference.classifier import predict
    from fastguidance.research.reference.scenes import POSITIONS, parse_prompt

    prompts = [f"a large {colour} {shape} {where}" for where in POSITIONS
               for colour, shape in (("red", "circle"), ("blue", "square"))]
    images, _ = generate(model, [parse_prompt(p) for p in prompts], scale=5.0)
    predicted = predict(classifier, images)["position"]
    right = sum(got == parse_prompt(p).position for got, p in zip(predicted, prompts))
    assert right / len(prompts) >= POSITION_ACCURACY, list(zip(prompts, predicted))


def test_adaptive_guidance_in_denoised_space_keeps_cfg_adherence_on_the_reference_model(model, classifier,
                                                                                        many_prompts, cfg_images):
    """The issue's CI check: AG skips evaluations within a stated tolerance (2 points) of CFG's adherence.

    Measured on the shipped model: 19.6 of 24 evaluations per image at +0.1 points (bench, 20 steps:
    19% fewer at −1.2). The paper's noise-space cosine cuts at the first step there (next test).
    """
    images, result = generate(model, many_prompts, scale=5.0,
                              policies=[AdaptiveGuidance(threshold=0.9995, cosine_space="denoised")])
    per_image = result.run.evaluations_per_sample()
    assert sum(per_image) / len(per_image) <= 0.85 * 2 * 12
    cfg = adherence(classifier, cfg_images, many_prompts).mean()
    assert adherence(classifier, images, many_prompts).mean() >= cfg - 0.02


def test_adaptive_guidance_skips_evaluations_on_the_reference_model(model, prompts):
    _, result = generate(model, prompts, scale=5.0, policies=[AdaptiveGuidance(threshold=0.991, cosine_space="noise",
                                                                                    convergence=1.0)])
    per_image = result.run.evaluations_per_sample()
    assert sum(per_image) / len(per_image) < 2 * 12


def mean_cosines(model, prompts, cosine_space):
    _, result = generate(model, prompts, scale=5.0,
                         policies=[AdaptiveGuidance(threshold=MAX_THRESHOLD, cosine_space=cosine_space)])
    return [sum(v for v in record.cosine if v is not None) / len(prompts) for record in result.run.records]


@pytest.mark.xfail(strict=True, reason="in noise space the first-step cosine is bounded near 1 (≥ 0.9906 for any two "
                                       "pictures in [-1, 1] at σ = 14.6: README, Limits); on the reference model it "
                                       "starts above 0.9999 and falls during sampling, so the premise does not hold")
def test_cosine_rises_during_sampling_on_the_reference_model(model, prompts):
    """AG's premise (paper §3): γ = cos(x − c, x − u) rises towards 1, so a threshold cuts late steps."""
    cosines = mean_cosines(model, prompts, "noise")
    assert cosines[-1] > cosines[0] and cosines[0] < 0.991, cosines


def test_denoised_cosine_starts_apart_and_rises_on_the_reference_model(model, prompts):
    """The premise holds for γ = cos(c, u): below the paper's 0.991 at first, then rising to ~1."""
    cosines = mean_cosines(model, prompts, "denoised")
    assert cosines[0] < 0.991 and cosines[-1] > 0.999, cosines
    rises = sum(later > earlier for earlier, later in zip(cosines, cosines[1:]))
    assert rises >= len(cosines) - 2, cosines  # almost monotonic


def test_coordinate_planes_say_where_each_pixel_is():
    planes = coordinate_planes(torch.zeros(2, 3, 4, 6))
    assert planes.shape == (2, 2, 4, 6)
    xs, ys = planes[0, 0], planes[0, 1]
    assert xs[:, 0].eq(-1).all() and xs[:, -1].eq(1).all() and (xs[:, 1:] > xs[:, :-1]).all()  # left → right
    assert ys[0].eq(-1).all() and ys[-1].eq(1).all() and (ys[1:] > ys[:-1]).all()  # top → bottom


def test_the_shipped_model_has_coordinate_planes(model):
    assert model.config.coordinates and model.unet.conv_in.in_channels == 5


def test_query_coordinates_make_cross_attention_depend_on_where_the_pixel_is():
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 8, 2, "test", query_coordinates=True).eval()
    text = TextConditioning(torch.randn(1, 3, 8), torch.randn(1, 8), torch.ones(1, 3, dtype=torch.bool))
    features = torch.randn(1, 16, 1, 1).expand(1, 16, 4, 4).contiguous()  # the same features at every pixel
    with torch.no_grad():
        out = block(features, text, {})
        block.coordinates_to_query = None
        plain = block(features, text, {})
    assert torch.allclose(plain, plain[..., :1, :1].expand_as(plain), atol=1e-6)  # no way to tell pixels apart
    assert (out - out[..., :1, :1]).abs().amax() > 1e-3  # now the answer depends on the pixel's place


def test_v_weighting_is_the_v_prediction_loss_of_an_epsilon_model():
    """Salimans & Ho 2022: with α = 1/√(1+σ²), s = σ/√(1+σ²), v = α·ε − s·x0. An epsilon model's
    v̂ (from its x̂0 = x − σ·ε̂) misses v by (1 + σ²)·‖ε̂ − ε‖² — the weight train_model uses."""
    torch.manual_seed(0)
    x0, eps, eps_hat = torch.randn(3, 4, 3, 8, 8).unbind(0)
    sigma = torch.tensor([0.05, 1.0, 3.0, 14.6]).reshape(-1, 1, 1, 1)
    x = x0 + sigma * eps
    alpha, s = 1 / torch.sqrt(1 + sigma**2), sigma / torch.sqrt(1 + sigma**2)
    v, v_hat = alpha * eps - s * x0, alpha * eps_hat - s * (x - sigma * eps_hat)
    v_loss = (v_hat - v).pow(2).mean(dim=(1, 2, 3))
    weighted = (eps_hat - eps).pow(2).mean(dim=(1, 2, 3)) * _loss_weights("v")(sigma.flatten())
    assert torch.allclose(v_loss, weighted, rtol=1e-5)
    assert torch.equal(_loss_weights("epsilon")(sigma.flatten()), torch.ones(4))


def test_a_v_weighted_model_with_query_coordinates_trains_and_says_how():
    model, info = train_model(steps=2, batch=2, config=ModelConfig(width=8, query_coordinates=True), loss_weighting="v")
    assert info["loss_weighting"] == "v" and model.config.query_coordinates
    blocks = (model.unet.attn_down2, model.unet.attn_down3, model.unet.attn_mid, model.unet.attn_up3, model.unet.attn_up2)
    assert all(block.coordinates_to_query is not None for block in blocks)


def test_the_v_loss_weighs_each_example_by_one_plus_sigma_squared_over_the_schedule_mean():
    torch.manual_seed(0)
    prediction, noise = torch.randn(2, 3, 3, 4, 4).unbind(0)
    sigma, schedule = torch.tensor([0.1, 2.0, 14.6]), torch.tensor([0.1, 1.0, 2.0, 14.6])
    per_example = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    expected = (per_example * (1 + sigma**2)).sum() / 3 / (1 + schedule**2).mean()
    assert torch.allclose(diffusion_loss(prediction, noise, sigma, schedule, "v"), expected)
    # the default is bit for bit the loss the shipped model was trained with
    assert torch.equal(diffusion_loss(prediction, noise, sigma, schedule), torch.nn.functional.mse_loss(prediction, noise))


def test_the_high_noise_loss_weighs_the_timesteps_from_sigma_5_five_times():
    torch.manual_seed(0)
    prediction, noise = torch.randn(2, 4, 3, 4, 4).unbind(0)
    sigma, schedule = torch.tensor([0.1, 4.99, 5.0, 14.6]), torch.tensor([0.1, 1.0, 6.0, 14.6])
    assert torch.equal(_loss_weights("high_noise")(sigma), torch.tensor([1.0, 1.0, 5.0, 5.0]))
    per_example = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    expected = (per_example * torch.tensor([1.0, 1.0, 5.0, 5.0])).mean() / 3.0  # schedule mean (1+1+5+5)/4
    assert torch.allclose(diffusion_loss(prediction, noise, sigma, schedule, "high_noise"), expected)
    _, info = train_model(steps=1, batch=2, config=ModelConfig(width=8), loss_weighting="high_noise")
    assert info["loss_weighting"] == "high_noise"


def assert_denoises_like(loaded: ReferenceModel, saved: ReferenceModel) -> None:
    """A model loaded from a file denoises as the model that was saved, rounded to fp16 as the file stores it."""
    saved = saved.half().float().eval()
    x, sigma = torch.randn(1, 3, 32, 32), torch.tensor([2.0])
    with torch.no_grad():
        expected = saved.denoise(x, sigma, [saved.encode(["a red circle"])])[0]
        assert torch.allclose(loaded.denoise(x, sigma, [loaded.encode(["a red circle"])])[0], expected, atol=1e-5)


def test_caption_noise_changes_what_the_model_is_told_and_says_so():
    exact, exact_info = train_model(steps=2, batch=8, config=ModelConfig(width=8))
    noisy, noisy_info = train_model(steps=2, batch=8, config=ModelConfig(width=8), caption_noise=0.3)
    assert exact_info["caption_noise"] == 0.0 and noisy_info["caption_noise"] == 0.3
    # same seed, same pictures and noise: only the prompts differ
    assert not torch.equal(exact.text_encoder.embed.weight, noisy.text_encoder.embed.weight)
    with pytest.raises(InvalidInputError, match="caption_noise"):
        train_model(steps=1, batch=2, config=ModelConfig(width=8), caption_noise=0.5)


def test_a_trained_model_is_returned_in_the_standard_layout_and_saves(tmp_path):
    """train_model trains in the channels-last layout (faster convolutions on CPU); what it returns
    must be plain contiguous tensors, or safetensors refuses to save them."""
    model, _ = train_model(steps=2, batch=2, config=ModelConfig(width=8, query_coordinates=True))
    assert all(tensor.is_contiguous() for tensor in model.state_dict().values())
    path = tmp_path / "trained.safetensors"
    save_model(model, {"steps": 2}, path)
    assert_denoises_like(load_model(path), model)


def test_an_unknown_loss_weighting_is_refused_before_training():
    with pytest.raises(InvalidInputError, match="loss_weighting.*use one of"):
        train_model(steps=1, batch=2, config=ModelConfig(width=8), loss_weighting="snr")


@pytest.mark.parametrize("option", ["coordinates", "query_coordinates"])
def test_files_saved_before_an_option_existed_still_load(tmp_path, option):
    torch.manual_seed(0)
    flags = {"coordinates": False, "query_coordinates": False}
    if option == "query_coordinates":
        flags["coordinates"] = True  # the previous shipped model: planes, no query coordinates
    old = ReferenceModel(ModelConfig(width=8, **flags))
    path = tmp_path / "old.safetensors"
    save_model(old, {"steps": 1}, path)
    tensors, metadata = load_tensor_file(path, MODEL_FORMAT, FORMAT_VERSION)
    for key in ("coordinates", "query_coordinates") if option == "coordinates" else ("query_coordinates",):
        del metadata["config"][key]  # as written before the option existed
    save_tensor_file(path, tensors, metadata, overwrite=True)
    loaded = load_model(path)
    assert loaded.config.to_dict() == old.config.to_dict()
    assert loaded.unet.conv_in.in_channels == (5 if flags["coordinates"] else 3)
    assert_denoises_like(loaded, old)


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


def test_shipped_predictor_and_adapters_were_trained_on_the_shipped_model(model):
    """Retraining the model makes the step predictor and adapters stale; the bench refuses them."""
    from fastguidance.guidance_adapters.adapters import load_adapters
    from fastguidance.fingerprint import weights_fingerprint
    from fastguidance.research.reference.weights import ADAPTERS_PATH, STEP_PREDICTOR_PATH
    from fastguidance.step_predictor import load_step_predictor

    fingerprint = weights_fingerprint(model.state_dict().items())
    assert load_step_predictor(STEP_PREDICTOR_PATH)[1]["model_fingerprint"] == fingerprint
    assert load_adapters(ADAPTERS_PATH)[1]["model_fingerprint"] == fingerprint


def test_bench_refuses_files_trained_on_another_model():
    from fastguidance.research.bench_methods import BenchContext, require_trained_for

    from fastguidance.fingerprint import weights_fingerprint

    model = ReferenceModel(ModelConfig(width=8))
    context = BenchContext(model, settings=None, sigmas=torch.ones(2), uncond=None)
    require_trained_for(context, {"model_fingerprint": weights_fingerprint(model.state_dict().items())}, "a", "adapters")
    with pytest.raises(TensorFileError, match="retrain it with `python -m fastguidance.research.reference.train adapters"):
        require_trained_for(context, {"model_fingerprint": "0123"}, "adapters.safetensors", "adapters")
    with pytest.raises(TensorFileError, match="no fingerprint"):
        require_trained_for(context, {}, "adapters.safetensors", "adapters")
