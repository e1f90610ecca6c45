"""The guidance engine: one run object per sampling run, policies that choose an action per step.

For every model-evaluation request of a sampler (one per step, several for midpoint samplers) the
host asks the run for a **plan**, evaluates what the plan says, and hands the predictions back to
the run, which returns the uncond prediction to use (real or estimated):

    plan = run.plan(sigma)                     # which action for each sample
    cond, uncond = evaluate(both if plan.evaluate_uncond else cond only)
    uncond_hat = run.complete(plan, x, cond, uncond_or_None)
    return cfg(cond, uncond_hat)

Actions (DESIGN.md §2):

- ``FULL``: cond and uncond are evaluated; policies learn from them (cosine, cached guidance, …);
- ``REUSE``: the guidance of the sample's last FULL call ``j`` is reused **in noise space**:
  ``û = c − (σ/σ_j)·g_j`` with ``g_j = c_j − u_j`` (Compress Guidance, Dinh et al., reuses the
  guidance gradient, i.e. ``ε_c − ε_u = −(c − u)/σ``), so CFG yields ``c + (s − 1)·(σ/σ_j)·g_j``.
  Reusing the denoised-space ``g_j`` unscaled would over-guide later steps by ``σ_j/σ`` (measured on
  the reference model: adherence 46% instead of 63% at 4 guided steps of 20);
- ``ESTIMATE``: ``û`` comes from the policy that proposed it (LinearAG's regression);
- ``COND_ONLY``: ``û = c``, so CFG yields ``c`` (Adaptive Guidance after its cutoff);
- ``ADAPTER``: the cond evaluation is itself guided (AGD adapters active on it), ``û = c``, so CFG
  yields the adapted prediction: one evaluation per call (Jensen et al., AGD).

A policy may also **weight the guidance of a call** (:meth:`GuidancePolicy.guidance_weight`): each
sample whose action still gives it a guidance term (FULL: the real ``c − u``; REUSE: the reused one;
ESTIMATE: ``c − û`` of the estimate) gets ``û_w = c − w·(c − û)``, so CFG yields
``c + w·(s − 1)·(c − û)``. Compress Guidance's ``compress`` mode uses it to put the guidance of the
skipped steps on the guided ones: when another policy replaces the real guidance of such a step by an
approximation (LinearAG's ESTIMATE, AG's REUSE), the approximation still stands for the covered steps.
COND_ONLY and ADAPTER samples have no guidance term to weight (AG's cutoff ends guidance; adapters
guide inside the model pass, at their own ω): the weight is not applied to them. Weights of several
policies multiply. The call's record holds the weight applied per sample (:attr:`CallRecord.weights`;
1.0 where none was), not the weight asked for. What the policies learn (cosine, cached guidance,
history) uses the unweighted predictions. The table of every pair is in docs/methods.md.

**The combination rule**, written once here: every policy proposes an action per sample (or has no
opinion, which means FULL). Per sample, the proposal with the highest rank wins, the ranks being
``FULL < REUSE < ESTIMATE < COND_ONLY < ADAPTER``: a sample is guided only while every policy wants it
guided, a policy that ends guidance (AG's cutoff) overrides one that approximates it (CompG's reuse),
and adapters, which put the guidance into the single pass, override all of them.
An action whose input is missing (REUSE before the sample had a FULL step) falls back to FULL.
The uncond is evaluated for the whole batch when any sample's action is FULL (the host evaluates
cond and uncond as whole batches); samples whose action is not FULL still get their estimate, so a
sample's result never depends on the other samples of its batch.

**Device↔host traffic per model call.** Policies decide on the host, so a call reads at most one
small tensor back from the device, in :meth:`GuidanceRun.plan` (:meth:`GuidanceRun._read_host_values`):
the call's sigma (one value) and, after a FULL call of a policy that measures a cosine (Adaptive
Guidance), that call's per-sample cosines (``B`` values), concatenated so they cross in one copy. The
cosines are computed on the device right after the evaluation and read at the start of the next call,
which needs them to decide (AG's latch applies at the call right after the one that measured it;
reading them later would change results). This read makes the host wait for the work already queued
on the device, once per call. Where no policy reads the sigma or step and no cosine is pending
(guidance adapters alone, :attr:`GuidancePolicy.reads_sigma`), the call reads nothing: the sigmas of
such calls stay on the device and fill the records in one read when the run finishes.
Nothing is copied from the host to the device during a call: per-sample masks are built on the
device with fills and kept per run (:meth:`GuidanceRun._sample_mask`), scalars (sigma, guidance
weight, LinearAG's coefficients) enter device arithmetic as Python numbers. Policy state (latches,
schedules, calibration tables) lives on the host as Python values, read from tensors before sampling
(when a policy is made or a run starts), never per call. Tested per method by ``tests/test_host_sync.py``.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .errors import InvalidInputError
from .guidance import COSINE_SPACES, per_sample_cosine
from .schedules import step_index

log = logging.getLogger("fastguidance")


class Action(enum.IntEnum):
    """What a model call does for one sample. The values are the ranks of the combination rule."""

    FULL = 0
    REUSE = 1
    ESTIMATE = 2
    COND_ONLY = 3
    ADAPTER = 4


#: actions that leave a sample a guidance term ``c − û`` for a guidance weight to scale (module docstring)
GUIDED_ACTIONS = frozenset({Action.FULL, Action.REUSE, Action.ESTIMATE})


@dataclass(frozen=True)
class StepContext:
    """What a policy knows about the model call it is asked about."""

    call: int  # index of this model call within the run (0-based)
    step: int  # index of the sampling step in the sampled schedule (0-based)
    sigma: float
    total_steps: int
    batch_size: int


@dataclass
class CallRecord:
    """One model call of a run, as shown to the user and the frontend."""

    call: int
    step: int
    sigma: float
    actions: tuple[Action, ...]
    evaluations: int  # batch evaluations spent: 2 with the uncond, 1 without, less what a cache answered
    cosine: list[float | None] | None = None  # per sample, where measured (FULL samples only)
    #: per sample, the weight applied to its guidance (module docstring); 1.0 where none was: plain CFG,
    #: or an action without a guidance term to weight (COND_ONLY, ADAPTER)
    weights: tuple[float, ...] = ()
    cached: int = 0  # batch evaluations of this call a step cache answered instead of the model (:meth:`GuidanceRun.complete`)

    @property
    def guidance_weight(self) -> float:
        """The largest weight applied to a sample of this call (1.0 where none was applied)."""
        return max(self.weights, default=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "call": self.call,
            "step": self.step,
            "sigma": self.sigma,
            "actions": [action.name.lower() for action in self.actions],
            "evaluations": self.evaluations,
            "cosine": self.cosine,
            "guidance_weight": self.guidance_weight,
            "weights": list(self.weights),
            "cached": self.cached,
        }


@dataclass(frozen=True)
class RunSummary:
    """Counts of a finished run. Evaluations are batch evaluations: CFG spends 2 per model call.

    With a step cache on the model (ComfyUI's EasyCache, LazyCache: :meth:`GuidanceRun.served_from_cache`),
    ``evaluations`` are those the model really ran, ``cached`` those the cache answered instead (inside
    the engine's calls, and 2 for each of the ``cache_calls`` sampler calls the cache answered before
    the engine saw them), and plain CFG's count includes those calls.
    """

    calls: int
    uncond_skipped: int
    evaluations: int
    cached: int = 0
    cache_calls: int = 0
    cache_name: str = ""

    @property
    def cfg_evaluations(self) -> int:
        return 2 * (self.calls + self.cache_calls)

    @property
    def speedup(self) -> float:
        """Model evaluations of plain CFG divided by those spent (1.0 for an empty run)."""
        return self.cfg_evaluations / self.evaluations if self.evaluations else 1.0

    def text(self, label: str = "FastGuidance") -> str:
        cache = f", {self.cache_name or 'a step cache'} answered {self.cached} more" if self.cached else ""
        return (
            f"{label}: {self.uncond_skipped}/{self.calls} uncond evaluations skipped{cache}, "
            f"{self.speedup:.2f}x fewer model evaluations ({self.evaluations} of {self.cfg_evaluations})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "uncond_skipped": self.uncond_skipped,
            "evaluations": self.evaluations,
            "cfg_evaluations": self.cfg_evaluations,
            "speedup": self.speedup,
            "cached": self.cached,
            "cache_calls": self.cache_calls,
            "cache_name": self.cache_name,
        }


class GuidancePolicy:
    """Interface of a method that decides, per model call and sample, which action to take.

    A policy object holds only its settings (it is shared by every run of a patched model); what it
    learns during a run lives in the state object that :meth:`start` returns, which the run keeps
    and passes back. Override what the method needs; the defaults have no opinion and learn nothing.
    """

    #: short name used in logs, records and benchmark rows (``ag``, ``compg``, …)
    name: str = "policy"
    #: the run measures the per-sample cosine at FULL calls and passes it to :meth:`measured`
    wants_cosine: bool = False
    #: what that cosine compares (:data:`fastguidance.guidance.COSINE_SPACES`); one space per run
    cosine_space: str = "noise"
    #: the policy may propose REUSE, so the run keeps ``(c − u)/σ`` of each sample's last FULL call
    uses_guidance_cache: bool = False
    #: the policy reads the call's ``sigma`` or ``step`` (:class:`StepContext`). When no policy of a run
    #: does (and no cosine is pending), a call reads nothing from the device; its context then has
    #: ``sigma = nan`` and ``step = -1``, and its record is filled when the run finishes
    reads_sigma: bool = True

    def start(self, run: "GuidanceRun") -> Any:
        """Create the per-run state (called once when the run begins)."""
        return None

    def propose(self, state: Any, context: StepContext) -> Action | Sequence[Action] | None:
        """The action for this call: one for the whole batch, one per sample, or ``None`` (FULL)."""
        return None

    def measured(self, state: Any, record: CallRecord, cosine: Sequence[float | None]) -> None:
        """The per-sample cosine of a past FULL call has reached the host (before the next plan)."""

    def guidance_weight(self, state: Any, context: StepContext) -> float | None:
        """Weight ``w`` of the guidance of this call's guided samples (module docstring); ``None`` = 1."""
        return None

    def may_skip_uncond(self, state: Any) -> bool:
        """Whether this run of the policy may still propose an action other than FULL (default: yes).

        ``False`` for settings that keep plain CFG (AG above threshold 1, CompG guiding every step): a
        host then leaves the model's calls exactly as without the engine (a step cache beside it decides
        as it does alone; ComfyUI's EasyCache, ``nodes/engine_patch.py``)."""
        return True

    def observe(self, state: Any, context: StepContext, x: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, full: Sequence[bool]) -> None:
        """Every call, after its uncond is known: ``uncond[b]`` is the real prediction where
        ``full[b]`` (the sample's action was FULL and the model, not a step cache, made the call's
        predictions), else what the run used in its place (never weighted)."""

    def estimate(self, state: Any, context: StepContext, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The uncond estimate for the whole batch, for samples where this policy won with ESTIMATE."""
        raise NotImplementedError(f"policy {self.name} proposed ESTIMATE but has no estimator")

    def describe(self) -> dict[str, Any]:
        """Settings shown with the run record (the frontend draws e.g. AG's threshold)."""
        return {"method": self.name}

    def advice(self, state: Any) -> list[str]:
        """After a finished run: plain sentences for a run that went wrong in a way the user can fix
        (AG cut at its first step, or never), each with the fix. Logged and drawn on the node."""
        return []


@dataclass(frozen=True)
class StepPlan:
    """The decision for one model call."""

    context: StepContext
    actions: tuple[Action, ...]
    owners: tuple[int | None, ...]  # index of the policy whose proposal won, per sample
    guidance_weight: float = 1.0  # w asked for by the policies; applied to guided samples (module docstring)

    @property
    def evaluate_uncond(self) -> bool:
        return Action.FULL in self.actions


def combine_actions(proposals: Sequence[Sequence[Action]], batch_size: int) -> tuple[tuple[Action, ...], tuple[int | None, ...]]:
    """Apply the combination rule (module docstring) to per-policy, per-sample proposals."""
    actions = [Action.FULL] * batch_size
    owners: list[int | None] = [None] * batch_size
    for index, proposal in enumerate(proposals):
        for sample, action in enumerate(proposal):
            if action > actions[sample]:
                actions[sample], owners[sample] = action, index
    return tuple(actions), tuple(owners)


def schedule_percent_to_sigma(schedule: Sequence[float]) -> Callable[[float], float]:
    """Fallback percent→sigma map by position in the sampled schedule (0 → first sigma, 1 → 0).

    Hosts that know their model's noise schedule pass their own map instead (ComfyUI's
    ``model_sampling.percent_to_sigma``), which does not depend on the number of steps.
    """

    def percent_to_sigma(percent: float) -> float:
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        position = percent * (len(schedule) - 1)
        low = int(position)
        weight = position - low
        return (1 - weight) * schedule[low] + weight * schedule[min(low + 1, len(schedule) - 1)]

    return percent_to_sigma


def shared_cosine_space(policies: Sequence[GuidancePolicy]) -> str:
    """The one space in which a run measures its cosine for all ``policies`` (``noise`` when none wants one).

    Raises :class:`InvalidInputError` when policies on one model ask for different spaces.
    """
    spaces = sorted({policy.cosine_space for policy in policies if policy.wants_cosine})
    for space in spaces:
        if space not in COSINE_SPACES:
            raise InvalidInputError("cosine_space", space, f"choose one of {', '.join(COSINE_SPACES)}")
    if len(spaces) > 1:
        raise InvalidInputError("cosine_space", " and ".join(spaces),
                                "set the same cosine_space on every Adaptive Guidance node applied to this model "
                                "(one cosine is measured per step)")
    return spaces[0] if spaces else "noise"


class GuidanceRun:
    """The state of one sampling run: schedule, per-policy state, guidance cache and records.

    Create one per sampling run (ComfyUI: in the pack's ``OUTER_SAMPLE`` wrapper; core sampler: per
    call of :func:`fastguidance.research.sampling.sample`). Nothing of a run outlives it.
    """

    def __init__(self, policies: Sequence[GuidancePolicy], sigmas: torch.Tensor | Sequence[float],
                 batch_size: int, percent_to_sigma: Callable[[float], float] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.policies = tuple(policies)
        # One host copy of the schedule per run; the per-call path only reads it.
        self.schedule: list[float] = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
        self.total_steps = max(len(self.schedule) - 1, 0)
        self.batch_size = batch_size
        self.percent_to_sigma = percent_to_sigma or schedule_percent_to_sigma(self.schedule)
        self.records: list[CallRecord] = []
        self._wants_cosine = any(policy.wants_cosine for policy in self.policies)
        self._cosine_space = shared_cosine_space(self.policies)
        self._uses_cache = any(policy.uses_guidance_cache for policy in self.policies)
        self._guidance_cache: torch.Tensor | None = None
        self._cache_valid = [False] * batch_size
        self._pending_cosine: tuple[CallRecord, torch.Tensor] | None = None
        self._reads_sigma = any(policy.reads_sigma for policy in self.policies)
        self._unread_sigmas: list[tuple[CallRecord, torch.Tensor]] = []  # calls that read nothing
        self._masks: dict[tuple, torch.Tensor] = {}  # per-sample masks on the device, per flags/device/rank
        self._states = [policy.start(self) for policy in self.policies]
        self._cache_calls = 0  # sampler calls a step cache answered before they reached the engine
        self._cache_name = ""

    # -- per model call -------------------------------------------------------------------------

    def plan(self, sigma: torch.Tensor) -> StepPlan:
        """Decide the actions of the next model call at noise level ``sigma`` (tensor ``[B]``)."""
        if self._reads_sigma or self._pending_cosine is not None:
            sigma_value = self._read_host_values(sigma)
            step = step_index(self.schedule, sigma_value)
        else:  # nothing to read: the sigma stays on the device until the run finishes
            sigma_value, step = math.nan, -1
            self._unread_sigmas.append((None, sigma.detach().reshape(-1)[:1].float().clone()))
        context = StepContext(
            call=len(self.records),
            step=step,
            sigma=sigma_value,
            total_steps=self.total_steps,
            batch_size=self.batch_size,
        )
        proposals = [self._per_sample(policy.propose(state, context), policy)
                     for policy, state in zip(self.policies, self._states)]
        actions, owners = combine_actions(proposals, self.batch_size)
        actions = tuple(Action.FULL if action == Action.REUSE and not self._cache_valid[b] else action
                        for b, action in enumerate(actions))
        weight = 1.0
        for policy, state in zip(self.policies, self._states):
            policy_weight = policy.guidance_weight(state, context)
            if policy_weight is not None:
                weight *= float(policy_weight)
        return StepPlan(context, actions, owners, weight)

    def complete(self, plan: StepPlan, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                 cached: int = 0) -> torch.Tensor:
        """Record the call and return the uncond prediction to combine with ``cond``.

        ``uncond`` is the real prediction when the host evaluated it (``plan.evaluate_uncond``), else
        ``None``. Samples whose action is not FULL get their estimate even when the real uncond exists.
        The guidance weight applies to every sample that keeps a guidance term (module docstring).

        ``cached``: batch evaluations of this call that a step cache beside the engine answered instead
        of the model (ComfyUI's EasyCache answers inside the model call: 1 or 2). Such predictions were
        not made by the model, so the policies learn nothing from the call (no cosine, no cached
        guidance; :meth:`GuidancePolicy.observe` gets ``full`` all false) and the record counts them as
        cached, not evaluated.
        """
        if plan.evaluate_uncond and uncond is None:
            raise ValueError("the plan evaluates the uncond, but no uncond prediction was given")
        evaluations = 2 if uncond is not None else 1
        served = min(max(int(cached), 0), evaluations)
        guided = [action in GUIDED_ACTIONS for action in plan.actions]
        weighted_samples = guided if plan.guidance_weight != 1.0 else [False] * len(guided)
        record = CallRecord(plan.context.call, plan.context.step, plan.context.sigma, plan.actions,
                            evaluations=evaluations - served, cached=served,
                            weights=tuple(plan.guidance_weight if weighted else 1.0 for weighted in weighted_samples))
        self.records.append(record)
        if self._unread_sigmas and self._unread_sigmas[-1][0] is None:
            self._unread_sigmas[-1] = (record, self._unread_sigmas[-1][1])
        if uncond is not None and not served:
            self._learn(plan, record, x, cond, uncond)
        uncond_hat = self._uncond_estimate(plan, x, cond, uncond)
        full = [action == Action.FULL and not served for action in plan.actions]
        for policy, state in zip(self.policies, self._states):
            policy.observe(state, plan.context, x, cond, uncond_hat, full)
        if not any(weighted_samples):
            return uncond_hat
        weighted = cond - plan.guidance_weight * (cond - uncond_hat)
        if all(weighted_samples):
            return weighted
        return torch.where(self._sample_mask(weighted_samples, cond), weighted, uncond_hat)

    def served_from_cache(self, calls: int = 0, cache_name: str = "") -> None:
        """A step cache beside the engine answered ``calls`` sampler calls whole, before they reached the
        engine (LazyCache), counted at 2 evaluations each, as plain CFG would spend; ``cache_name`` names
        the cache in the summary. Evaluations a cache answers inside an engine call are counted by
        :meth:`complete` (``cached``). The summary then counts what the model really ran and what each
        of the two saved.
        """
        self._cache_calls += int(calls)
        if cache_name:
            self._cache_name = cache_name

    # -- end of run -----------------------------------------------------------------------------

    def finish(self) -> RunSummary:
        """Read what is still on the device (the last cosine, unread sigmas) and return the run's counts."""
        if self._pending_cosine is not None:
            record, cosine = self._pending_cosine
            self._pending_cosine = None
            self._deliver_cosine(record, cosine.tolist())
        self._fill_unread_sigmas()
        return self.summary()

    def summary(self) -> RunSummary:
        return RunSummary(
            calls=len(self.records),
            uncond_skipped=sum(1 for record in self.records if record.evaluations + record.cached == 1),
            evaluations=sum(record.evaluations for record in self.records),
            cached=sum(record.cached for record in self.records) + 2 * self._cache_calls,
            cache_calls=self._cache_calls,
            cache_name=self._cache_name,
        )

    def may_skip_uncond(self) -> bool:
        """Whether a later call of this run may skip the uncond (:meth:`GuidancePolicy.may_skip_uncond`)."""
        return any(policy.may_skip_uncond(state) for policy, state in zip(self.policies, self._states))

    def advice(self) -> list[str]:
        """Every policy's :meth:`GuidancePolicy.advice` for this run (call after :meth:`finish`)."""
        return [message for policy, state in zip(self.policies, self._states) for message in policy.advice(state)]

    def evaluations_per_sample(self) -> list[int]:
        """Model evaluations each sample needed: 2 per call where its action was FULL, else 1.

        Results are batch-invariant (module docstring), so this is what the sample costs when it
        is sampled alone; in a batch the uncond is only skipped once every sample may skip it.
        """
        return [sum(2 if record.actions[b] == Action.FULL else 1 for record in self.records)
                for b in range(self.batch_size)]

    def to_dict(self) -> dict[str, Any]:
        """The run as plain data (for the frontend message and the benchmark)."""
        self._fill_unread_sigmas()
        return {
            "policies": [policy.describe() for policy in self.policies],
            "total_steps": self.total_steps,
            "batch_size": self.batch_size,
            "summary": self.summary().to_dict(),
            "advice": self.advice(),
            "records": [record.to_dict() for record in self.records],
        }

    # -- internals ------------------------------------------------------------------------------

    def _per_sample(self, proposal: Action | Sequence[Action] | None, policy: GuidancePolicy) -> Sequence[Action]:
        if proposal is None:
            return (Action.FULL,) * self.batch_size
        if isinstance(proposal, Action):
            return (proposal,) * self.batch_size
        if len(proposal) != self.batch_size:
            raise ValueError(f"policy {policy.name} proposed {len(proposal)} actions for a batch of {self.batch_size}")
        return proposal

    def _read_host_values(self, sigma: torch.Tensor) -> float:
        """The one device→host read of a call (module docstring): this call's sigma plus the pending cosines.

        It waits for the device to finish what is queued. It is kept, not deferred: the sigma gives the
        step every policy decides on (midpoint samplers call between schedule entries, so the host cannot
        know it from the schedule alone), and AG's latch must act at the call right after the cosine that
        triggers it. Reading the cosine later (pinned buffer, fixed delay) would latch one call later and
        change results.
        """
        first_sigma = sigma.reshape(-1)[:1].float()
        if self._pending_cosine is None:
            return float(first_sigma.item())
        record, cosine = self._pending_cosine
        self._pending_cosine = None
        if first_sigma.device != cosine.device:  # a sigma in host memory is read without the device
            values = [float(first_sigma.item())] + cosine.tolist()
        else:
            values = torch.cat([first_sigma, cosine]).tolist()
        self._deliver_cosine(record, values[1:])
        return float(values[0])

    def _fill_unread_sigmas(self) -> None:
        """Sigma and step of the calls that read nothing (:attr:`GuidancePolicy.reads_sigma`): one read for all."""
        unread = [(record, sigma) for record, sigma in self._unread_sigmas if record is not None]
        self._unread_sigmas = []
        if not unread:
            return
        values = torch.cat([sigma.to(unread[0][1].device) for _, sigma in unread]).tolist()
        for (record, _), value in zip(unread, values):
            record.sigma, record.step = float(value), step_index(self.schedule, float(value))

    def _deliver_cosine(self, record: CallRecord, cosine: Sequence[float]) -> None:
        measured = [value if action == Action.FULL else None for value, action in zip(cosine, record.actions)]
        record.cosine = measured
        for policy, state in zip(self.policies, self._states):
            if policy.wants_cosine:
                policy.measured(state, record, measured)

    def _learn(self, plan: StepPlan, record: CallRecord, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        full = [action == Action.FULL for action in plan.actions]
        if self._wants_cosine:
            self._pending_cosine = (record, per_sample_cosine(x, cond, uncond, space=self._cosine_space))
        if self._uses_cache:
            guidance = (cond - uncond) / max(plan.context.sigma, 1e-12)  # noise-space guidance, up to sign
            if all(full) or self._guidance_cache is None:
                self._guidance_cache = guidance
            else:
                self._guidance_cache = torch.where(self._sample_mask(full, guidance), guidance, self._guidance_cache)
            self._cache_valid = [valid or is_full for valid, is_full in zip(self._cache_valid, full)]

    def _uncond_estimate(self, plan: StepPlan, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        kinds = set(zip(plan.actions, plan.owners))
        estimates: dict[int, torch.Tensor] = {}

        def for_batch(action: Action, owner: int | None) -> torch.Tensor:
            if action == Action.FULL:
                return uncond
            if action in (Action.COND_ONLY, Action.ADAPTER):
                return cond
            if action == Action.REUSE:
                return cond - plan.context.sigma * self._guidance_cache
            if owner not in estimates:
                estimates[owner] = self.policies[owner].estimate(self._states[owner], plan.context, x, cond)
            return estimates[owner]

        if len(kinds) == 1:
            return for_batch(*next(iter(kinds)))
        rows = [for_batch(action, owner)[b:b + 1] for b, (action, owner) in enumerate(zip(plan.actions, plan.owners))]
        return torch.cat(rows, dim=0)

    def _sample_mask(self, flags: Sequence[bool], like: torch.Tensor) -> torch.Tensor:
        """``flags`` as a boolean ``[B, 1, …]`` mask on ``like``'s device, built there and kept for the run.

        Built with fills of runs of ``True`` (no host→device copy, which ``torch.tensor(flags, device=…)``
        would be); a run meets few distinct patterns (AG latches each sample once)."""
        key = (tuple(bool(flag) for flag in flags), like.device, like.dim())
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.zeros(len(flags), dtype=torch.bool, device=like.device)
            start = None
            for index, flag in enumerate(key[0] + (False,)):
                if flag and start is None:
                    start = index
                elif not flag and start is not None:
                    mask[start:index].fill_(True)
                    start = None
            mask = mask.reshape(-1, *([1] * (like.dim() - 1)))
            self._masks[key] = mask
        return mask
