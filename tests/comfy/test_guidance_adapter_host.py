"""AGD in the real host: train adapters on tiny real models (UNet and Flux), load them, one evaluation per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FakeClip, counted, empty_pack_folder, ksampler, latent, make_conds, pack_module
import host_models

PROMPTS = "a red cube\nthree blue spheres on a table"
TRAIN = dict(omega_min=1.0, omega_max=8.0, trajectories=2, steps=3, sampler_name="euler", scheduler="normal",
             width=64, height=64, train_steps=6, batch=2, learning_rate=1e-3, kind="cross_attention", adapter_width=16,
             seed=0, filename="tiny", overwrite=False, resume=True)


@pytest.fixture()
def adapter_folder(host, tmp_path, monkeypatch):
    return empty_pack_folder(tmp_path, monkeypatch, "fastguidance_adapters")


def train(host, model, clip=None, **changes):
    settings = {**TRAIN, **changes}
    node = host.node("FastGuidance_TrainGuidanceAdapter", "9")
    return node.execute(model, clip or FakeClip(), PROMPTS, "", *settings.values())


def load(host, model, name="tiny.safetensors", use_sampler_cfg=True, omega=5.0, strength=1.0, allow_other_model=False):
    return host.node("FastGuidance_LoadGuidanceAdapter", "11").execute(model, name, use_sampler_cfg, omega, strength,
                                                                       allow_other_model)[0]


@pytest.fixture(scope="module")
def loaded_model(host):
    """The tiny UNet created under inference mode, as the host's loaders create models (inference tensors)."""
    with torch.inference_mode():
        return host_models.patcher(host_models.tiny_model(seed=0))


@pytest.fixture()
def training_steps(host, monkeypatch):
    """What each optimiser step of the adapter trainer left behind: the adapters' gradients and the host's
    training flag (``comfy.model_management.in_training``; None where the host has none, as 0.3.64)."""
    import comfy.model_management

    trainer_core = pack_module(host, "fastguidance.guidance_adapters.training")
    original_step = trainer_core.DistillationTrainer.train_step
    steps = []

    def observed_step(self, loss_of):
        loss = original_step(self, loss_of)
        steps.append({"gradients": {name: None if p.grad is None else p.grad.detach().clone()
                                    for name, p in self.adapters.named_parameters()},
                      "in_training": getattr(comfy.model_management, "in_training", None)})
        return loss

    monkeypatch.setattr(trainer_core.DistillationTrainer, "train_step", observed_step)
    return steps


def host_training_flag():
    import comfy.model_management

    return getattr(comfy.model_management, "in_training", None)


def assert_adapters_trained(steps: list[dict], flag_before) -> None:
    """Every adapter parameter got a finite gradient on every step, and a non-zero one on some step; the host's
    training flag was on during the steps where the host has one, and is back to its value from before."""
    assert steps, "the trainer made no optimiser step"
    names = list(steps[0]["gradients"])
    missing = sorted({name for step in steps for name, grad in step["gradients"].items() if grad is None})
    assert not missing, f"adapter parameters without gradients: {missing}"
    assert all(torch.isfinite(grad).all() for step in steps for grad in step["gradients"].values())
    never = [name for name in names if not any(step["gradients"][name].abs().sum() > 0 for step in steps)]
    assert not never, f"adapter parameters whose gradient was always zero: {never}"
    assert [step["in_training"] for step in steps] == [None if flag_before is None else True] * len(steps)
    assert host_training_flag() == flag_before


@pytest.fixture()
def trained(host, tiny_model, adapter_folder, training_steps):
    flag_before = host_training_flag()
    curve, report = train(host, tiny_model)
    assert_adapters_trained(training_steps, flag_before)
    return adapter_folder / "tiny.safetensors", curve, report


def test_attach_points_are_the_unets_cross_attention_outputs(host, tiny_model):
    points = pack_module(host, "nodes.adapter_patch").attach_points(tiny_model)
    assert points == {"input.1.0": 32, "input.3.0": 64, "middle.0.0": 64, "output.0.0": 64, "output.1.0": 64,
                      "output.2.0": 32, "output.3.0": 32}


def test_an_unsupported_architecture_is_refused_by_name(host, tiny_model):
    model = tiny_model.clone()
    model.model = type("Stub", (), {"diffusion_model": torch.nn.Linear(2, 2), "model_config": None})()
    with pytest.raises(Exception, match="model.*Stub.*SD1.x, SD2.x and SDXL UNets.*Flux"):
        pack_module(host, "nodes.adapter_patch").attach_points(model)


@pytest.fixture()
def base_flags(tiny_model):
    """``requires_grad`` of each base-model parameter before the test trains (the host decides: 0.33 creates
    parameters without it)."""
    return {name: p.requires_grad for name, p in tiny_model.model.diffusion_model.named_parameters()}


def test_training_writes_a_file_with_its_metadata_and_a_loss_curve(host, tiny_model, base_flags, trained):
    path, curve, report = trained
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert "tiny.safetensors" in report and "attach points" in report and "final loss" in report
    adapters, metadata = pack_module(host, "fastguidance.guidance_adapters.adapters").load_adapters(path)
    assert metadata["architecture"] == "SD15" and metadata["omega_range"] == [1.0, 8.0]
    assert metadata["trajectory_examples"] == 2 * 3 and metadata["train_steps"] == 6
    assert len(metadata["loss_every_50"]) == 1 and metadata["final_loss"] > 0
    assert metadata["model_fingerprint"] == pack_module(host, "nodes.model_identity").model_fingerprint(tiny_model)
    assert set(adapters.spec.attach_points) == {"input.1.0", "input.3.0", "middle.0.0", "output.0.0", "output.1.0",
                                                "output.2.0", "output.3.0"}
    assert not (path.parent / "tiny.checkpoint").exists()
    # the base model collected no gradients and keeps its flags (requires_grad is True on 0.3.64, False on 0.33)
    assert all(p.grad is None for p in tiny_model.model.diffusion_model.parameters())
    assert {name: p.requires_grad for name, p in tiny_model.model.diffusion_model.named_parameters()} == \
        base_flags
    with pytest.raises(Exception, match="filename.*already exists"):
        train(host, tiny_model)


def test_training_flows_through_a_model_loaded_under_inference_mode(host, loaded_model, adapter_folder):
    parameters = dict(loaded_model.model.diffusion_model.named_parameters())
    assert all(p.is_inference() for p in parameters.values())
    before = {name: p.clone() for name, p in parameters.items()}
    with torch.inference_mode():  # how the executor runs nodes
        train(host, loaded_model)
    after = dict(loaded_model.model.diffusion_model.named_parameters())
    assert all(after[name] is parameters[name] and torch.equal(after[name], before[name]) for name in parameters)
    assert (adapter_folder / "tiny.safetensors").exists()


class StreamedWeights(RuntimeError):
    """Raised by :func:`streaming_double` when a forward pass with gradients runs through its weights."""


def streaming_double(host, seed: int, reloaded: list, loader_known: bool = True):
    """A tiny UNet in what the 0.33 host's loaders return on NVIDIA GPUs, a ``ModelPatcherDynamic``, as far as a
    CPU allows: the host builds none there (:func:`test_the_host_builds_no_model_patcher_dynamic_on_a_cpu`).

    Kept from the host's class (comfy/model_patcher.py): ``is_dynamic`` (its own method); ``clone``, which it
    does not override: a clone is of the same class, and ``clone(disable_dynamic=True)`` a plain ModelPatcher
    built by ``cached_patcher_init`` called with ``disable_dynamic=True``, as the loaders set it
    (comfy/sd.py; here it builds the same tiny UNet and appends a weak reference to it to ``reloaded``;
    ``loader_known`` False: none, as from a custom loader). Its weights are made under inference mode, as the
    loaders make them. What its streamed weights cannot do on a GPU, carry a backward pass
    (``nodes/adapter_training.py``, ``patcher_to_train_through``), is refused: a forward pass through its
    model with gradients enabled raises :class:`StreamedWeights`.
    """
    import weakref

    import comfy.model_patcher

    class StreamingDouble(comfy.model_patcher.ModelPatcher):
        is_dynamic = comfy.model_patcher.ModelPatcherDynamic.is_dynamic

    def load_again(seed: int, disable_dynamic: bool = False):
        assert disable_dynamic and not torch.is_inference_mode_enabled()
        plain = host_models.patcher(host_models.tiny_model(seed=seed))
        reloaded.append(weakref.ref(plain.model))
        return plain

    def refuse_gradients(module, args):
        if torch.is_grad_enabled():
            raise StreamedWeights("a forward pass with gradients through a model whose weights are streamed")

    with torch.inference_mode():
        model = host_models.tiny_model(seed=seed)
    model.diffusion_model.register_forward_pre_hook(refuse_gradients)
    double = StreamingDouble(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    double.cached_patcher_init = (load_again, (seed,)) if loader_known else None
    return double


@pytest.fixture()
def dynamic_vram(host):
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this host has no dynamic VRAM (ModelPatcherDynamic came after 0.3.64)")


def test_the_host_builds_no_model_patcher_dynamic_on_a_cpu(host, dynamic_vram):
    """Why :func:`streaming_double`: for a CPU load device ``ModelPatcherDynamic(...)`` returns a plain
    ModelPatcher (its ``__new__``), and for another device its ``__init__`` needs comfy-aimdo's native
    library, which does not load without a GPU."""
    import comfy.model_patcher

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the host's own class can be built")
    model = host_models.tiny_model(seed=0)
    cpu = torch.device("cpu")
    assert type(comfy.model_patcher.ModelPatcherDynamic(model, cpu, cpu)) is comfy.model_patcher.ModelPatcher
    with pytest.raises(AttributeError, match="hostbuf_allocate"):
        comfy.model_patcher.ModelPatcherDynamic(model, torch.device("cuda", 0), cpu)


def test_a_model_that_streams_its_weights_is_trained_through_a_copy_loaded_again(host, dynamic_vram, adapter_folder,
                                                                                training_steps):
    """As the host's trainer does (comfy_extras/nodes_train.py: ``model.clone(force_deepcopy=True)``): the model
    loaded again from its file under ``inference_mode(False)``, here a plain ModelPatcher kept whole on the
    device; the user's model records the trajectories and never carries a gradient; the copy is unloaded and
    dropped after training; the file is the user's model's (fingerprint)."""
    import gc

    import comfy.model_management

    reloaded = []
    model = streaming_double(host, seed=0, reloaded=reloaded)
    parameters = dict(model.model.diffusion_model.named_parameters())
    flag_before = host_training_flag()
    with torch.inference_mode():  # how the executor runs nodes
        train(host, model)
    assert_adapters_trained(training_steps, flag_before)
    assert len(reloaded) == 1
    _, metadata = pack_module(host, "fastguidance.guidance_adapters.adapters").load_adapters(
        adapter_folder / "tiny.safetensors")
    assert metadata["model_fingerprint"] == pack_module(host, "nodes.model_identity").model_fingerprint(model)
    assert metadata["model_reloaded_bytes"] == model.model_size()
    assert metadata["weights_copied_bytes"] == 0  # the copy's weights were made trainable: nothing copied again
    assert dict(model.model.diffusion_model.named_parameters()) == parameters
    gc.collect()
    assert reloaded[0]() is None
    assert all(entry.real_model is None or entry.real_model() is not None
               for entry in comfy.model_management.current_loaded_models)


def test_a_model_that_streams_its_weights_from_a_loader_the_host_cannot_repeat_is_refused_before_recording(
        host, dynamic_vram, adapter_folder, monkeypatch):
    recording = pack_module(host, "nodes.adapter_training")
    monkeypatch.setattr(recording, "record_trajectories", lambda *args: pytest.fail("recorded before refusing"))
    with pytest.raises(Exception, match="model = .*dynamic VRAM.*--disable-dynamic-vram"):
        train(host, streaming_double(host, seed=0, reloaded=[], loader_known=False))


def test_a_model_that_keeps_its_weights_is_trained_through_itself(host, tiny_model, adapter_folder):
    """0.3.64, and 0.33 on a CPU or with --disable-dynamic-vram: no copy (as 0.3.64's own trainer: ``model.clone()``)."""
    model = tiny_model.clone()
    model.cached_patcher_init = (lambda *args, **kwargs: pytest.fail("the model was loaded again"), ())
    with torch.inference_mode():
        train(host, model)
    _, metadata = pack_module(host, "fastguidance.guidance_adapters.adapters").load_adapters(
        adapter_folder / "tiny.safetensors")
    assert "model_reloaded_bytes" not in metadata


def test_trainer_validates_its_inputs(host):
    node = host.node("FastGuidance_TrainGuidanceAdapter")
    assert "prompts" in node.validate_inputs(prompts=" \n")
    assert "filename" in node.validate_inputs(filename="a/b")
    assert "omega_min" in node.validate_inputs(omega_min=9.0, omega_max=2.0)
    assert "adapter_width" in node.validate_inputs(adapter_width=30, kind="cross_attention")
    assert node.validate_inputs(prompts="a cat", filename="x", omega_min=1.0, omega_max=8.0, adapter_width=32,
                                kind="cross_attention") is True


def test_an_interrupted_training_keeps_a_checkpoint_and_resumes_from_it(host, tiny_model, adapter_folder, monkeypatch):
    import comfy.model_management

    trainer_core = pack_module(host, "fastguidance.guidance_adapters.training")
    original_step = trainer_core.DistillationTrainer.train_step

    def interrupt_at_step_4(self, loss_of):
        if self.step == 4:
            raise comfy.model_management.InterruptProcessingException()
        return original_step(self, loss_of)

    monkeypatch.setattr(trainer_core.DistillationTrainer, "train_step", interrupt_at_step_4)
    flag_before = host_training_flag()
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(host, tiny_model)
    assert host_training_flag() == flag_before  # restored also when training stops half-way
    checkpoint = adapter_folder / "tiny.checkpoint"
    assert checkpoint.exists() and not (adapter_folder / "tiny.safetensors").exists()
    with pytest.raises(Exception, match="resume.*interrupted training"):
        train(host, tiny_model, resume=False)
    monkeypatch.setattr(trainer_core.DistillationTrainer, "train_step", original_step)
    steps_run = []
    monkeypatch.setattr(trainer_core.DistillationTrainer, "train_step",
                        lambda self, loss_of: steps_run.append(self.step) or original_step(self, loss_of))
    train(host, tiny_model)
    assert steps_run == [4, 5] and not checkpoint.exists()
    _, metadata = pack_module(host, "fastguidance.guidance_adapters.adapters").load_adapters(adapter_folder / "tiny.safetensors")
    assert len(json.loads(json.dumps(metadata["loss_every_50"]))) == 1


@pytest.fixture()
def full_reads(host, monkeypatch):
    """The file name of every full read (all tensors) of an adapter file during the test."""
    adapters = pack_module(host, "fastguidance.guidance_adapters.adapters")
    real, names = adapters.load_tensor_file, []
    monkeypatch.setattr(adapters, "load_tensor_file",
                        lambda path, *args, **kwargs: names.append(Path(path).name) or real(path, *args, **kwargs))
    return names


def test_queueing_a_prompt_reads_no_adapter_tensor_and_running_it_reads_the_file_once(host, tiny_model, trained,
                                                                                      full_reads):
    """validate_inputs (every queued prompt) checks the header alone (tests/test_adapter_files.py: no tensor
    read, the same refusals bar non-finite weights); execute loads the file, once."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = trained[0]
    node = host.node("FastGuidance_LoadGuidanceAdapter")
    assert node.validate_inputs(adapter=path.name, use_sampler_cfg=True, guidance_scale=5.0, strength=1.0) is True
    assert full_reads == []
    load(host, tiny_model)
    assert full_reads == [path.name]
    # what the header cannot tell is refused when the node runs, naming the file
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header_metadata = handle.metadata()
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, str(path.parent / "nan.safetensors"), metadata=header_metadata)
    assert node.validate_inputs(adapter="nan.safetensors") is True
    with pytest.raises(Exception, match="nan.safetensors: tensor .* NaN or infinite"):
        load(host, tiny_model, "nan.safetensors")


def test_loaded_adapters_cost_one_evaluation_per_step_with_ksampler(host, tiny_model, trained, runs):
    model = load(host, tiny_model)
    clone, counter = counted(model)
    positive, negative = make_conds()
    ksampler(host, clone, positive, negative, cfg=6.0, steps=10)
    assert counter.cond_passes == 10 and counter.uncond_passes == 0
    summary = runs[-1].summary()
    assert (summary.calls, summary.evaluations, summary.speedup) == (10, 10, 2.0)
    assert runs[-1].to_dict()["records"][0]["actions"] == ["adapter"]


def test_loaded_adapters_work_with_sampler_custom_advanced(host, tiny_model, trained):
    model = load(host, tiny_model)
    clone, counter = counted(model)
    positive, negative = make_conds()
    guider = host.call("CFGGuider", clone, positive, negative, 6.0)[0]
    sampler = host.call("KSamplerSelect", "euler")[0]
    sigmas = host.call("BasicScheduler", clone, "normal", 6, 1.0)[0]
    noise = host.call("RandomNoise", 3)[0]
    host.call("SamplerCustomAdvanced", noise, guider, sampler, sigmas, latent())
    assert counter.cond_passes == 6 and counter.uncond_passes == 0


def test_zero_strength_gives_exactly_the_unguided_result(host, tiny_model, trained):
    positive, negative = make_conds()
    unguided = ksampler(host, tiny_model, positive, negative, cfg=1.0, steps=6)
    off = ksampler(host, load(host, tiny_model, strength=0.0), positive, negative, cfg=6.0, steps=6)
    assert (off - unguided).abs().max().item() == 0.0
    on = ksampler(host, load(host, tiny_model), positive, negative, cfg=6.0, steps=6)
    assert (on - unguided).abs().max().item() > 0.0


def test_guidance_scale_comes_from_the_sampler_or_from_the_node(host, tiny_model, trained):
    positive, negative = make_conds()
    from_cfg = load(host, tiny_model)
    assert not torch.equal(ksampler(host, from_cfg, positive, negative, cfg=2.0, steps=4),
                           ksampler(host, from_cfg, positive, negative, cfg=7.0, steps=4))
    fixed = load(host, tiny_model, use_sampler_cfg=False, omega=4.0)
    assert torch.equal(ksampler(host, fixed, positive, negative, cfg=2.0, steps=4),
                       ksampler(host, fixed, positive, negative, cfg=7.0, steps=4))
    assert torch.equal(ksampler(host, fixed, positive, negative, cfg=7.0, steps=4),
                       ksampler(host, from_cfg, positive, negative, cfg=4.0, steps=4))


def test_adapter_weights_live_in_their_own_model_patcher_shared_by_clones(host, tiny_model, trained):
    import comfy.model_patcher

    model = load(host, tiny_model)
    weights = model.model_patches_models()
    assert len(weights) == 1 and isinstance(weights[0], comfy.model_patcher.ModelPatcher)
    assert isinstance(weights[0].model, pack_module(host, "fastguidance.guidance_adapters.adapters").GuidanceAdapters)
    assert model.clone().model_patches_models()[0] is weights[0]  # cloning does not copy the adapters
    with pytest.raises(Exception, match="already has guidance adapters"):
        load(host, model)


def test_the_adapters_patcher_is_of_the_class_the_hosts_loaders_use(host, tiny_model, trained, monkeypatch):
    """``comfy.model_patcher.CoreModelPatcher``: what 0.33's main.py makes ``ModelPatcherDynamic`` on NVIDIA GPUs
    and its own patch models use (comfy_extras/nodes_model_patch.py); 0.3.64 has none: ``ModelPatcher``."""
    import comfy.model_patcher

    class HostsCore(comfy.model_patcher.ModelPatcher):
        pass

    if not hasattr(comfy.model_patcher, "CoreModelPatcher"):
        assert type(load(host, tiny_model).model_patches_models()[0]) is comfy.model_patcher.ModelPatcher
        return
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", HostsCore)
    assert type(load(host, tiny_model).model_patches_models()[0]) is HostsCore


def test_the_pack_never_moves_the_adapters_a_call_on_another_device_uses_a_copy(host, tiny_model):
    """Where the host left the adapters on another device than the call's (a partial load keeps plain modules on
    its offload device): the call's adapters are a copy on the call's device and the module stays where the
    host put it. Here the call runs on the meta device (shapes only), the one device besides the CPU a CPU has."""
    from test_host_sync_host import random_adapters

    adapter_patch = pack_module(host, "nodes.adapter_patch")
    model = adapter_patch.install_adapters(tiny_model, random_adapters(host, tiny_model), 5.0, 1.0, None, None)
    settings = model.model_options["transformer_options"][adapter_patch.SETTINGS_KEY]
    adapters = settings.weights.model
    placed = {name: (tensor.device, tensor.data_ptr()) for name, tensor in adapters.state_dict().items()}
    seen = []

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append(transformer_options[adapter_patch.BOUND_KEY])
        return x

    meta = torch.device("meta")
    adapter_patch.adapter_apply_model(executor, torch.zeros(1, 4, 8, 8, device=meta), torch.ones(1, device=meta),
                                      c_crossattn=torch.zeros(1, 77, 64, device=meta),
                                      transformer_options={adapter_patch.SETTINGS_KEY: settings,
                                                           "cond_or_uncond": [0]})
    assert {name: (tensor.device, tensor.data_ptr()) for name, tensor in adapters.state_dict().items()} == placed
    assert seen[0].adapters is not adapters and seen[0].embedding.device == meta


def test_the_host_loads_the_adapters_with_the_model_and_unloading_leaves_none_on_the_load_device(host, tiny_model,
                                                                                                trained):
    """After sampling the adapters' patcher is among the host's loaded models; after the host unloads (as when
    memory is needed), every adapter tensor is on its offload device. On a CPU both devices are the CPU: there
    this checks the host's accounting; on a GPU also that nothing of the adapters is left in VRAM."""
    import comfy.model_management

    model = load(host, tiny_model)
    weights = model.model_patches_models()[0]
    positive, negative = make_conds()
    ksampler(host, model, positive, negative, cfg=6.0, steps=3)
    assert any(entry.model is weights for entry in comfy.model_management.current_loaded_models)
    comfy.model_management.unload_all_models()
    assert not any(entry.model is weights for entry in comfy.model_management.current_loaded_models)
    devices = {tensor.device for tensor in [*weights.model.parameters(), *weights.model.buffers()]}
    assert devices == {torch.device(weights.offload_device)}
    assert weights.model.model_loaded_weight_memory == 0


def half_precision_model(dtype: torch.dtype):
    """The tiny UNet (same seeded values) built in ``dtype``, as the host builds a bf16 or fp16 checkpoint."""
    import comfy.supported_models

    model = comfy.supported_models.SD15({**host_models.tiny_unet_config(), "dtype": dtype}).get_model({})
    host_models.seeded_weights(model, 0, attn2_std=0.1, std=0.05)
    return host_models.patcher(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_run_in_a_half_precision_models_dtype_within_tolerance(host, tiny_model, trained, monkeypatch, dtype):
    """On a bf16 or fp16 model the attach points' adapters are cast to its dtype (half their memory, no conversion
    of the model's activations to fp32 and back at every attach point); the conditioner and the adapters'
    attention stay fp32. Tolerance: at every attach point of a sampling (KSampler, 6 steps), the adapter's
    output is within 3% (relative norm) of the fp32 adapter's on the same input (measured at most 1.5% in bf16,
    0.16% in fp16). An fp32 model keeps fp32 adapters (the parity tests above)."""
    adapters_core = pack_module(host, "fastguidance.guidance_adapters.adapters")
    adapter_patch = pack_module(host, "nodes.adapter_patch")
    model = half_precision_model(dtype)

    def adapters():
        loaded = adapters_core.load_adapters(trained[0])[0]
        with torch.no_grad():  # six training steps leave them near their start: make what they add count
            for adapter in loaded.adapters.values():
                adapter.out.weight.mul_(20.0)
        return loaded

    in_model_dtype = adapter_patch.install_adapters(model, adapters(), 5.0, 1.0, None, None)
    in_fp32 = adapter_patch.install_adapters(model, adapters(), 5.0, 1.0, None, None, compute_dtype=torch.float32)
    weights, fp32_weights = in_model_dtype.model_patches_models()[0], in_fp32.model_patches_models()[0]
    assert {p.dtype for p in weights.model.adapters.parameters()} == {dtype}
    assert {p.dtype for p in weights.model.conditioner.parameters()} == {torch.float32}
    half_bytes = sum(p.numel() for p in weights.model.adapters.parameters()) * 2  # what the cast saved
    assert fp32_weights.model_size() - weights.model_size() == half_bytes
    calls, bound_call = [], adapters_core.BoundAdapters.__call__
    monkeypatch.setattr(adapters_core.BoundAdapters, "__call__",
                        lambda bound, name, n: calls.append((bound, name, n)) or bound_call(bound, name, n))
    positive, negative = make_conds()
    ksampler(host, in_model_dtype, positive, negative, cfg=6.0, steps=6)
    assert len(calls) == 6 * len(weights.model.adapters) and {n.dtype for _, _, n in calls} == {dtype}
    with torch.no_grad():
        for bound, name, n in calls:
            key = name.replace(".", "__")
            half = bound.adapters.adapters[key].delta(n, bound.embedding, bound.tokens, bound.mask)
            full = fp32_weights.model.adapters[key].delta(n, bound.embedding, bound.tokens, bound.mask)
            assert half.dtype == dtype and ((half.float() - full).norm() / full.norm()).item() < 0.03, name
    assert {p.dtype for p in load(host, tiny_model).model_patches_models()[0].model.parameters()} == {torch.float32}


def test_adapters_of_another_model_or_architecture_are_refused(host, tiny_model, trained, caplog):
    path = trained[0]
    adapters_module = pack_module(host, "fastguidance.guidance_adapters.adapters")
    adapters, metadata = adapters_module.load_adapters(path)
    other = host_models.patcher(host_models.tiny_model(seed=5))
    with pytest.raises(Exception, match="trained on another SD15 model.*allow_other_model"):
        load(host, other)
    assert load(host, other, allow_other_model=True) is not None
    assert "trained on another SD15 model" in caplog.text
    adapters_module.save_adapters(adapters, path.parent / "sdxl.safetensors", {**metadata, "architecture": "SDXL"})
    with pytest.raises(Exception, match="trained for a SDXL model and this model is SD15"):
        load(host, tiny_model, "sdxl.safetensors")
    spec = dict(adapters.spec.to_dict(), attach_points={"input.1.0": 32})
    fewer = adapters_module.GuidanceAdapters(adapters_module.AdapterSpec(**spec))
    adapters_module.save_adapters(fewer, path.parent / "fewer.safetensors", metadata)
    with pytest.raises(Exception, match="other attach points"):
        load(host, tiny_model, "fewer.safetensors")


class FluxClip(FakeClip):
    """Tokens of width 64 and a pooled vector of width 16 (Flux's ``y``)."""

    def encode_from_tokens_scheduled(self, text):
        [[tokens, _]] = super().encode_from_tokens_scheduled(text)
        generator = torch.Generator().manual_seed(len(text))
        return [[tokens[:, :16], {"pooled_output": torch.randn(1, 16, generator=generator)}]]


@pytest.fixture(scope="module")
def flux_model(host):
    return host_models.patcher(host_models.tiny_flux_model(seed=0))


def test_a_flux_dit_trains_and_runs_with_adapters_after_its_double_blocks(host, flux_model, adapter_folder,
                                                                          training_steps):
    """On 0.33 gradients flow through Flux's rope only while the host's training flag is on (COMFYUI.md §7)."""
    import comfy.sample

    points = pack_module(host, "nodes.adapter_patch").attach_points(flux_model)
    assert points == {"double_block.0": 64, "double_block.1": 64}
    flag_before = host_training_flag()
    train(host, flux_model, FluxClip(), kind="offset", scheduler="simple")
    assert_adapters_trained(training_steps, flag_before)
    adapters, metadata = pack_module(host, "fastguidance.guidance_adapters.adapters").load_adapters(adapter_folder / "tiny.safetensors")
    assert metadata["architecture"] == "Flux" and adapters.spec.pooled_dim == 16 and adapters.spec.kind == "offset"
    clip = FluxClip()
    positive, negative = clip.encode_from_tokens_scheduled("a red cube"), clip.encode_from_tokens_scheduled("")
    empty = torch.zeros(1, 16, 8, 8)

    def sample(model, cfg):
        return comfy.sample.sample(model, torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), 4, cfg,
                                   "euler", "simple", positive, negative, empty, disable_pbar=True, seed=0)

    clone, counter = counted(load(host, flux_model))
    guided = sample(clone, 4.0)
    assert counter.cond_passes == 4 and counter.uncond_passes == 0
    unguided = sample(flux_model, 1.0)
    assert (sample(load(host, flux_model, strength=0.0), 4.0) - unguided).abs().max().item() == 0.0
    assert (guided - unguided).abs().max().item() > 0.0
