"""The nodes' side of the validation layer (``fastguidance/validation.py``): rules from each node's schema.

Every node of the pack declares ``validate_inputs(cls, **values)``: with ``**values`` ComfyUI hands
it every input and skips its own range and list checks (which let NaN through), so the node's
schema — the ``min``/``max`` and options its tooltips state — is enforced here, in one place, for
the values typed in the page; and ``execute`` calls :func:`check_inputs` with all its arguments
first, so that values arriving through links get the same checks before any work starts. Inputs
ComfyUI fills by links (MODEL, CONDITIONING, …) have no rule; the host checks their types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

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


def check_inputs(cls, values: Mapping[str, object], *checks: Check, read_files: bool = False) -> None:
    """Raise :class:`~fastguidance.errors.InvalidInputError` (or, for a broken file with ``read_files``,
    :class:`~fastguidance.errors.TensorFileError`) for the first bad input of ``values``.

    ``values``: input name → value, ``None`` where a link feeds it and the value is not known yet
    (in ``validate_inputs``); in ``execute``, ``locals()`` at its first line (its arguments; the
    node reads its files itself right after, so they are not read twice). Each input's own rule
    first, then the node's file inputs and cross rules.
    """
    skip = [check.input_name for check in checks if isinstance(check, FileInput)]
    check_values(input_rules(cls, skip), values)
    for check in checks:
        if isinstance(check, FileInput):
            check.apply(values, read=read_files)
        else:
            check.apply(values)


def validate(cls, values: Mapping[str, object], *checks: Check) -> bool | str:
    """``validate_inputs``' answer: ``True`` or the pack's message; never raises on a bad value or file."""
    return validation_message(lambda: check_inputs(cls, values, *checks, read_files=True))
