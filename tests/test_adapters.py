"""AGD core: Fourier encoding, adapter shapes and size, the CFG target, and a short training that lowers the loss."""

import contextlib
import copy
import dataclasses
import math

import pytest
import torch

from fastguidance.guidance_adapters.adapters import (AdapterSpec, CrossAttentionAdapter, FourierFeatures,
                                                     GuidanceAdapters, OffsetAdapter, cfg_target, distillation_loss,
                                                     load_adapters, prompt_vector)
from fastguidance.guidance_adapters.training import (DistillationTrainer, TrainingSettings, TrajectoryStore,
                                                     recomputed_in_backward, train_on_store, trajectory_bytes)
from fastguidance.errors import FastGuidanceError, InvalidInputError
from fastguidance.research.reference.adapters import (SinglePassModel, adapter_spec, attach_points,
                                                      collect_trajectories, single_pass_noise, train_adapters)
from fastguidance.research.reference.weights import ADAPTERS_PATH, load_model
from fastguidance.research.sampling import sample
from fastguidance.schedules import make_sigmas


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_fourier_features_are_bounded_and_tell_scales_apart():
    features = FourierFeatures(8)(torch.tensor([1.0, 1.5, 7.5]))
    assert features.shape == (3, 16) and features.abs().max() <= 1.0
    assert (features[0] - features[1]).abs().max() > 0.05 and (features[1] - features[2]).abs().max() > 0.05


@pytest.mark.parametrize("adapter", [OffsetAdapter(32, 16, 8), CrossAttentionAdapter(32, 24, 16, 8)])
def test_adapters_keep_the_shape_and_start_near_the_identity(adapter):
    torch.manual_seed(0)
    n = torch.randn(2, 10, 32)
    out = adapter(n, torch.randn(2, 16), torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == n.shape
    assert 0 < (out - n).abs().mean() < 0.5 * n.abs().mean()  # Xavier, small output projection: not zero, not large


def test_reference_adapters_are_one_to_five_percent_of_the_model(model):
    points = attach_points(model)
    assert len(points) == 5 and all(channels > 0 for channels in points.values())
    adapters = GuidanceAdapters(adapter_spec(model))
    share = adapters.count_parameters() / sum(p.numel() for p in model.unet.parameters())
    assert 0.01 <= share <= 0.05, share


def test_cfg_target_is_cfg():
    eps_c, eps_u = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(cfg_target(eps_c, eps_u, torch.tensor([1.0, 4.0])), torch.tensor([[1.0] * 3, [4.0] * 3]))


def test_bad_specs_and_unknown_attach_points_are_refused(model):
    with pytest.raises(InvalidInputError, match="kind"):
        GuidanceAdapters(AdapterSpec({"a": 8}, 8, 0, kind="lora"))
    with pytest.raises(InvalidInputError, match="attach_points"):
        GuidanceAdapters(AdapterSpec({}, 8, 0))
    adapters = GuidanceAdapters(AdapterSpec({"a": 8}, 8, 0, hidden=8, embed_dim=8))
    bound = adapters.bind(torch.ones(1), torch.ones(1), torch.zeros(1, 3, 8))
    with pytest.raises(KeyError, match="made for"):
        bound("b", torch.zeros(1, 4, 8))


def test_a_short_training_on_cfg_trajectories_lowers_the_loss(model):
    torch.manual_seed(0)
    prompts = ["a red circle on the left", "two blue squares", "a small green triangle above a large yellow circle",
               "three purple triangles"]
    data = collect_trajectories(model, prompts, (1.0, 8.0), steps=6, seed=0)
    assert len(data) == 24 and data.x.dtype == torch.float16 and data.size_bytes() < 1_000_000
    adapters = GuidanceAdapters(adapter_spec(model))
    texts = model.encode(data.prompts).select(data.prompt)

    def loss_on_all_steps() -> float:  # the whole data set: no batch-sampling noise in the comparison
        with torch.no_grad():
            prediction = single_pass_noise(model, adapters, data.x.float(), data.sigma, texts, data.omega)
            return float(distillation_loss(prediction, data.target))

    before = loss_on_all_steps()
    losses = train_adapters(model, adapters, data, steps=40, batch=16, lr=3e-3, warmup=5)
    assert len(losses) == 40
    assert loss_on_all_steps() < 0.8 * before
    # the adapted single pass depends on ω (the guidance scale is an input, not baked in)
    text = model.encode(prompts[:1])
    x, sigma = data.x[:1].float(), data.sigma[:1]
    with torch.no_grad():
        low = single_pass_noise(model, adapters, x, sigma, text, torch.tensor([1.0]))
        high = single_pass_noise(model, adapters, x, sigma, text, torch.tensor([8.0]))
    assert (low - high).abs().max() > 1e-4


def test_row_scale_scales_each_samples_adapter_output_and_zero_leaves_it_unchanged():
    adapters = GuidanceAdapters(AdapterSpec({"a": 8}, text_dim=6, pooled_dim=6, hidden=8, embed_dim=16))
    n, tokens = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    omega, sigma, pooled = torch.tensor([4.0, 4.0]), torch.tensor([1.0, 1.0]), torch.randn(2, 6)
    full = adapters.bind(omega, sigma, tokens, pooled)("a", n)
    scaled = adapters.bind(omega, sigma, tokens, pooled, row_scale=torch.tensor([0.5, 0.0]))("a", n)
    assert torch.allclose(scaled[0], n[0] + 0.5 * (full[0] - n[0]), atol=1e-6)
    assert torch.equal(scaled[1], n[1])


@pytest.fixture(scope="module")
def adapted_images(model):
    """``images(adapters, ω)``: the reference model with ``adapters`` sampled for two prompts (Euler, 8 Karras
    steps, seeded noise), flattened; the bundled adapters; their images at ω 5 and ω 0 (adapters off)."""
    adapters, _ = load_adapters(ADAPTERS_PATH)
    prompts = ["a red circle at the top left", "two blue squares at the bottom"]
    cond, empty = model.encode(prompts), model.encode([""] * len(prompts))
    noise = torch.randn(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sigmas = make_sigmas(model.schedule, "karras", 8)

    def images(adapters, omega=5.0):
        with torch.no_grad():
            return sample(SinglePassModel(model, adapters, omega), noise, sigmas, cond, empty, 1.0).latent.flatten(1)

    return images, adapters, images(adapters), images(adapters, 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_in_half_precision_stay_close_to_fp32(adapted_images, dtype):
    """Tolerance of ``GuidanceAdapters.compute_in``: the bundled adapters with their attach points in ``dtype``
    and in fp32 give images that differ by less than 3% of the guidance the adapters add
    (``‖half − fp32‖ / ‖ω 5 − ω 0‖`` per image; measured here at most 0.90% in bf16 and 0.087% in fp16, and
    1.4% and 0.12% over four prompts and 20 steps)."""
    images, adapters, full, unguided = adapted_images
    half = images(copy.deepcopy(adapters).compute_in(dtype))
    assert ((half - full).norm(dim=1) / (full - unguided).norm(dim=1)).max() < 0.03
    assert not torch.equal(half, full)  # the adapters did run in half precision


def test_the_conditioner_stays_in_fp32_where_half_precision_would_misplace_its_features():
    """``compute_in`` casts the attach points' adapters only: the Fourier features of ω (angles up to
    2π·2·30 rad) computed in bf16 would be off by more than 0.5, in fp32 they are exact to 1e-4."""
    adapters = GuidanceAdapters(AdapterSpec({"a": 8}, 8, 8, hidden=8, embed_dim=8)).compute_in(torch.bfloat16)
    assert {p.dtype for p in adapters.conditioner.parameters()} == {torch.float32}
    assert {p.dtype for p in adapters.adapters.parameters()} == {torch.bfloat16}
    omega = torch.linspace(1.0, 30.0, 60)
    features = adapters.conditioner.omega_features
    exact = 2 * math.pi * omega.double()[:, None] * features.frequencies.double()
    in_bf16 = 2 * math.pi * omega.bfloat16()[:, None] * features.frequencies.bfloat16()
    assert (features(omega).double() - torch.cat([exact.sin(), exact.cos()], 1)).abs().max() < 1e-4
    assert (torch.cat([in_bf16.sin(), in_bf16.cos()], 1).double() - torch.cat([exact.sin(), exact.cos()], 1)) \
        .abs().max() > 0.5


def test_a_copy_on_a_device_leaves_the_adapters_where_they_are_and_computes_the_same():
    adapters = GuidanceAdapters(AdapterSpec({"a": 8}, 6, 0, hidden=8, embed_dim=16)).compute_in(torch.bfloat16)
    before = {name: tensor for name, tensor in adapters.state_dict().items()}
    n, tokens, omega, sigma = torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.tensor([4.0, 2.0]), torch.ones(2)
    copy_here = adapters.copy_on("cpu")
    assert torch.equal(copy_here.bind(omega, sigma, tokens)("a", n), adapters.bind(omega, sigma, tokens)("a", n))
    on_meta = adapters.copy_on("meta")
    assert {t.device.type for t in [*on_meta.parameters(), *on_meta.buffers()]} == {"meta"}
    assert {name: t.dtype for name, t in on_meta.state_dict().items()} == {name: t.dtype for name, t in before.items()}
    assert on_meta.bind(omega.to("meta"), sigma.to("meta"), tokens.to("meta"))("a", n.to("meta")).device.type == "meta"
    assert all(adapters.state_dict()[name].data_ptr() == tensor.data_ptr() and tensor.device.type == "cpu"
               for name, tensor in before.items())


def test_prompt_vector_is_the_pooled_vector_or_the_token_mean():
    tokens = torch.randn(2, 4, 3)
    assert torch.equal(prompt_vector(tokens, None), tokens.mean(dim=1))
    pooled = torch.randn(2, 5)
    assert prompt_vector(tokens, pooled) is pooled


def test_trajectory_store_keeps_fp16_examples_in_memory_or_on_disk(tmp_path):
    x, target = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert trajectory_bytes(3, (2, 4, 4)) == 3 * (2 * 2 * 32 + 16)
    for store in (TrajectoryStore(5, (2, 4, 4)), TrajectoryStore(5, (2, 4, 4), directory=tmp_path),
                  TrajectoryStore(5, (2, 4, 4), memory_limit=10)):
        assert store.append(x, torch.tensor([3.0, 2.0, 1.0]), 4.0, 1, target) == 3
        assert store.append(x, torch.tensor([3.0, 2.0, 1.0]), torch.tensor([5.0, 6.0, 7.0]), 2, target) == 2  # capacity 5
        assert len(store) == 5 and store.full and store.size_bytes() == trajectory_bytes(5, (2, 4, 4))
        bx, sigma, omega, prompt, btarget = store.batch(torch.tensor([1, 4]))
        assert torch.allclose(bx, x[[1, 1]].half().float()) and torch.allclose(btarget, target[[1, 1]].half().float())
        assert sigma.tolist() == [2.0, 2.0] and omega.tolist() == [4.0, 6.0] and prompt.tolist() == [1, 2]
        store.close()
    assert TrajectoryStore(5, (2, 4, 4), memory_limit=10).on_disk
    with pytest.raises(InvalidInputError, match="shape"):
        TrajectoryStore(2, (2, 4, 4)).append(torch.randn(1, 2, 8, 8), torch.ones(1), 1.0, 0, torch.randn(1, 2, 8, 8))


def test_learning_rate_warms_up_then_decays_to_zero():
    settings = TrainingSettings(steps=100, learning_rate=1e-3, warmup=10)
    assert settings.learning_rate_at(0) == pytest.approx(1e-4)
    assert settings.learning_rate_at(9) == pytest.approx(1e-3)
    assert settings.learning_rate_at(55) == pytest.approx(5e-4)
    assert settings.learning_rate_at(100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InvalidInputError, match="learning_rate"):
        TrainingSettings(learning_rate=0.0)


def _regression_problem():
    torch.manual_seed(0)
    spec = AdapterSpec({"a": 4}, text_dim=3, pooled_dim=0, kind="offset", hidden=8, embed_dim=8)
    store = TrajectoryStore(32, (1, 4))
    x = torch.randn(32, 1, 4)
    store.append(x, torch.rand(32) + 0.5, torch.rand(32) * 4 + 1, 0, x + 0.3)
    tokens = torch.zeros(1, 1, 3)

    def predict_with(adapters):
        def predict(x, sigma, omega, prompt):
            return adapters.bind(omega, sigma, tokens.expand(x.shape[0], -1, -1))("a", x)
        return predict

    return spec, store, predict_with


def test_a_resumed_training_ends_where_an_uninterrupted_one_ends(tmp_path):
    spec, store, predict_with = _regression_problem()
    settings = TrainingSettings(steps=30, batch=8, learning_rate=1e-2, warmup=3)
    torch.manual_seed(1)
    straight = DistillationTrainer(GuidanceAdapters(spec), settings)
    train_on_store(straight, store, predict_with(straight.adapters))

    torch.manual_seed(1)
    first = DistillationTrainer(GuidanceAdapters(spec), settings)
    saved = []
    train_on_store(first, store, predict_with(first.adapters),
                   checkpoint=lambda trainer: saved.append(trainer.save(tmp_path / "run.checkpoint", {"model": "m"})),
                   checkpoint_every=10)
    assert len(saved) == 2  # steps 10 and 20 (none after the last step)
    resumed = DistillationTrainer(GuidanceAdapters(spec), settings)
    resumed.resume(tmp_path / "run.checkpoint", {"model": "m"})
    assert resumed.step == 20 and len(resumed.losses) == 20
    train_on_store(resumed, store, predict_with(resumed.adapters))
    for a, b in zip(straight.adapters.state_dict().values(), resumed.adapters.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert resumed.losses[-1] == pytest.approx(straight.losses[-1], rel=1e-5)
    assert straight.final_loss(5) < straight.losses[0]
    with pytest.raises(FastGuidanceError, match="another training"):
        DistillationTrainer(GuidanceAdapters(spec), settings).resume(tmp_path / "run.checkpoint", {"model": "other"})
    with pytest.raises(FastGuidanceError, match="another training"):
        DistillationTrainer(GuidanceAdapters(spec), dataclasses.replace(settings, steps=40)).resume(
            tmp_path / "run.checkpoint", {"model": "m"})


def test_training_without_examples_is_refused():
    spec, _, predict_with = _regression_problem()
    trainer = DistillationTrainer(GuidanceAdapters(spec), TrainingSettings(steps=1))
    with pytest.raises(FastGuidanceError, match="no trajectory"):
        train_on_store(trainer, TrajectoryStore(4, (1, 4)), predict_with(trainer.adapters))


def test_a_loss_scaler_gives_the_same_training_in_fp32():
    """The fp16 path scales the loss (no underflow); in fp32 the scaled and plain runs agree."""
    spec, store, predict_with = _regression_problem()
    settings = TrainingSettings(steps=10, batch=8, learning_rate=1e-2, warmup=2)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)):
        torch.manual_seed(1)
        trainer = DistillationTrainer(GuidanceAdapters(spec), settings, scaler=scaler)
        train_on_store(trainer, store, predict_with(trainer.adapters))
        runs.append(trainer)
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-4)


def _block_updating_its_inputs_in_place(weight: torch.Tensor):
    """A block like the host's Flux blocks: it saves its input for backward, then updates it in place."""
    def run(args: dict) -> dict:
        img, txt = args["img"], args["txt"]
        mixed = torch.tanh(img @ weight) * txt
        txt += mixed  # in place, after tanh and the product saved their inputs
        return {"img": img + mixed, "txt": txt, "note": args["note"]}
    return run


@pytest.mark.parametrize("copied", [False, True])
def test_a_block_recomputed_in_backward_gives_the_plain_blocks_outputs_and_gradients(copied):
    """recomputed_in_backward: same outputs and gradients (exactly here) as running the block, with only its inputs
    kept between forward and backward; inputs the block updates in place stay untouched; a block whose inputs need
    no gradient is simply run."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 8, generator=generator)
    scale = torch.randn(8, generator=generator).requires_grad_(True)
    img0, txt0 = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)

    def copies():
        return torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor.clone(), lambda tensor: tensor)

    def training_step(checkpointed: bool):
        scale.grad = None
        kept: list[int] = []

        def pack(tensor):
            kept.append(tensor.numel())
            return tensor.clone()  # the host glue's copies (in-place updates after a save)

        block = _block_updating_its_inputs_in_place(weight)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            args = {"img": img0 * scale, "txt": txt0 * scale, "note": "kept as it is"}
            txt_before = args["txt"].detach().clone()
            out = recomputed_in_backward(block, args, copies if copied else contextlib.nullcontext) if checkpointed \
                else block(dict(args))
            inputs_untouched = torch.equal(args["txt"], txt_before)
            second = block({"img": out["img"] * scale, "txt": out["txt"].clone(), "note": None})
            loss = second["img"].square().sum() + second["txt"].sum()
        with copies():
            loss.backward()
        return out, loss.item(), scale.grad.clone(), sum(kept), inputs_untouched

    plain, checkpointed = training_step(False), training_step(True)
    assert checkpointed[0]["note"] == "kept as it is" and set(checkpointed[0]) == {"img", "txt", "note"}
    assert torch.equal(plain[0]["img"], checkpointed[0]["img"]) and torch.equal(plain[0]["txt"], checkpointed[0]["txt"])
    assert plain[1] == checkpointed[1] and torch.equal(plain[2], checkpointed[2])
    assert checkpointed[3] < plain[3]  # the recomputed block's activations were not kept
    assert checkpointed[4] and not plain[4]  # the checkpointed block ran on copies of its inputs
    no_gradient = {"img": img0, "txt": txt0.clone(), "note": 1}
    assert recomputed_in_backward(_block_updating_its_inputs_in_place(weight), no_gradient)["txt"] is no_gradient["txt"]
