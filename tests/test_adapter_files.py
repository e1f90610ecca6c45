"""The adapter file read twice as cheaply: its header alone when a prompt is queued, in full when it runs.

``read_adapters_header`` (what Load Guidance Adapter's ``validate_inputs`` runs on every queued prompt)
must refuse what ``load_adapters`` (what ``execute`` runs) refuses, except weights that are not finite
(that needs the values), and accept every file ``load_adapters`` accepts; reading only the 8-byte length
and the JSON header, never a tensor. Fuzzed with the same mutations as tests/test_validation.py, plus
headers edited by hand (offsets, dtypes, shapes, file length).
"""

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import fastguidance.tensorfile as tensorfile
from fastguidance.errors import TensorFileError
from fastguidance.guidance_adapters.adapters import (AdapterSpec, GuidanceAdapters, load_adapters, read_adapters_header,
                                                     save_adapters)
from fastguidance.tensorfile import METADATA_KEY
from test_validation import FUZZ, _header_and_tensors, json_values


def _write_adapters(path: Path, kind: str = "cross_attention", points: int = 2) -> Path:
    spec = AdapterSpec({f"input.{i}.0": 8 * (i + 1) for i in range(points)}, 8, 0, kind=kind, hidden=8, embed_dim=8)
    torch.manual_seed(0)
    save_adapters(GuidanceAdapters(spec), path, {"architecture": "SD15", "omega_range": [1.0, 8.0]})
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return _write_adapters(tmp_path_factory.mktemp("valid") / "adapters.safetensors")


def _verdict(read, path) -> str:
    """``"ok"``, or the error's kind: every refusal must be a TensorFileError naming the file."""
    try:
        read(path)
    except TensorFileError as error:
        assert str(path) in str(error), error
        return "non-finite" if "NaN or infinite" in str(error) else "refused"
    return "ok"


def _agree(path) -> None:
    """The header check refuses exactly what the full load refuses, bar weights that are not finite."""
    full, header = _verdict(load_adapters, path), _verdict(read_adapters_header, path)
    assert header == ("ok" if full == "non-finite" else full), (path.name, full, header)


def _raw(path: Path) -> tuple[dict, bytes]:
    content = path.read_bytes()
    (length,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8:8 + length]), content[8 + length:]


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize("kind, points", [("cross_attention", 1), ("cross_attention", 3), ("offset", 2)])
def test_every_file_the_trainer_writes_passes_the_header_check_with_the_loaders_metadata(tmp_path, kind, points):
    path = _write_adapters(tmp_path / "a.safetensors", kind, points)
    assert read_adapters_header(path) == load_adapters(path)[1]


def test_the_header_check_reads_the_header_and_no_tensor(valid, monkeypatch):
    """Bytes read through the file handle: the length prefix and the JSON header, nothing of the data."""
    reads = []
    real_open = open

    class Counted:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.handle.close()

        def read(self, size=-1):
            data = self.handle.read(size)
            reads.append(len(data))
            return data

        def seek(self, *args):
            return self.handle.seek(*args)

    monkeypatch.setattr(tensorfile, "open", lambda path, mode="r": Counted(real_open(path, mode)), raising=False)
    monkeypatch.setattr(tensorfile, "safe_open", None)  # no tensor can be materialised
    read_adapters_header(valid)
    (length,) = struct.unpack("<Q", valid.read_bytes()[:8])
    assert sum(reads) == 8 + length < valid.stat().st_size


def test_weights_that_are_not_finite_pass_at_queue_time_and_are_refused_at_load(valid, tmp_path):
    metadata, tensors = _header_and_tensors(valid)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata={METADATA_KEY: json.dumps(metadata)})
    assert read_adapters_header(tmp_path / "inf.safetensors") == metadata
    with pytest.raises(TensorFileError, match="inf.safetensors: tensor .* NaN or infinite"):
        load_adapters(tmp_path / "inf.safetensors")


def test_a_missing_file_is_refused_with_the_node_that_makes_one(tmp_path):
    with pytest.raises(TensorFileError, match="none.safetensors does not exist: train adapters"):
        read_adapters_header(tmp_path / "none.safetensors")


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_are_refused_by_both(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "random.safetensors"
    path.write_bytes(data)
    _agree(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=100_000), extra=st.binary(max_size=4))
def test_a_truncated_or_padded_file_is_refused_by_both(valid, cut, extra, tmp_path_factory):
    content = valid.read_bytes()
    path = tmp_path_factory.mktemp("cut") / "truncated.safetensors"
    path.write_bytes(content[: cut % len(content)] if not extra else content + extra)
    _agree(path)


@FUZZ
@given(key_index=st.integers(min_value=0, max_value=50), value=json_values, whole=st.booleans())
def test_metadata_of_any_shape_or_any_entry_edited_gets_the_same_verdict(valid, key_index, value, whole,
                                                                         tmp_path_factory):
    metadata, tensors = _header_and_tensors(valid)
    if whole:
        metadata = value
    else:
        metadata[sorted(metadata)[key_index % len(metadata)]] = value
    path = tmp_path_factory.mktemp("meta") / "edited.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    _agree(path)


@FUZZ
@given(tensor_index=st.integers(min_value=0, max_value=50),
       shape=st.none() | st.lists(st.integers(min_value=0, max_value=5), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8]),
       drop=st.booleans())
def test_wrong_dropped_or_retyped_tensors_get_the_same_verdict(valid, tensor_index, shape, dtype, drop,
                                                               tmp_path_factory):
    """``shape`` None: the tensor keeps its shape in another dtype (a half-precision copy loads)."""
    metadata, tensors = _header_and_tensors(valid)
    key = sorted(tensors)[tensor_index % len(tensors)]
    if drop:
        del tensors[key]
    else:
        tensors[key] = torch.zeros(tensors[key].shape if shape is None else shape, dtype=dtype)
    path = tmp_path_factory.mktemp("tensor") / "reshaped.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    _agree(path)


@FUZZ
@given(entry_index=st.integers(min_value=0, max_value=50),
       edit=st.sampled_from(["dtype", "shape", "data_offsets", "unknown field", "metadata entry", "metadata"]),
       value=json_values | st.sampled_from(["F32", "F16", "I32", "I8", "F4", [0, 4], [4, 0], [1, 2, 3], [-1], "x"]))
def test_headers_edited_by_hand_get_the_same_verdict(valid, entry_index, edit, value, tmp_path_factory):
    """An entry's dtype, shape or offsets replaced, an unknown field added to it (safetensors ignores it), an
    entry added to ``__metadata__`` (kept if a string) or ``__metadata__`` replaced."""
    header, data = _raw(valid)
    name = sorted(name for name in header if name != "__metadata__")[entry_index % (len(header) - 1)]
    if edit == "metadata":
        header["__metadata__"] = value
    elif edit == "metadata entry":
        header["__metadata__"] = {**header["__metadata__"], "other": value}
    else:
        header[name] = {**header[name], ("comment" if edit == "unknown field" else edit): value}
    path = _write_raw(tmp_path_factory.mktemp("raw") / "hand.safetensors", header, data)
    _agree(path)


def test_offsets_that_leave_a_hole_or_overlap_are_refused_by_both(valid, tmp_path):
    header, data = _raw(valid)
    first = min((name for name in header if name != "__metadata__"), key=lambda name: header[name]["data_offsets"])
    begin, end = header[first]["data_offsets"]
    shifted = {**header, first: {**header[first], "data_offsets": [begin + 4, end + 4]}}
    _agree(_write_raw(tmp_path / "hole.safetensors", shifted, data + b"\0" * 4))
    assert _verdict(read_adapters_header, tmp_path / "hole.safetensors") == "refused"
