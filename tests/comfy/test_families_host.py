"""Every model family that samples with CFG, on the real host (issue 18 §2).

Each family of ``host_models.FAMILIES`` is built tiny with the host's own classes, and each method
(Adaptive Guidance, Compress Guidance, LinearAG) runs on it two ways: as a MODEL patch in the stock
KSampler (KSamplerAdvanced for the two-model Wan 2.2 workflow) and as a GUIDER in SamplerCustomAdvanced
(LinearAG has no guider node: its patched MODEL in the stock CFGGuider). Two things are shown per case:

- **parity**: with settings that skip nothing, the result equals the stock sampler's exactly (0.0);
- **counted evaluations**: with settings that skip, the diffusion model's real forward passes (a forward
  pre-hook on ``diffusion_model`` counts the cond and uncond rows of every pass) equal the run record's
  evaluations, and something was skipped.

The README's compatibility table is generated from these tests' results (``scripts/compat_table.py``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import host_models
from conftest import empty_pack_folder

STEPS = 4
CFG = 5.0
SEED = 3
METHODS = ("adaptive", "compress", "linear_ag")
PATHS = ("patch", "guider")
CASES = [pytest.param(family.key, method, path, id=f"{family.key}-{method}-{path}")
         for family in host_models.FAMILIES for method in METHODS for path in PATHS]
#: settings that skip nothing / that skip. AG: a threshold above 1 never cuts; 0.5 on the denoised cosine
#: without the convergence condition cuts after the first step on every tiny model here. CompG: 1.0 guides
#: every step, 2.0 every other one. LinearAG: error bound 0 estimates nothing, after_step 1 every step but
#: the first.
NEVER = {"adaptive": {"threshold": 1.0001}, "compress": {"compression": 1.0},
         "linear_ag": {"mode": "error_bound", "error_bound": 0.0}}
SKIPPING = {"adaptive": {"threshold": 0.5}, "compress": {"compression": 2.0},
            "linear_ag": {"mode": "after_step", "error_bound": 0.3}}


def host_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:  # not importable before the host fixture put the checkout on the path
        return "this host"


@pytest.fixture(scope="session", autouse=True)
def _host_version_in_the_report(host, record_testsuite_property):
    """The host's version in the JUnit report, which ``scripts/compat_table.py record`` reads."""
    record_testsuite_property("comfyui_version", host_version())


@pytest.fixture(scope="module")
def built(host):
    """Per family: its ModelPatchers (two for the high/low-noise workflow), or the reason it cannot be built."""
    cache: dict[str, list | str] = {}

    def get(key: str):
        if key not in cache:
            family = host_models.family(key)
            try:
                count = 2 if family.two_models else 1
                cache[key] = [host_models.patcher(host_models.family_model(family, seed=seed)) for seed in range(count)]
            except host_models.FamilyUnavailable as error:
                cache[key] = f"{family.name} cannot be built on ComfyUI {host_version()}: {error}"
        if isinstance(cache[key], str):
            pytest.skip(cache[key])
        return cache[key]

    return get


def sampler_settings(host, family) -> tuple[str, str]:
    """The family's usual sampler and scheduler, where the host's KSampler offers them (LTX-Video's own
    scheduler is a separate node: ``simple`` stands in)."""
    import comfy.samplers

    scheduler = family.usual.scheduler if family.usual.scheduler in comfy.samplers.KSampler.SCHEDULERS else "simple"
    return family.usual.sampler, scheduler


@pytest.fixture(scope="module")
def linear_ag_files(host, built, tmp_path_factory):
    """Per family: LinearAG calibrations made by the Calibrate node, one per model, in a module-wide folder."""
    monkeypatch = pytest.MonkeyPatch()
    empty_pack_folder(tmp_path_factory.mktemp("linear_ag"), monkeypatch, "fastguidance_linear_ag")
    files: dict[str, list[str]] = {}

    def get(key: str) -> list[str]:
        if key not in files:
            family = host_models.family(key)
            sampler, scheduler = sampler_settings(host, family)
            positive, negative = host_models.family_conds(family)
            names = []
            for index, model in enumerate(built(key)):
                name = f"{key}_{index}"
                host.node("FastGuidance_LinearAGCalibrate", "1").execute(
                    model, positive, negative, host_models.family_latent(family, 2), 5, 2, sampler, scheduler, STEPS,
                    CFG, 2, 1e-3, name, False)
                names.append(name + ".safetensors")
            files[key] = names
        return files[key]

    yield get
    monkeypatch.undo()


def other_schedule_than_ksampler(host, family) -> bool:
    """Whether SamplerCustomAdvanced with BasicScheduler samples other sigmas than KSampler, for which LinearAG
    Calibrate calibrates: KSampler drops the penultimate sigma for some samplers (uni_pc, dpm_2). A LinearAG
    calibration then needs ``interpolate_sigmas`` on SamplerCustomAdvanced (without it the node refuses the run
    and says so)."""
    import comfy.samplers

    return sampler_settings(host, family)[0] in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS


def patched(host, method: str, model, settings: dict, coefficients: str | None, segment: bool):
    """The method's MODEL patch node applied to ``model`` (``segment``: LinearAG picks its coefficients by noise
    level, for a schedule other than the calibrated one)."""
    if method == "adaptive":
        return host.node("FastGuidance_AdaptiveGuidance").execute(
            model, settings["threshold"], 0.0, 1.0, "cond_only", cosine_space="denoised", convergence=1.0)[0]
    if method == "compress":
        return host.node("FastGuidance_CompressGuidance").execute(model, settings["compression"], 0, 1.0, "compress")[0]
    # a segment of the schedule (the two-model workflow) is matched to the calibration by noise level
    return host.node("FastGuidance_LinearAG").execute(model, coefficients, settings["mode"], 1, settings["error_bound"],
                                                      segment)[0]


def stock_guider(model, positive, negative):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    return guider


def guider_of(host, method: str, model, positive, negative, settings: dict, coefficients, segment: bool):
    """The method's GUIDER node (LinearAG, which has none: its patched MODEL in the stock CFGGuider)."""
    if method == "adaptive":
        return host.node("FastGuidance_AdaptiveGuider").execute(
            model, positive, negative, CFG, settings["threshold"], 0.0, 1.0, "cond_only", cosine_space="denoised",
            convergence=1.0)[0]
    if method == "compress":
        return host.node("FastGuidance_CompressGuider").execute(model, positive, negative, CFG,
                                                                settings["compression"], 0, 1.0, "compress")[0]
    return stock_guider(patched(host, method, model, settings, coefficients, segment), positive, negative)


def sample_ksampler(host, family, models, positive, negative):
    """KSampler, or for the two-model workflow two KSamplerAdvanced: high-noise steps, then low-noise steps."""
    sampler, scheduler = sampler_settings(host, family)
    latent = host_models.family_latent(family, 2)
    if len(models) == 1:
        return host.nodes.common_ksampler(models[0], SEED, STEPS, CFG, sampler, scheduler, positive, negative,
                                          latent)[0]["samples"]
    half = STEPS // 2
    high = host.call("KSamplerAdvanced", models[0], "enable", SEED, STEPS, CFG, sampler, scheduler, positive, negative,
                     latent, 0, half, "enable")[0]
    return host.call("KSamplerAdvanced", models[1], "disable", 0, STEPS, CFG, sampler, scheduler, positive, negative,
                     high, half, 10000, "disable")[0]["samples"]


def sample_custom(host, family, guiders, base_model):
    """SamplerCustomAdvanced, or for the two-model workflow two of them on the halves of SplitSigmas (the
    second with DisableNoise), as the host's Wan 2.2 template does with KSamplerAdvanced."""
    sampler_name, scheduler = sampler_settings(host, family)
    sampler = host.call("KSamplerSelect", sampler_name)[0]
    sigmas = host.call("BasicScheduler", base_model, scheduler, STEPS, 1.0)[0]
    latent = host_models.family_latent(family, 2)
    if len(guiders) == 1:
        return host.call("SamplerCustomAdvanced", host.call("RandomNoise", SEED)[0], guiders[0], sampler, sigmas,
                         latent)[0]["samples"]
    high_sigmas, low_sigmas = host.call("SplitSigmas", sigmas, STEPS // 2)[:2]
    high = host.call("SamplerCustomAdvanced", host.call("RandomNoise", SEED)[0], guiders[0], sampler, high_sigmas,
                     latent)[0]
    return host.call("SamplerCustomAdvanced", host.call("DisableNoise")[0], guiders[1], sampler, low_sigmas,
                     high)[0]["samples"]


@contextlib.contextmanager
def counted_forwards(models):
    """The ``cond_or_uncond`` rows of every real forward pass of the models' diffusion networks."""
    passes: list[list[int]] = []

    def hook(module, args, kwargs):
        passes.append(list(kwargs["transformer_options"]["cond_or_uncond"]))

    handles = [model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True) for model in models]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


def run_method(host, built, files, key: str, method: str, path: str, settings: dict):
    """Sample the family with the method (``files``: LinearAG's calibration per model); returns (result,
    counted forward rows)."""
    family = host_models.family(key)
    models = built(key)
    positive, negative = host_models.family_conds(family)
    segment = len(models) > 1 or (path == "guider" and other_schedule_than_ksampler(host, family))
    with counted_forwards(models) as passes:
        if path == "patch":
            methods = [patched(host, method, model, settings, file, segment) for model, file in zip(models, files)]
            out = sample_ksampler(host, family, methods, positive, negative)
        else:
            guiders = [guider_of(host, method, model, positive, negative, settings, file, segment)
                       for model, file in zip(models, files)]
            out = sample_custom(host, family, guiders, models[0])
    return out, passes


def stock_result(host, built, key: str, path: str):
    family = host_models.family(key)
    models = built(key)
    positive, negative = host_models.family_conds(family)
    if path == "patch":
        return sample_ksampler(host, family, models, positive, negative)
    return sample_custom(host, family, [stock_guider(model, positive, negative) for model in models], models[0])


def assert_counts_match_the_record(passes, family_runs):
    """Counted forward rows equal the runs' records: cond on every call, uncond where evaluated."""
    summaries = [run.summary() for run in family_runs]
    assert sum(len(rows) for rows in passes) == sum(summary.evaluations for summary in summaries)
    assert sum(rows.count(0) for rows in passes) == sum(summary.calls for summary in summaries)
    assert sum(rows.count(1) for rows in passes) == sum(s.calls - s.uncond_skipped for s in summaries)
    return sum(summary.uncond_skipped for summary in summaries)


def calibrations(linear_ag_files, built, key: str, method: str) -> list:
    """LinearAG's calibration file per model (made before the runs that are counted), else None per model."""
    return linear_ag_files(key) if method == "linear_ag" else [None] * len(built(key))


@pytest.mark.parametrize("key, method, path", CASES)
def test_parity_when_the_method_skips_nothing(host, built, linear_ag_files, runs, key, method, path):
    stock = stock_result(host, built, key, path)
    files = calibrations(linear_ag_files, built, key, method)
    before = len(runs)
    out, passes = run_method(host, built, files, key, method, path, NEVER[method])
    family_runs = runs[before:]
    assert len(family_runs) == len(built(key))
    assert (out - stock).abs().max().item() == 0.0
    assert assert_counts_match_the_record(passes, family_runs) == 0


@pytest.mark.parametrize("key, method, path", CASES)
def test_counted_evaluations_equal_the_run_record(host, built, linear_ag_files, runs, key, method, path):
    files = calibrations(linear_ag_files, built, key, method)
    before = len(runs)
    out, passes = run_method(host, built, files, key, method, path, SKIPPING[method])
    family_runs = runs[before:]
    assert len(family_runs) == len(built(key))
    assert torch.isfinite(out).all()
    assert assert_counts_match_the_record(passes, family_runs) > 0
