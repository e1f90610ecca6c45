"""Writing files so that a reader never sees a half-written one.

Every writer of the pack that produces a file a person or another program may open while it is
being written (report PNGs, calibration and adapter safetensors, JSON summaries) goes through
:func:`atomic_write`: the content is written to a temporary file in the destination's own folder
and moved over the destination with :func:`os.replace`, which is atomic on POSIX and Windows when
both paths are on the same file system (hence the same folder). If writing fails, the temporary
file is removed and the destination is left as it was (absent, or its previous content).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def _temporary_sibling(path: Path) -> Path:
    """Create an empty, new file next to ``path`` and return its name.

    The name is hidden (leading dot), random, and keeps the destination's suffix
    (``.grid.3f9a….tmp.png``) so that writers which infer the format from the extension still work.
    It is created with ``O_EXCL`` and mode 0o666 minus the umask, like a plain ``open(path, "w")``,
    so the final file gets the permissions a direct write would have given it.
    """
    for _ in range(100):
        candidate = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return candidate
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Write ``path`` atomically: ``write(temporary_path)`` then ``os.replace(temporary_path, path)``.

    Args:
        path: the destination. Its folder is created if missing.
        write: called once with the path of an empty temporary file in the destination's folder
            (same suffix as ``path``); it must write the whole content there, by path or by opening
            it (``image.save(tmp, format="PNG")``, ``safetensors.torch.save_file(tensors, tmp)``,
            ``tmp.write_text(...)``).

    Returns:
        what ``write`` returned.

    If ``write`` raises (or is interrupted), the temporary file is deleted, ``path`` is untouched and
    the exception propagates.
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(destination)
    try:
        result = write(temporary)
        with open(temporary, "rb+") as handle:  # the content reaches the disk before the rename
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return result


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding=encoding))
