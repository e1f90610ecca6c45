"""Device↔host traffic of the per-call path, counted per model call (issue 20).

On a GPU a device→host read makes the CPU wait for every kernel already queued, and a blocking
host→device copy (``torch.tensor(list, device=…)``, ``.to(device)`` of a CPU tensor) does too; either
one in the middle of a model call leaves the GPU idle while the next call is being queued. The engine
documents one read per call (``GuidanceRun._read_host_values``: the call's sigma and the cosines of
the previous FULL call); everything else of a call must stay on the device.

Each call of the core sampler's guided denoiser (plan, the toy model, complete, the CFG combination)
is counted with :class:`host_traffic.TrafficCounter` (a torch dispatch mode: what counts is listed
there), for every method and the combinations. The same runs on CUDA (skipped without a GPU) run under
``torch.cuda.set_sync_debug_mode("error")`` around every call, with only the documented read allowed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from fastguidance.research import sampling
from fastguidance.guidance_adapters.adapters import AdapterSpec, GuidanceAdapters, adapter_row_scale
from fastguidance.engine import Action, GuidanceRun
from fastguidance.guidance_adapters.policy import AdapterGuidance
from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.compress_guidance import CompressGuidance
from fastguidance.linear_ag import LinearAG, LinearAGCalibration
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas
from host_traffic import CallTraffic, TrafficCounter, count_host_reads, summary
from toy_models import GaussianModel, ScriptedCosineModel

SCHEDULE = DiscreteVPSchedule()
STEPS = 10


@contextlib.contextmanager
def counted_calls(monkeypatch, device: torch.device):
    """Count the traffic of every call of the core sampler's guided denoiser (plan, model, complete, CFG)."""
    counter = TrafficCounter()
    count_host_reads(counter, monkeypatch)
    original_call = sampling.GuidedDenoiser.__call__
    original_read = GuidanceRun._read_host_values

    def counted(self, x, sigma):
        with counter.call(), _sync_checked(device):
            return original_call(self, x, sigma)

    def documented_read(self, sigma):
        with _sync_allowed(device):
            return original_read(self, sigma)

    monkeypatch.setattr(sampling.GuidedDenoiser, "__call__", counted)
    monkeypatch.setattr(GuidanceRun, "_read_host_values", documented_read)
    yield counter


@contextlib.contextmanager
def _sync_checked(device: torch.device):
    """On CUDA, any synchronising call raises inside (``set_sync_debug_mode("error")``)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _sync_allowed(device: torch.device):
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# -- models -------------------------------------------------------------------------------------


def scripted_model(device: torch.device, rates=(1.0, 0.4), batch: int = 2) -> ScriptedCosineModel:
    """The scripted-cosine toy model with its tensors on ``device``; samples latch at different steps."""
    model = ScriptedCosineModel(shape=(batch, 4, 8, 8), rates=list(rates)[:batch])
    model.e_c, model.e_perp, model.rates = model.e_c.to(device), model.e_perp.to(device), model.rates.to(device)
    return model


class LinearUncondModel:
    """The LinearAG test model (tests/test_linear_ag.py): the uncond is exactly ``a·c + b·x + bias``."""

    def __init__(self, device: torch.device, a=0.5, b=0.2, bias=0.1, shape=(3, 8, 8), seed=0):
        self.mean = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
        self.a, self.b, self.bias = a, b, bias

    def __call__(self, x, sigma, conds):
        view = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        cond = self.mean + 0.25 / (0.25 + view**2) * (x - self.mean)
        return [cond if name == "cond" else self.a * cond + self.b * x + self.bias for name in conds]


class AdapterToyModel:
    """A conditional model with guidance adapters on one attach point, run as the host runs them.

    Every call evaluates its conditionings as one batch (cond rows, then uncond rows: the host's
    ``cond_or_uncond``), binds the adapters once for the call with ω, σ and the prompt tokens, and scales
    the adapter output per row (``strength`` on cond rows, 0 on uncond rows: :func:`adapter_row_scale`).
    """

    def __init__(self, device: torch.device, strength: float, channels: int = 4):
        torch.manual_seed(0)
        self.adapters = GuidanceAdapters(AdapterSpec({"a": channels}, text_dim=6, pooled_dim=6, hidden=8,
                                                     embed_dim=16)).to(device).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(1)
        self.tokens = {name: torch.randn(1, 3, 6, generator=generator).to(device) for name in ("cond", "uncond")}
        self.mix = torch.randn(channels, channels, generator=generator).to(device) / channels
        self.strength, self.omega = strength, 5.0

    def __call__(self, x, sigma, conds):
        batch = x.shape[0]
        xs, sigmas = torch.cat([x] * len(conds)), torch.cat([sigma] * len(conds))
        tokens = torch.cat([self.tokens[name].expand(batch, -1, -1) for name in conds])
        kinds = [0 if name == "cond" else 1 for name in conds]
        scale = adapter_row_scale(kinds, xs.shape[0], self.strength, xs.device)
        omega = torch.full((xs.shape[0],), self.omega, device=xs.device)
        bound = self.adapters.bind(omega, sigmas, tokens, tokens.mean(dim=1), row_scale=scale)
        n = (xs.flatten(2).transpose(1, 2) @ self.mix)  # [B, tokens, channels]
        n = bound("a", n)
        view = sigmas.reshape(-1, *([1] * (x.dim() - 1)))
        out = xs - view * 0.1 * n.transpose(1, 2).reshape(xs.shape)
        return list(out.chunk(len(conds)))


# -- scenarios ----------------------------------------------------------------------------------


def paper_ag(**settings) -> AdaptiveGuidance:
    """AG on the noise cosine that ScriptedCosineModel scripts: the two samples latch at different steps."""
    return AdaptiveGuidance(**{"cosine_space": "noise", "convergence": 1.0, "threshold": 0.99, **settings})


def linear_ag_coefficients():
    calibration = LinearAGCalibration(2)
    for run in range(3):
        start = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(100 + run))
        sampling.sample(LinearUncondModel(torch.device("cpu")), start, sigmas(), "cond", "uncond", 5.0, "euler",
                        [calibration.policy()])
    return calibration.fit(1e-8, {"sampler": "euler", "scheduler": "karras", "name": "test.safetensors"})


def sigmas(steps: int = STEPS):
    return make_sigmas(SCHEDULE, "karras", steps)


@dataclass(frozen=True)
class Scenario:
    name: str
    model: Callable[[torch.device], object]
    policies: Callable[[], list]
    sampler: str = "euler"
    shape: tuple = (2, 4, 8, 8)
    steps: int = STEPS
    reads_per_call: int = 1  # the documented read; 0 where no policy needs the sigma on the host
    #: what the run must have done for the scenario to test what it names (e.g. a mixed batch)
    check: Callable[[GuidanceRun], bool] = lambda run: True


def mixed(run: GuidanceRun) -> bool:
    """Some call's samples took different actions (the per-sample mask path)."""
    return any(len(set(record.actions)) > 1 for record in run.records)


def _linear_ag(**settings):
    coefficients = _linear_ag.cache if hasattr(_linear_ag, "cache") else linear_ag_coefficients()
    _linear_ag.cache = coefficients
    return LinearAG(coefficients, **settings)


SCENARIOS = [
    Scenario("ag cond_only (mixed batch)", scripted_model, lambda: [paper_ag()], check=mixed),
    Scenario("ag cond_only, dpm_2 midpoints", scripted_model, lambda: [paper_ag()], sampler="dpm_2", check=mixed),
    Scenario("ag reuse (mixed batch)", scripted_model, lambda: [paper_ag(after_cutoff="reuse")], check=mixed),
    Scenario("ag denoised defaults", scripted_model, lambda: [AdaptiveGuidance()]),
    Scenario("compg reuse", scripted_model, lambda: [CompressGuidance(mode="reuse")]),
    Scenario("compg compress", scripted_model, lambda: [CompressGuidance(mode="compress")]),
    Scenario("ag + compg compress (mixed batch, weighted)", scripted_model,
             lambda: [paper_ag(), CompressGuidance(mode="compress", compression=2.0)], check=mixed),
    Scenario("ag + compg reuse (mixed batch)", scripted_model,
             lambda: [paper_ag(after_cutoff="reuse"), CompressGuidance(mode="reuse", compression=2.0)], check=mixed),
    Scenario("linear_ag alternate", LinearUncondModel, lambda: [_linear_ag()], shape=(2, 3, 8, 8),
             check=lambda run: any(Action.ESTIMATE in record.actions for record in run.records)),
    Scenario("linear_ag interpolated sigmas", LinearUncondModel,
             lambda: [_linear_ag(interpolate_sigmas=True, mode="after_step")], steps=13, shape=(2, 3, 8, 8),
             check=lambda run: any(Action.ESTIMATE in record.actions for record in run.records)),
    Scenario("linear_ag + ag", LinearUncondModel,
             lambda: [_linear_ag(mode="after_step", after_step=2), AdaptiveGuidance(cosine_space="noise", threshold=0.9)],
             shape=(2, 3, 8, 8)),
    Scenario("adapters, strength 1", lambda device: AdapterToyModel(device, 1.0),
             lambda: [AdapterGuidance(5.0, 1.0)], reads_per_call=0),
    Scenario("adapters, strength 0.5", lambda device: AdapterToyModel(device, 0.5),
             lambda: [AdapterGuidance(5.0, 0.5)], reads_per_call=0),
    Scenario("adapters + ag", lambda device: AdapterToyModel(device, 0.5),
             lambda: [AdapterGuidance(5.0, 0.5), AdaptiveGuidance()]),
    Scenario("adapters under plain cfg (cond and uncond rows in one batch)",
             lambda device: AdapterToyModel(device, 0.5), lambda: [], reads_per_call=0),
    Scenario("gaussian, ag + compg, batch 3", lambda device: GaussianModel(),
             lambda: [AdaptiveGuidance(cosine_space="noise", threshold=0.999, convergence=1.0),
                      CompressGuidance(compression=3.0)], shape=(3, 2, 4, 4)),
]


def run_scenario(scenario: Scenario, device: torch.device, monkeypatch) -> tuple[list[CallTraffic], GuidanceRun | None]:
    model = scenario.model(device)
    policies = scenario.policies()  # built outside the counted calls (files and coefficients load here)
    start = torch.randn(*scenario.shape, generator=torch.Generator().manual_seed(3)).to(device)
    with counted_calls(monkeypatch, device) as counter:
        result = sampling.sample(model, start, sigmas(scenario.steps), "cond", "uncond", 5.0, scenario.sampler, policies)
    assert torch.isfinite(result.latent).all()
    return counter.calls, result.run


def check_scenario(scenario: Scenario, device: torch.device, monkeypatch) -> None:
    calls, run = run_scenario(scenario, device, monkeypatch)
    text = summary(calls)
    assert calls, "the sampler made no model call"
    if run is not None:
        assert len(calls) == len(run.records)
        assert scenario.check(run), f"{scenario.name}: the run did not exercise what the scenario names"
    assert all(call.reads == scenario.reads_per_call for call in calls), text
    assert all(call.blocking_uploads == 0 and call.async_uploads == 0 for call in calls), text
    assert all(call.host_tensors == 0 for call in calls), text


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
def test_each_model_call_reads_at_most_the_documented_value_and_copies_nothing_to_the_device(scenario, monkeypatch):
    check_scenario(scenario, torch.device("cpu"), monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the same runs under "
                    "torch.cuda.set_sync_debug_mode('error') around every model call")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
def test_on_cuda_no_call_synchronises_except_the_documented_read(scenario, monkeypatch):
    check_scenario(scenario, torch.device("cuda"), monkeypatch)


def test_the_counter_sees_the_regressions_it_guards_against(monkeypatch):
    """A per-call ``torch.tensor(flags, device=…)`` and an ``.item()`` are counted on CPU."""

    class Regressed(AdaptiveGuidance):
        def propose(self, state, context):
            torch.tensor([True, False])
            torch.ones(1).item()
            torch.ones(2).tolist()
            return super().propose(state, context)

    model = scripted_model(torch.device("cpu"))
    with counted_calls(monkeypatch, torch.device("cpu")) as counter:
        sampling.sample(model, torch.randn(2, 4, 8, 8), sigmas(), "cond", "uncond", 5.0, "euler", [Regressed()])
    assert all(call.host_tensors == 1 and call.reads == 3 for call in counter.calls), summary(counter.calls)


def test_a_run_without_sigma_reads_fills_its_records_at_the_end():
    """Adapters alone need nothing from the device per call; the records get their sigmas and steps when the
    run finishes (one read for the whole run), the same as a run that reads them per call."""
    model = AdapterToyModel(torch.device("cpu"), 1.0)
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    result = sampling.sample(model, start, sigmas(), "cond", "uncond", 5.0, "dpm_2", [AdapterGuidance(5.0, 1.0)])
    reading = sampling.sample(model, start, sigmas(), "cond", "uncond", 5.0, "dpm_2",
                              [AdapterGuidance(5.0, 1.0), CompressGuidance(compression=1.0)])
    assert torch.equal(result.latent, reading.latent)
    assert [(r.step, r.sigma) for r in result.run.records] == [(r.step, r.sigma) for r in reading.run.records]
    assert not any(math.isnan(record.sigma) for record in result.run.records)
    assert result.run.to_dict()["records"] == reading.run.to_dict()["records"]


def test_adapter_row_scale_is_a_number_where_rows_agree_and_a_device_tensor_where_they_differ():
    assert adapter_row_scale(None, 4, 1.0, "cpu") is None
    assert adapter_row_scale([0], 4, 0.5, "cpu") == 0.5
    assert adapter_row_scale([0, 0], 4, 1.0, "cpu") is None
    mixed = adapter_row_scale([1, 0, 1], 6, 0.5, "cpu")
    assert mixed.dtype == torch.float32 and mixed.tolist() == [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]


def test_sample_masks_are_built_per_pattern_and_kept_for_the_run():
    run = GuidanceRun([], [10.0, 1.0, 0.0], batch_size=5)
    like = torch.zeros(5, 2, 3, 3)
    for flags in ([True, False, True, True, False], [False] * 5, [True] * 5, [False, True, True, False, True]):
        mask = run._sample_mask(flags, like)
        assert mask.shape == (5, 1, 1, 1) and mask.reshape(-1).tolist() == flags
        assert run._sample_mask(list(flags), like) is mask  # kept: built once per pattern, device and rank
