"""What the pack's command lines share: one-line refusals, checked options, writable outputs.

Every refusal is one line on stderr, ``<prog>: error: <option> = <value> is not valid: <fix>``, and
exit status 2 (argparse's convention), never a traceback; every check runs before any sampling or
training, so a mistake costs seconds, not a finished run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

from ..errors import FastGuidanceError, InvalidInputError


class CommandLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and the defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: …)`` to every option with a
    default that its help does not already state (none for flags, empty or absent defaults)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == "" or default is argparse.SUPPRESS or "default" in text or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))):
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


def run_refusing_in_one_line(prog: str, action: Callable[[], None]) -> None:
    """Run ``action``; a :class:`~fastguidance.errors.FastGuidanceError` (a refused option, a stale
    or missing file) becomes one line on stderr and exit status 2 instead of a traceback."""
    try:
        action()
    except FastGuidanceError as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        raise SystemExit(2) from None


def require_writable_folder(option: str, folder: Path) -> None:
    """Create ``folder`` (and its parents) if needed and prove it writable by writing and removing a
    file, so that a run never ends in a write error after its work is done."""
    try:
        if folder.exists() and not folder.is_dir():
            raise InvalidInputError(option, str(folder), "it is a file; name a folder (it is created if missing)")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except InvalidInputError:
        raise
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InvalidInputError(option, str(folder), f"cannot create or write there ({reason}); name a folder you "
                                                     "can write to") from None


def require_writable_file(option: str, path: Path, must_exist: bool) -> None:
    """The file can be written: it exists if ``must_exist`` (and is a file), its folder is writable."""
    if must_exist and not path.is_file():
        raise InvalidInputError(option, str(path), "no such file; name an existing file")
    if path.exists() and (not path.is_file() or not os.access(path, os.W_OK)):
        raise InvalidInputError(option, str(path), "it is not a writable file; check its permissions or name another")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() and not must_exist:
        require_writable_folder(option, folder)
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(option, str(path), f"its folder {folder} is not writable (the file is replaced "
                                                   "atomically through a temporary file beside it)")
