"""The nodes' side of the validation layer (``fastguidance/validation.py``): rules from each node's schema.

Every node of the pack derives from :class:`ValidatedNode`, which does the two checks no node may
forget: its ``validate_inputs(cls, **values)`` — with ``**values`` ComfyUI hands it every input and
skips its own range and list checks (which let NaN through), so the node's schema, the ``min``/``max``
and options its tooltips state, is enforced here, in one place, for the values typed in the page —
and, around the node's ``execute``, :func:`check_inputs` on all its arguments before the node's code
runs, so that values arriving through links get the same checks before any work starts. Inputs
ComfyUI fills by links (MODEL, CONDITIONING, …) have no rule; the host checks their types.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from comfy_api.latest import io

from ..fastguidance.validation import (ChoiceRule, NumberRule, Rule, SwitchRule, TextRule, check_values,
                                       portable_file_name, validation_message)
from . import model_folders


@dataclass(frozen=True)
class CrossRule:
    """A check of several inputs together (``check(*values of inputs)`` raises), run once all are known."""

    check: Callable[..., None]
    inputs: tuple[str, ...]

    def apply(self, values: Mapping[str, object]) -> None:
        if all(values.get(name) is not None for name in self.inputs):
            self.check(*(values[name] for name in self.inputs))


@dataclass(frozen=True)
class FileInput:
    """A list input naming a file of a pack folder: it must exist (else the node that makes such files is
    named) and, with ``reader``, be readable — a broken file is refused before the prompt runs, not
    after the nodes before it have."""

    input_name: str
    folder: str
    made_by: str
    #: reads the file and raises :class:`~fastguidance.errors.TensorFileError` on a bad one
    reader: Callable[[str], object] | None = None
    #: list entries that are not files (Tune's "none")
    other_choices: tuple[str, ...] = ()

    def apply(self, values: Mapping[str, object], read: bool = False) -> None:
        value = values.get(self.input_name)
        if value is None or (isinstance(value, str) and value in self.other_choices):
            return
        path = model_folders.existing_file(self.folder, value if isinstance(value, str) else repr(value),
                                           self.input_name, self.made_by)
        if read and self.reader is not None:
            self.reader(path)


#: the ``filename`` input of a node that writes a file (trainers, calibration, Tune)
FILE_NAME = CrossRule(portable_file_name, ("filename",))


def input_rules(cls, skip: Iterable[str] = ()) -> dict[str, Rule]:
    """The rule of every widget input of a node, from its schema as the host exposes it (both hosts)."""
    skipped = set(skip)
    rules: dict[str, Rule] = {}
    schema = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in schema.get(section, {}).items():
            if name in skipped:
                continue
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, (list, tuple)) or kind == "COMBO":
                choices = kind if isinstance(kind, (list, tuple)) else options.get("options", [])
                rules[name] = ChoiceRule(tuple(str(choice) for choice in choices))
            elif kind in ("INT", "FLOAT"):
                rules[name] = NumberRule(options.get("min", -float("inf")), options.get("max", float("inf")),
                                         integer=kind == "INT")
            elif kind == "STRING":
                rules[name] = TextRule()
            elif kind == "BOOLEAN":
                rules[name] = SwitchRule()
    return rules


Check = CrossRule | FileInput


def check_inputs(cls, values: Mapping[str, object], *checks: Check, read_files: bool = False) -> dict[str, object]:
    """Raise :class:`~fastguidance.errors.InvalidInputError` (or, for a broken file with ``read_files``,
    :class:`~fastguidance.errors.TensorFileError`) for the first bad input of ``values``; else return
    ``values`` with every whole-number (INT) input as an ``int`` (a link may deliver ``20.0`` or a NumPy
    integer, which the rule accepts).

    ``values``: input name → value, ``None`` where a link feeds it and the value is not known yet
    (in ``validate_inputs``); before ``execute``, its arguments (the node reads its files itself,
    so they are not read twice). Each input's own rule first, then the node's file inputs and cross
    rules.
    """
    skip = [check.input_name for check in checks if isinstance(check, FileInput)]
    rules = input_rules(cls, skip)
    check_values(rules, values)
    for check in checks:
        if isinstance(check, FileInput):
            check.apply(values, read=read_files)
        else:
            check.apply(values)
    return {name: int(value) if value is not None and isinstance(rules.get(name), NumberRule) and rules[name].integer
            else value for name, value in values.items()}


def validate(cls, values: Mapping[str, object], *checks: Check) -> bool | str:
    """``validate_inputs``' answer: ``True`` or the pack's message; never raises on a bad value or file."""
    return validation_message(lambda: check_inputs(cls, values, *checks, read_files=True))


class ValidatedNode(io.ComfyNode):
    """Base of every node of the pack: its inputs are checked at queue time and again before ``execute``.

    A node lists the checks beyond each input's own schema rule in :attr:`CHECKS` (file inputs, rules
    over several inputs). ``validate_inputs`` answers the queue with them (files read as their
    :class:`FileInput` says); the ``execute`` a subclass defines is wrapped, when the class is made,
    so that :func:`check_inputs` sees every argument first (values from links included) and INT inputs
    arrive as ``int``. A node therefore cannot forget either check.
    """

    #: the node's checks beyond each input's own rule
    CHECKS: ClassVar[tuple[Check, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        execute = cls.__dict__.get("execute")
        # the host's per-call class clone copies the class's dict: a wrapped execute is not wrapped again
        if execute is not None and not getattr(execute.__func__, "checks_inputs", False):
            cls.execute = classmethod(_checking_inputs_first(execute.__func__))

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return validate(cls, values, *cls.CHECKS)


def _checking_inputs_first(execute: Callable) -> Callable:
    """``execute(cls, …)`` that runs :func:`check_inputs` on its bound arguments first and passes them on
    as checked (whole numbers as ``int``)."""
    signature = inspect.signature(execute)

    @functools.wraps(execute)
    def checked(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)
        bound.apply_defaults()
        names = list(bound.arguments)[1:]  # without cls
        values = check_inputs(cls, {name: bound.arguments[name] for name in names}, *cls.CHECKS)
        bound.arguments.update(values)
        return execute(*bound.args, **bound.kwargs)

    checked.checks_inputs = True
    return checked
