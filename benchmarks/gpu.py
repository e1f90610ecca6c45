"""GPU benchmark in the real host: wall time of each method against plain CFG, where users run (issue 20).

Builds an SDXL-size UNet (2.6 B parameters) and a Flux-size DiT (Flux.1 schnell's shape: 19 double and 38
single blocks, width 3072, 11.9 B parameters) with ComfyUI's own classes and random weights (the point is
timing, not pictures: nothing is downloaded), first on the ``meta`` device to check that they fit, then on
the GPU in fp16 and in bf16. Each model samples a 1024×1024 image (a 128×128 latent) with the host's
KSampler path (``comfy.sample.sample``: euler, ``simple`` schedule, cfg 5), interleaved and repeated:

- ``cfg``: the stock model, plain CFG (the reference);
- ``ag``: Adaptive Guidance with the cut forced halfway (the AG policy measures and reads its cosine on
  every guided call as usual but never latches, threshold above 1; a second policy proposes COND_ONLY from
  step N/2 on, which the engine's combination rule lets win), so every model and dtype cut at the same step;
- ``compg``: Compress Guidance, compression 4 (compress mode, the node's default);
- ``adapters``: guidance adapters with random weights (cross-attention kind, width 160, the trainer's
  defaults), one pass per step.

Printed and written as JSON (``--json``), per model, dtype and method: seconds per run and per step
(median of the repeats), the model evaluations against CFG's (evaluation ratio) and the wall-time ratio
against CFG's, the engine's own time per model call (host time of plan and complete without the
documented read; the time that read waits for queued GPU work; GPU time of the engine's kernels, by CUDA
events around ``complete``), peak GPU memory of the run, the adapters' bytes and the engine's per-run
tensors (guidance cache, masks). The JSON is rewritten after every model and dtype, so a run stopped by
its time limit still leaves what it measured; ``--budget`` skips what would start after that many seconds.

Run it with a ComfyUI checkout beside the project (``--comfyui PATH`` or ``COMFYUI_PATH``) and PyTorch
with CUDA; on one H200 the defaults take about 4 minutes. The import needs only ``comfy``, ``comfy_api``,
``comfy_execution`` and a few top-level files of the checkout, and of the host's requirements only
``torchsde`` (+ ``trampoline``), and on 0.33 ``comfy-aimdo`` and ``comfy-kitchen`` (its pure-Python
``py3-none-any`` wheel is enough); PyAV, which ``comfy_api`` imports for video nodes, is replaced by an
empty module when it is missing. For example::

    COMFYUI_PATH=/path/to/ComfyUI python3 benchmarks/gpu.py --json gpu_bench.json

``--smoke`` runs the same code on the CPU with tiny models of the same two families (a few seconds; the CI
suite's real-host tests run it: ``tests/comfy/test_gpu_benchmark.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_NAME = "fastguidance_pack"  # the pack imported as a package under this name (relative imports work)
METHODS = ("cfg", "ag", "compg", "adapters")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CFG_SCALE = 5.0


# -- the two model families, full size and smoke size ------------------------------------------------------


def sdxl_unet_config(dtype: torch.dtype, smoke: bool) -> dict:
    """SDXL's UNet as ComfyUI's model detection describes it (``comfy/model_detection.py``), or a tiny one."""
    config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "dtype": dtype, "in_channels": 4,
              "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
              "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
              "use_temporal_attention": False, "use_temporal_resblock": False}
    if smoke:
        config.update({"model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
                       "channel_mult": [1, 2], "transformer_depth_middle": 1, "context_dim": 64,
                       "num_head_channels": 16, "transformer_depth_output": [0, 0, 1, 1]})
    return config


def flux_config(smoke: bool) -> dict:
    """Flux.1 schnell's DiT (no guidance embedding: CFG runs two passes, as for any CFG model), or a tiny one."""
    import dataclasses as dc

    import comfy.ldm.flux.model

    config = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
              "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
              "guidance_embed": False}
    if smoke:
        config.update({"vec_in_dim": 16, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
                       "depth": 2, "depth_single_blocks": 1, "axes_dim": [8, 12, 12]})
    if "txt_ids_dims" in {f.name for f in dc.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []  # 0.33's FluxParams needs it ([] for Flux.1); 0.3.64's has no such field
    return config


@dataclass
class Family:
    name: str
    build: Callable[[torch.dtype, bool, torch.device], Any]  # → BaseModel on `device`
    latent_channels: int
    context: tuple[int, int]  # tokens, width
    pooled: int


def _sdxl(dtype: torch.dtype, smoke: bool, device: torch.device):
    import comfy.supported_models

    config = comfy.supported_models.SDXL(sdxl_unet_config(dtype, smoke))
    config.set_inference_dtype(dtype, None)
    return config.get_model({}, device=device)


def _flux(dtype: torch.dtype, smoke: bool, device: torch.device):
    import comfy.supported_models

    config = comfy.supported_models.Flux(flux_config(smoke))
    config.set_inference_dtype(dtype, None)
    return config.get_model({}, device=device)


FAMILIES = {
    "sdxl": Family("sdxl", _sdxl, 4, (77, 2048), 1280),
    "flux": Family("flux", _flux, 16, (256, 4096), 768),
}
SMOKE_CONTEXT = {"sdxl": (77, 64), "flux": (16, 64)}
SMOKE_POOLED = {"sdxl": 1280, "flux": 16}


def random_weights(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights with unit-variance layers (``std = 0.5/√fan_in``), zero biases and unit norms, on the
    module's device: activations stay finite in fp16 over the models' depth."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, 0.5 / math.sqrt(fan_in), generator=generator)
            elif "norm" in name or name.endswith("scale"):
                parameter.fill_(1.0)
            else:
                parameter.zero_()


def build_model(family: Family, dtype: torch.dtype, smoke: bool, device: torch.device, seed: int = 0):
    """The model on ``meta`` first (parameters counted, size checked), then materialised on ``device``."""
    import comfy.model_management
    import comfy.model_patcher

    meta = family.build(dtype, smoke, torch.device("meta"))
    parameters = sum(p.numel() for p in meta.diffusion_model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in meta.diffusion_model.parameters())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if weight_bytes > 0.7 * free:
            raise MemoryError(f"{family.name} in {dtype} needs {weight_bytes / 2**30:.1f} GiB of weights, "
                              f"{free / 2**30:.1f} GiB free")
    model = meta
    model.diffusion_model.to_empty(device=device)
    for buffer_name, buffer in model.diffusion_model.named_buffers():
        raise RuntimeError(f"{family.name}: buffer {buffer_name} would be left uninitialised by to_empty")
    random_weights(model.diffusion_model, seed)
    model.device = device
    # offload to the same device: unloading between models then moves nothing back to the host
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    return patcher, parameters, weight_bytes


# -- the pack, imported from this checkout ------------------------------------------------------------------


def import_host(comfyui_path: str, cpu: bool) -> None:
    """Make the checkout importable, with only what sampling needs (not ComfyUI's node registry)."""
    if comfyui_path not in sys.path:
        sys.path.insert(0, comfyui_path)
    if importlib.util.find_spec("av") is None:  # comfy_api imports PyAV for video nodes, which are not used here
        sys.meta_path.insert(0, _StubPackage("av"))
    # a CUDA torchvision next to a CPU torch cannot load its compiled ops; ComfyUI does not need them
    if cpu:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    import comfy.model_management  # noqa: F401  (device selection happens at import)


class _Placeholder(type):
    """A stand-in class whose attributes are stand-ins too (``ColorTrc.ARIB_STD_B67`` at import time)."""

    def __getattr__(cls, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Placeholder(f"{cls.__name__}.{attribute}", (), {"__module__": cls.__module__})


class _StubPackage(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a missing package and its submodules give empty modules whose names are placeholder classes
    (``from av.container import InputContainer`` works; using one fails). Only for what is never called."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name == self.root or name.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attribute: str):
            if attribute.startswith("__"):
                raise AttributeError(attribute)
            return _Placeholder(attribute, (), {"__module__": spec.name})

        module.__getattr__ = placeholder
        return module

    def exec_module(self, module) -> None:
        pass


def import_pack() -> dict[str, types.ModuleType]:
    """The pack's glue and core under :data:`PACK_NAME`, without the node registry (``nodes/__init__.py``)."""
    for name, path in ((PACK_NAME, PACK_DIR), (PACK_NAME + ".nodes", PACK_DIR / "nodes")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    names = {"engine_patch": "nodes.engine_patch", "adapter_patch": "nodes.adapter_patch",
             "engine": "fastguidance.engine", "adaptive_guidance": "fastguidance.adaptive_guidance",
             "compress_guidance": "fastguidance.compress_guidance", "adapters": "fastguidance.guidance_adapters.adapters"}
    return {key: importlib.import_module(f"{PACK_NAME}.{module}") for key, module in names.items()}


# -- instrumentation: the engine's time per call and its per-run tensors -------------------------------------


@dataclass
class EngineClock:
    """Per model call: host time of plan + complete without the documented read, the read's wait, and the GPU
    time of ``complete`` (CUDA events; only read once the run is over, so timing adds no synchronisation)."""

    host: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)
    events: list[tuple[Any, Any]] = field(default_factory=list)
    runs: list[Any] = field(default_factory=list)

    def reset(self) -> None:
        self.host, self.read, self.events, self.runs = [], [], [], []

    def per_call(self) -> dict[str, float | None]:
        calls = len(self.events) or len(self.host)
        if not calls:
            return {"calls": 0, "host_us": None, "read_wait_us": None, "device_us": None}
        device_ms = [start.elapsed_time(end) for start, end in self.events if start is not None]
        return {"calls": calls,
                "host_us": 1e6 * (sum(self.host) - sum(self.read)) / calls,
                "read_wait_us": 1e6 * sum(self.read) / calls,
                "device_us": 1e3 * sum(device_ms) / len(device_ms) if device_ms else None}


@contextlib.contextmanager
def instrumented(pack: dict, clock: EngineClock, device: torch.device):
    engine = pack["engine"]
    run_class = engine.GuidanceRun
    originals = {name: getattr(run_class, name) for name in ("__init__", "plan", "complete", "_read_host_values")}
    cuda = device.type == "cuda"

    def init(self, *args, **kwargs):
        originals["__init__"](self, *args, **kwargs)
        clock.runs.append(self)

    def timed(original, times: list):
        def wrapper(self, *args):
            start = time.perf_counter()
            try:
                return original(self, *args)
            finally:
                times.append(time.perf_counter() - start)
        return wrapper

    plan, read = timed(originals["plan"], clock.host), timed(originals["_read_host_values"], clock.read)

    def complete(self, plan, x, cond, uncond):
        begin = end = None
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        try:
            return originals["complete"](self, plan, x, cond, uncond)
        finally:
            clock.host.append(time.perf_counter() - start)
            if cuda:
                end.record()
            clock.events.append((begin, end))

    report = pack["engine_patch"]._report
    pack["engine_patch"]._report = lambda config, host_run, name: host_run.run.finish()  # no per-run logging
    for name, function in (("__init__", init), ("plan", plan), ("complete", complete), ("_read_host_values", read)):
        setattr(run_class, name, function)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(run_class, name, function)
        pack["engine_patch"]._report = report


def run_tensor_bytes(run: Any) -> int:
    """Bytes of what an engine run keeps on the device between calls (guidance cache, masks, pending values)."""
    tensors = [run._guidance_cache] + list(getattr(run, "_masks", {}).values())
    if run._pending_cosine is not None:
        tensors.append(run._pending_cosine[1])
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


# -- the methods --------------------------------------------------------------------------------------------


def method_models(pack: dict, model, family: Family, steps: int, context_width: int, pooled: int) -> dict:
    """Each method's MODEL, as the pack's nodes make them (``install_policy``, ``install_adapters``)."""
    engine, install_policy = pack["engine"], pack["engine_patch"].install_policy
    AdaptiveGuidance, CompressGuidance = pack["adaptive_guidance"].AdaptiveGuidance, pack["compress_guidance"].CompressGuidance
    adapter_patch, adapters_core = pack["adapter_patch"], pack["adapters"]
    half = steps // 2

    class ForcedCut(engine.GuidancePolicy):
        """COND_ONLY from step N/2 on for every sample: AG's cut at a fixed step, the same on every model."""

        name = "forced_cut"

        def propose(self, state, context):
            return engine.Action.COND_ONLY if context.step >= half else None

    never = AdaptiveGuidance(threshold=1.0001)  # measures and reads the cosine, never latches
    ag = install_policy(install_policy(model, never, None), ForcedCut(), None)
    compg = install_policy(model, CompressGuidance(compression=4.0), None)
    torch.manual_seed(0)
    spec = adapters_core.AdapterSpec(adapter_patch.attach_points(model), context_width, pooled, "cross_attention", 160)
    adapters = adapters_core.GuidanceAdapters(spec).eval().requires_grad_(False)
    with_adapters = adapter_patch.install_adapters(model, adapters, None, 1.0, None, None)
    return {"cfg": model, "ag": ag, "compg": compg, "adapters": with_adapters}, adapters


def conditioning(family: Family, context: tuple[int, int], pooled: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, *context, generator=generator), {"pooled_output": torch.randn(1, pooled, generator=generator)}]]
    negative = [[torch.randn(1, *context, generator=generator) * 0.1,
                 {"pooled_output": torch.randn(1, pooled, generator=generator) * 0.1}]]
    return positive, negative


def sample_once(model, latent: torch.Tensor, steps: int, positive, negative, device: torch.device) -> float:
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, CFG_SCALE, "euler", "simple", positive, negative, latent,
                              disable_pbar=True, seed=3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(out).all():
        sys.stderr.write("note: non-finite values in a sample (random weights); timing is unaffected\n")
    return seconds


def measure(pack: dict, family: Family, dtype_name: str, options, device: torch.device, deadline: float) -> dict:
    import comfy.model_management

    dtype = DTYPES[dtype_name]
    context = SMOKE_CONTEXT[family.name] if options.smoke else family.context
    pooled = SMOKE_POOLED[family.name] if options.smoke else family.pooled
    began = time.perf_counter()
    model, parameters, weight_bytes = build_model(family, dtype, options.smoke, device)
    built = time.perf_counter() - began
    y_dim = 2816 if family.name == "sdxl" else pooled  # what the adapters read: the model's `y` (SDXL: its adm vector)
    models, adapters = method_models(pack, model, family, options.steps, context[1], y_dim)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.parameters())
    positive, negative = conditioning(family, context, pooled, seed=1)
    latent = torch.zeros(1, family.latent_channels, options.latent, options.latent)
    clock = EngineClock()
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    details: dict[str, dict] = {}
    skipped = []
    with instrumented(pack, clock, device), torch.inference_mode():
        for name in METHODS:  # warm-up: kernels, autotuning, the host's first load
            sample_once(models[name], latent, min(2, options.steps), positive, negative, device)
        for repeat in range(options.repeats):
            for name in METHODS:  # interleaved, so that drift in the machine's speed hits every method alike
                if time.perf_counter() > deadline and repeat > 0:
                    skipped.append(f"{name} repeat {repeat + 1}")
                    continue
                clock.reset()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[name].append(sample_once(models[name], latent, options.steps, positive, negative, device))
                run = clock.runs[-1] if clock.runs else None
                summary = run.summary() if run is not None else None
                details[name] = {
                    "evaluations": summary.evaluations if summary else 2 * options.steps,
                    "cfg_evaluations": summary.cfg_evaluations if summary else 2 * options.steps,
                    "engine_per_call": clock.per_call(),
                    "run_tensor_bytes": run_tensor_bytes(run) if run is not None else 0,
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                }
    cfg_seconds = statistics.median(times["cfg"])
    rows = []
    for name in METHODS:
        seconds = statistics.median(times[name])
        evaluation_ratio = details[name]["evaluations"] / details[name]["cfg_evaluations"]
        wall_ratio = seconds / cfg_seconds
        peak = details[name]["peak_memory_bytes"]
        cfg_peak = details["cfg"]["peak_memory_bytes"]
        rows.append({
            "model": family.name, "dtype": dtype_name, "method": name, "repeats": len(times[name]),
            "seconds": seconds, "seconds_all": times[name], "seconds_per_step": seconds / options.steps,
            "evaluations": details[name]["evaluations"], "cfg_evaluations": details[name]["cfg_evaluations"],
            "evaluation_ratio": evaluation_ratio, "wall_ratio": wall_ratio,
            "wall_vs_evaluation_gap": wall_ratio / evaluation_ratio - 1.0,
            "engine_per_call": details[name]["engine_per_call"],
            "run_tensor_bytes": details[name]["run_tensor_bytes"],
            "adapter_bytes": adapter_bytes if name == "adapters" else 0,
            "peak_memory_bytes": peak,
            "peak_memory_over_cfg_bytes": None if peak is None or cfg_peak is None else peak - cfg_peak,
        })
    result = {"model": family.name, "dtype": dtype_name, "parameters": parameters, "weight_bytes": weight_bytes,
              "build_seconds": built, "latent": list(latent.shape), "skipped": skipped, "rows": rows}
    del models, model, adapters
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()
    return result


def format_row(row: dict) -> str:
    engine = row["engine_per_call"]

    def us(value):
        return "-" if value is None else f"{value:.0f}"

    peak = row["peak_memory_bytes"]
    return (f"{row['model']:5} {row['dtype']:4} {row['method']:8} {row['seconds_per_step'] * 1e3:9.1f} ms/step  "
            f"evals {row['evaluation_ratio']:.3f}  wall {row['wall_ratio']:.3f}  gap {row['wall_vs_evaluation_gap']:+.1%}  "
            f"engine host {us(engine['host_us'])} µs, read wait {us(engine['read_wait_us'])} µs, "
            f"GPU {us(engine['device_us'])} µs/call  peak {'-' if peak is None else f'{peak / 2**30:.2f} GiB'}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout (or COMFYUI_PATH)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few steps: checks the script")
    parser.add_argument("--models", default="sdxl,flux", help="comma-separated: sdxl, flux")
    parser.add_argument("--dtypes", default=None, help="comma-separated: fp16, bf16, fp32 (default fp16,bf16; smoke fp32)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; smoke 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3; smoke 1)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 128 = 1024×1024; smoke 16)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no further repeat starts")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every model and dtype)")
    options = parser.parse_args(argv)
    if not options.comfyui:
        parser.error("give a ComfyUI checkout: --comfyui PATH or COMFYUI_PATH")
    options.dtypes = options.dtypes or ("fp32" if options.smoke else "fp16,bf16")
    options.steps = options.steps or (4 if options.smoke else 20)
    options.repeats = options.repeats or (1 if options.smoke else 3)
    options.latent = options.latent or (16 if options.smoke else 128)
    if not options.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke to check the script on the CPU")
    device = torch.device("cpu" if options.smoke else "cuda")
    began = time.perf_counter()
    deadline = began + options.budget
    import_host(options.comfyui, cpu=device.type == "cpu")
    pack = import_pack()
    import comfy.model_management

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "comfyui": options.comfyui,
        "comfyui_version": _host_version(options.comfyui), "smoke": options.smoke, "steps": options.steps,
        "cfg": CFG_SCALE, "sampler": "euler", "scheduler": "simple", "measurements": [],
    }
    for family_name in options.models.split(","):
        for dtype_name in options.dtypes.split(","):
            if time.perf_counter() > deadline:
                results["measurements"].append({"model": family_name, "dtype": dtype_name, "skipped": "budget"})
                continue
            try:
                measured = measure(pack, FAMILIES[family_name], dtype_name, options, device, deadline)
            except MemoryError as error:
                measured = {"model": family_name, "dtype": dtype_name, "skipped": str(error)}
            results["measurements"].append(measured)
            for row in measured.get("rows", []):
                print(format_row(row), flush=True)
            results["seconds"] = time.perf_counter() - began
            if options.json:
                options.json.write_text(json.dumps(results, indent=2))
    comfy.model_management.unload_all_models()
    print(f"total {time.perf_counter() - began:.0f} s", flush=True)
    return results


def _host_version(path: str) -> str | None:
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
    except OSError:
        return None
    return text.split("=")[-1].strip().strip("\"'") if "=" in text else None


if __name__ == "__main__":
    main()
