"""Bytes of an adapter file read per queued prompt: the full load the loader's check used to make, and the
header check it makes now (issue 28, "Validation that costs nothing"). Core only, on the CPU.

A file of Wan 2.1/2.2 14B's size is written (40 attach points of width 5120, prompt tokens of width 4096,
cross-attention adapters of width 160, the trainer's defaults: 119 M parameters, fp32, about 480 MB), its
pages are dropped from the page cache (``posix_fadvise(DONTNEED)`` after ``fsync``), and each reader runs
once. Measured per reader:

- **read from storage**: ``read_bytes`` of ``/proc/self/io`` (what the kernel fetched from the disk for
  this process, reads and memory-mapped page faults alike), before and after;
- **file pages cached**: pages of the file in the page cache afterwards (``mincore``), in bytes: what of
  the file the reader touched, whatever the route (the kernel reads ahead: a few hundred kB more than a
  reader asks for);
- **tensors materialised**: ``get_tensor`` calls on the safetensors handle, and their bytes.

``load_adapters`` is what Load Guidance Adapter's ``validate_inputs`` ran on every queued prompt before
(and ``execute`` runs, once, when the node runs); ``read_adapters_header`` is what it runs now.

    OMP_NUM_THREADS=1 python benchmarks/adapter_file_reads.py [--folder DIR] [--json OUT]

Linux only (``/proc/self/io``, ``mincore``). The folder must be on a disk-backed file system (not tmpfs),
else nothing can be dropped from the cache and "read from storage" stays 0.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastguidance.tensorfile as tensorfile  # noqa: E402
from fastguidance.guidance_adapters.adapters import (AdapterSpec, GuidanceAdapters, load_adapters,  # noqa: E402
                                                     read_adapters_header, save_adapters)

#: Wan 2.1/2.2 14B: 40 blocks of width 5120; umT5 tokens of width 4096 (no pooled vector: the token mean)
WAN_14B = AdapterSpec({f"double_block.{i}": 5120 for i in range(40)}, 4096, 4096, "cross_attention", 160)


def write_file(path: Path) -> int:
    with torch.device("meta"):
        parameters = GuidanceAdapters(WAN_14B).count_parameters()
    adapters = GuidanceAdapters(WAN_14B)
    save_adapters(adapters, path, {"architecture": "WAN21_T2V", "omega_range": [1.0, 8.0]}, overwrite=True)
    return parameters


def drop_from_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def storage_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` over a fresh mapping, which itself faults nothing in)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = path.stat().st_size, mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            residency = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(address), size, residency) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            libc.munmap(ctypes.c_void_p(address), size)
    return sum(byte & 1 for byte in residency) * page


class CountedSafeOpen:
    """``safe_open`` that counts the tensors read out of the file and their bytes."""

    tensors = 0
    bytes = 0

    def __init__(self, *args, **kwargs):
        self.handle = tensorfile_safe_open(*args, **kwargs)

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *args):
        return self.handle.__exit__(*args)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def get_tensor(self, name):
        tensor = self.handle.get_tensor(name)
        CountedSafeOpen.tensors += 1
        CountedSafeOpen.bytes += tensor.numel() * tensor.element_size()
        return tensor


tensorfile_safe_open = tensorfile.safe_open


def measure(read, path: Path) -> dict:
    drop_from_cache(path)
    CountedSafeOpen.tensors = CountedSafeOpen.bytes = 0
    before_cached, before_read = cached_bytes(path), storage_read_bytes()
    read(path)
    return {"read_from_storage": storage_read_bytes() - before_read, "file_pages_cached_before": before_cached,
            "file_pages_cached": cached_bytes(path), "tensors_materialised": CountedSafeOpen.tensors,
            "tensor_bytes_materialised": CountedSafeOpen.bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None, help="where to write the file (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    options = parser.parse_args()
    tensorfile.safe_open = CountedSafeOpen
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        path = Path(folder) / "wan14b_adapters.safetensors"
        parameters = write_file(path)
        with open(path, "rb") as handle:
            header = 8 + int.from_bytes(handle.read(8), "little")
        results = {"file": {"parameters": parameters, "bytes": path.stat().st_size, "header_bytes": header},
                   "before: load_adapters": measure(load_adapters, path),
                   "now: read_adapters_header": measure(read_adapters_header, path)}
    print(f"adapter file: {parameters:,} parameters, {results['file']['bytes']:,} bytes, of which "
          f"{results['file']['header_bytes']:,} length and header")
    for name, row in results.items():
        if name != "file":
            print(f"{name:28} read from storage {row['read_from_storage']:>13,} B; file pages cached "
                  f"{row['file_pages_cached']:>13,} B (before {row['file_pages_cached_before']:,}); "
                  f"{row['tensors_materialised']} tensors, {row['tensor_bytes_materialised']:,} B materialised")
    if options.json:
        options.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
