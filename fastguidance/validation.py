"""One validation layer for every input of the pack: type, range, choice and file name.

ComfyUI skips its own type, ``min``/``max`` and list checks for every input a node's
``validate_inputs`` names (``execution.py``), and its ``min``/``max`` check lets NaN through
(``nan < min`` is false). The nodes therefore name their widget inputs and check them here, with
the rules their schema declares (the ranges the tooltips state), once in ``validate_inputs`` for
the values typed in the page and again at the start of ``execute`` for values that arrive through
links. The core knows nothing of ComfyUI: the node layer turns a schema into :class:`Rule` objects
(``nodes/validation.py``).

Every check raises :class:`~fastguidance.errors.InvalidInputError` naming the input, the value
and the fix; :func:`validation_message` turns that into the ``validate_inputs`` answer and never
raises on a value of the wrong type.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import FastGuidanceError, InvalidInputError


@dataclass(frozen=True)
class NumberRule:
    """A number in ``[low, high]`` (a whole number when ``integer``); never NaN or infinite."""

    low: float
    high: float
    integer: bool = False

    def fix(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        return f"use {kind} from {_number(self.low)} to {_number(self.high)}"

    def check(self, name: str, value: object, fix: str | None = None) -> None:
        # the type first: comparing text or None with a number would raise a TypeError instead
        if (not is_finite_number(value) or (self.integer and not is_whole_number(value))
                or not self.low <= value <= self.high):
            raise InvalidInputError(name, value, fix or self.fix())


@dataclass(frozen=True)
class ChoiceRule:
    """One of a list of names (a combo input)."""

    options: tuple[str, ...]

    def fix(self) -> str:
        if len(self.options) > 12:
            return f"choose one of the {len(self.options)} entries of its list ({', '.join(self.options[:6])}, …)"
        return f"choose one of {', '.join(self.options)}" if self.options else "the list is empty"

    def check(self, name: str, value: object) -> None:
        if not isinstance(value, str) or value not in self.options:
            raise InvalidInputError(name, value, self.fix())


@dataclass(frozen=True)
class TextRule:
    """Any text (the node checks its content where it has rules of its own)."""

    def check(self, name: str, value: object) -> None:
        if not isinstance(value, str):
            raise InvalidInputError(name, value, "use text")


@dataclass(frozen=True)
class SwitchRule:
    """On or off."""

    def check(self, name: str, value: object) -> None:
        if not isinstance(value, bool):
            raise InvalidInputError(name, value, "use true or false")


Rule = NumberRule | ChoiceRule | TextRule | SwitchRule


def is_finite_number(value: object) -> bool:
    """A real number of any numeric type (Python's, NumPy's), not a bool, not NaN or infinite: what a number
    input, a value from a linked node or a file's number may hold."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_whole_number(value: object) -> bool:
    """A finite number whose value is whole, of any numeric type: ``20``, ``20.0`` or a NumPy integer (a link
    from another pack's math node may deliver any of them to an INT input); never ``20.5`` or a bool."""
    return is_finite_number(value) and (isinstance(value, numbers.Integral) or float(value).is_integer())


def require_number(name: str, value: object, low: float, high: float, fix: str, integer: bool = False) -> None:
    """Raise :class:`InvalidInputError` with ``fix`` unless ``value`` is a finite number (a whole one if
    ``integer``) in ``[low, high]``: :meth:`NumberRule.check` with a message of the caller's."""
    NumberRule(low, high, integer).check(name, value, fix)


def check_values(rules: Mapping[str, Rule], values: Mapping[str, object]) -> None:
    """Check every value that is known (``None`` = fed by a link, not known yet) against its rule.

    Values without a rule (models, conditionings, …) are left alone.
    """
    for name, value in values.items():
        rule = rules.get(name)
        if rule is not None and value is not None:
            rule.check(name, value)


def validation_message(check: Callable[[], None]) -> bool | str:
    """``True`` when ``check()`` passes, else the pack's message (the ``validate_inputs`` answer)."""
    try:
        check()
    except FastGuidanceError as error:
        return str(error)
    return True


def _number(value: float) -> str:
    """A bound as people write it: whole numbers in full (seeds go to 2^64 − 1), others short."""
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:g}"


# --- file names a node writes ------------------------------------------------------------------

#: the longest stem, in UTF-8 bytes: file systems allow 255 bytes per name, and the atomic writer's
#: temporary sibling adds 30 characters to the stem (``.{stem}.{12 hex}.tmp.safetensors``)
MAX_FILE_STEM_BYTES = 200
#: names Windows reserves for devices, with or without an extension
_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_FORBIDDEN_CHARACTERS = '/\\:*?"<>|'
FILE_NAME_RULE = (f"a plain file name: no folders, none of the characters {' '.join(_FORBIDDEN_CHARACTERS)}, no "
                  f"control characters, not starting with a dot nor ending with a dot or space, not a name Windows "
                  f"reserves (CON, NUL, COM1, …), at most {MAX_FILE_STEM_BYTES} bytes; e.g. \"sd15_dpmpp_2m_karras_20\"")


def portable_file_name(name: object, input_name: str = "filename", extension: str = ".safetensors") -> str:
    """``name`` as a file name every OS the host runs on accepts, ``extension`` added; or the rule.

    Surrounding spaces are removed and a typed ``extension`` is not doubled. Refused: folders and
    the characters Windows refuses, control characters, a leading dot (hidden files, ``..``),
    a trailing dot or space (Windows strips them silently), Windows' device names (``CON``,
    ``com1.txt``, …) and stems longer than :data:`MAX_FILE_STEM_BYTES`.
    """
    if not isinstance(name, str):
        raise InvalidInputError(input_name, name, FILE_NAME_RULE)
    stem = name.strip()
    if stem.lower().endswith(extension.lower()):
        stem = stem[: -len(extension)]
    device_name = stem.split(".")[0].rstrip(" ").upper()
    if (not stem or stem.startswith(".") or stem.endswith((".", " "))
            or any(char in _FORBIDDEN_CHARACTERS for char in stem)
            or re.search(r"[\x00-\x1f\x7f]", stem)
            or device_name in _RESERVED_NAMES
            or len(stem.encode("utf-8", errors="surrogatepass")) > MAX_FILE_STEM_BYTES
            or not _encodable(stem)):
        raise InvalidInputError(input_name, name, FILE_NAME_RULE)
    return stem + extension


def _encodable(text: str) -> bool:
    """Lone surrogates (possible in JSON) cannot be written as a file name on any OS."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
