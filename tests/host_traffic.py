"""Counting device↔host traffic per model call with a torch dispatch mode (issue 20).

Used by ``tests/test_host_sync.py`` (the core sampler) and ``tests/comfy/test_host_sync_host.py`` (the
pack's glue in the real host). What counts, per call:

- **host reads**: ``aten._local_scalar_dense`` / ``aten.item`` (``.item()``, ``float(t)``, ``bool(t)``),
  copies from a device to the CPU, and ``Tensor.tolist`` / ``Tensor.numpy`` on CPU tensors (they read
  memory without dispatching an op). On CPU every tensor is host memory, so reads of host-only tables
  count too: the per-call path must read no tensor at all, except its one documented read;
- **blocking host→device copies**: ``aten._to_copy`` / ``aten.copy_`` from the CPU to another device,
  unless ``non_blocking`` from pinned memory (those count apart, as async uploads);
- **tensors made from host data**: ``aten.lift_fresh`` / ``aten.lift_fresh_copy``, which ``torch.tensor``
  emits on every device (on CPU the only trace of a per-call ``torch.tensor(flags, device=…)``).

Copies between CPU tensors and same-device dtype casts are not transfers and are not counted.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READ_OPS = {"_local_scalar_dense", "item"}
COPY_OPS = {"_to_copy", "copy_"}
HOST_DATA_OPS = {"lift_fresh", "lift_fresh_copy"}


@dataclass
class CallTraffic:
    reads: int = 0
    blocking_uploads: int = 0  # host→device copies that block (pageable memory or non_blocking=False)
    async_uploads: int = 0  # non_blocking copies from pinned memory
    host_tensors: int = 0  # torch.tensor(...) from Python data
    ops: Counter = field(default_factory=Counter)


class TrafficCounter(TorchDispatchMode):
    """Counts the traffic of the calls it is entered for (one :class:`CallTraffic` per call).

    :meth:`call` opens a call and counts in it; :meth:`paused` stops counting inside it (work that is
    not under test, such as the host's own model evaluation) and :meth:`counting` resumes it (the pack's
    code that runs inside that work).
    """

    def __init__(self):
        super().__init__()
        self.calls: list[CallTraffic] = []
        self.current: CallTraffic | None = None
        self._enabled: list[bool] = []

    @property
    def active(self) -> bool:
        return self.current is not None and bool(self._enabled) and self._enabled[-1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            self._count(self.current, func.overloadpacket.__name__, args, kwargs)
        return func(*args, **kwargs)

    def _count(self, call: CallTraffic, name: str, args, kwargs) -> None:
        if name in READ_OPS:
            call.reads += 1
            call.ops[name] += 1
        elif name in HOST_DATA_OPS:
            call.host_tensors += 1
            call.ops[name] += 1
        elif name in COPY_OPS:
            self._copy(call, name, args, kwargs)

    @staticmethod
    def _copy(call: CallTraffic, name: str, args, kwargs) -> None:
        source = args[1] if name == "copy_" else args[0]
        if not torch.is_tensor(source):
            return
        if name == "copy_":
            target = args[0].device
            non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        else:
            target = torch.device(kwargs.get("device") or source.device)
            non_blocking = bool(kwargs.get("non_blocking", False))
        if source.device == target:
            return  # same-device copies and dtype casts are not transfers
        if target.type == "cpu":
            call.reads += 1
            call.ops[f"{name} {source.device.type}→cpu"] += 1
        elif source.device.type == "cpu":
            if non_blocking and source.is_pinned():
                call.async_uploads += 1
            else:
                call.blocking_uploads += 1
            call.ops[f"{name} cpu→{target.type}"] += 1

    def read_on_host(self, tensor: torch.Tensor, what: str) -> None:
        """``tolist``/``numpy`` of a CPU tensor: a read the dispatch mode cannot see."""
        if self.active and tensor.device.type == "cpu":
            self.current.reads += 1
            self.current.ops[what] += 1

    @contextlib.contextmanager
    def call(self):
        """One model call: a new record, counted (the mode is entered once, for the outermost call)."""
        if self.current is not None:  # nested (the host calls the pack inside the pack's call): same call
            with self.counting():
                yield
            return
        self.current = CallTraffic()
        self.calls.append(self.current)
        try:
            with self, self.counting():
                yield
        finally:
            self.current = None

    @contextlib.contextmanager
    def _counting_set_to(self, enabled: bool):
        self._enabled.append(enabled)
        try:
            yield
        finally:
            self._enabled.pop()

    def counting(self):
        """Count the traffic inside (nested in :meth:`paused`: counted again)."""
        return self._counting_set_to(True)

    def paused(self):
        """Count nothing inside (the host's own work between the pack's calls)."""
        return self._counting_set_to(False)


def count_host_reads(counter: TrafficCounter, monkeypatch) -> None:
    """Make ``Tensor.tolist`` and ``Tensor.numpy`` report to ``counter`` (for the test's duration)."""
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, _original=original, _name=name, **kwargs):
            counter.read_on_host(tensor, _name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)


def summary(calls: list[CallTraffic]) -> str:
    ops = Counter()
    for call in calls:
        ops.update(call.ops)
    return (f"{len(calls)} calls: reads per call {[call.reads for call in calls]}, blocking uploads "
            f"{sum(c.blocking_uploads for c in calls)}, async uploads {sum(c.async_uploads for c in calls)}, "
            f"tensors from host data {sum(c.host_tensors for c in calls)}; ops {dict(ops)}")
