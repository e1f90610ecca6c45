"""Typed errors of the pack.

Every error raised on user input names the input, the bad value and the fix, so that the message
shown by ComfyUI (or the command line) is enough to repair the graph without reading code.
"""

from __future__ import annotations


class FastGuidanceError(Exception):
    """Base class of every error the pack raises on purpose."""


class InvalidInputError(FastGuidanceError, ValueError):
    """A user-facing input has a value the pack cannot use."""

    def __init__(self, input_name: str, value: object, fix: str):
        self.input_name = input_name
        self.value = value
        self.fix = fix
        super().__init__(f"{input_name} = {value!r} is not valid: {fix}")


class TensorFileError(FastGuidanceError):
    """A file of the pack is missing, corrupt, of another kind or made for something else."""
