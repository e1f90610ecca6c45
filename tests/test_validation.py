"""The validation layer (fastguidance/validation.py) and the pack's file readers, fuzzed with hypothesis.

Every value of any type reaches either the rule's answer or InvalidInputError naming the input; every
file content (random bytes, metadata of any JSON shape, wrong tensors, NaN weights, newer versions)
reaches either a loaded object or TensorFileError naming the file; never any other exception.
Derandomized, so a CI run is reproducible.
"""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fastguidance.guidance_adapters.adapters import AdapterSpec, GuidanceAdapters, load_adapters, save_adapters
from fastguidance.errors import FastGuidanceError, InvalidInputError, TensorFileError
from fastguidance.linear_ag import LinearAGCoefficients, regressor_names
from fastguidance.step_predictor import StepPredictor, load_step_predictor, save_step_predictor
from fastguidance.tensorfile import METADATA_KEY, save_tensor_file
from fastguidance.tune import PRESET_FORMAT, PRESET_VERSION, load_preset
from fastguidance.validation import (MAX_FILE_STEM_BYTES, ChoiceRule, NumberRule, SwitchRule, TextRule, check_values,
                                     portable_file_name, validation_message)

FUZZ = settings(derandomize=True, max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)
any_value = (json_values | st.floats() | st.binary(max_size=8) | st.just(float("nan")) | st.just(float("inf"))
             | st.integers(min_value=-(1 << 70), max_value=1 << 70))


# --- rules ----------------------------------------------------------------------------------------

@FUZZ
@given(value=any_value, integer=st.booleans())
def test_a_number_rule_accepts_exactly_finite_numbers_of_its_kind_in_range(value, integer):
    rule = NumberRule(0.0, 10.0, integer)
    expected = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
                and 0.0 <= value <= 10.0 and (not integer or float(value).is_integer()))
    if expected:
        rule.check("strength", value)
    else:
        with pytest.raises(InvalidInputError, match=r"^strength = .* use a (whole )?number from 0 to 10"):
            rule.check("strength", value)


@pytest.mark.parametrize("value", [20, 20.0, np.int64(20), np.int32(20), np.uint8(20), np.float32(20.0),
                                   np.float64(20.0)])
def test_a_whole_number_input_accepts_a_whole_value_of_any_numeric_type(value):
    """A linked INT input may arrive as 20.0 or a NumPy integer from another pack's node."""
    NumberRule(1, 200, integer=True).check("steps", value)


@pytest.mark.parametrize("value", [20.5, np.float32(20.5), np.bool_(True), True, "20", np.nan, np.int64(201)])
def test_a_whole_number_input_refuses_fractions_bools_text_and_values_out_of_range(value):
    with pytest.raises(InvalidInputError, match=r"^steps = .* use a whole number from 1 to 200"):
        NumberRule(1, 200, integer=True).check("steps", value)


@FUZZ
@given(value=any_value)
def test_choice_text_and_switch_rules_refuse_every_other_value_by_name(value):
    for rule, accepted in ((ChoiceRule(("euler", "ddim")), value in ("euler", "ddim") and isinstance(value, str)),
                           (TextRule(), isinstance(value, str)), (SwitchRule(), isinstance(value, bool))):
        answer = validation_message(lambda: rule.check("mode", value))
        assert answer is True if accepted else answer.startswith("mode = "), (rule, value, answer)


def test_check_values_skips_unknown_values_and_inputs_without_rules():
    rules = {"threshold": NumberRule(0.0, 1.0)}
    check_values(rules, {"threshold": None, "model": object()})  # a link: not known yet; a model: no rule
    assert validation_message(lambda: check_values(rules, {"threshold": "0.5"})).startswith("threshold = '0.5'")
    assert validation_message(lambda: check_values(rules, {"threshold": float("nan")})).startswith("threshold = nan")


# --- file names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "   ", "a/b", "a\\b", "..", ".hidden", "name.", "name .safetensors", "a:b", "a*b", 'a"b',
                                  "a<b", "a|b", "a?b", "tab\there", "nul\x00", "bell\x07", "del\x7f", "CON", "con",
                                  "nul.safetensors", "COM1", "lpt9.txt", "Aux ", "x" * (MAX_FILE_STEM_BYTES + 1),
                                  "é" * (MAX_FILE_STEM_BYTES // 2 + 1), "\ud800", 5, None, ["a"]])
def test_file_names_the_host_oses_refuse_are_refused_with_the_rule(name):
    with pytest.raises(InvalidInputError, match=r"^filename = .*a plain file name: no folders"):
        portable_file_name(name)


@pytest.mark.parametrize("name, file", [("sd15_euler_20", "sd15_euler_20.safetensors"),
                                        (" spaced ", "spaced.safetensors"),
                                        ("done.safetensors", "done.safetensors"),
                                        ("v1.2", "v1.2.safetensors"), ("console", "console.safetensors"),
                                        ("x" * MAX_FILE_STEM_BYTES, "x" * MAX_FILE_STEM_BYTES + ".safetensors"),
                                        ("café ☕", "café ☕.safetensors")])
def test_ordinary_file_names_get_the_extension_once(name, file):
    assert portable_file_name(name) == file


@FUZZ
@given(name=st.text(max_size=40))
def test_any_accepted_file_name_can_be_created_here(name, tmp_path_factory):
    try:
        file = portable_file_name(name)
    except InvalidInputError as error:
        assert str(error).startswith("filename = ")
        return
    folder = tmp_path_factory.mktemp("names")
    (folder / file).write_bytes(b"")
    assert os.listdir(folder) == [file]


# --- files read by the nodes ----------------------------------------------------------------------

def _adapters(path):
    adapters = GuidanceAdapters(AdapterSpec({"a": 8}, 8, 0, hidden=8, embed_dim=8))
    save_adapters(adapters, path, {"architecture": "SD15", "omega_range": [1.0, 8.0]})


def _predictor(path):
    save_step_predictor(StepPredictor(4, (10, 20), 8), path, {"architecture": "SD15"})


def _linear_ag(path):
    calls, window = 3, 1
    LinearAGCoefficients(torch.zeros(calls, len(regressor_names(window))), torch.tensor([3.0, 2.0, 1.0]).double(),
                         torch.tensor([0, 1, 2]), torch.tensor([3.0, 2.0, 1.0, 0.0]).double(),
                         torch.tensor([0.1, float("nan"), 0.2]), {"window": window}).save(path)


def _preset(path):
    save_tensor_file(path, {"trials": torch.zeros(1, 3)},
                     {"format": PRESET_FORMAT, "version": PRESET_VERSION, "method": "ag",
                      "settings": {"threshold": 0.999}, "evaluations": 30.0, "cfg_evaluations": 40.0, "steps": 20})


READERS = {"adapters": (_adapters, load_adapters), "step predictor": (_predictor, load_step_predictor),
           "LinearAG": (_linear_ag, LinearAGCoefficients.load), "preset": (_preset, load_preset)}


def _header_and_tensors(path):
    """A valid file's metadata (parsed) and tensors, to mutate."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[METADATA_KEY]), {key: handle.get_tensor(key) for key in handle.keys()}


def _expect_loaded_or_named(read, path):
    try:
        read(path)
    except TensorFileError as error:
        assert str(path) in str(error), error
    except FastGuidanceError as error:  # pragma: no cover - a message that does not name the file
        pytest.fail(f"{type(error).__name__} without the file: {error}")


@pytest.fixture(scope="module", params=sorted(READERS))
def valid_file(request, tmp_path_factory):
    write, read = READERS[request.param]
    path = tmp_path_factory.mktemp("files") / f"{request.param.replace(' ', '_')}.safetensors"
    write(path)
    read(path)  # the file as written loads
    return path, read


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_are_refused_by_name(valid_file, data, tmp_path_factory):
    _, read = valid_file
    path = tmp_path_factory.mktemp("bytes") / "random.safetensors"
    path.write_bytes(data)
    with pytest.raises(TensorFileError, match="random.safetensors"):
        read(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_a_truncated_file_is_refused_by_name(valid_file, cut, tmp_path_factory):
    source, read = valid_file
    content = source.read_bytes()
    path = tmp_path_factory.mktemp("cut") / "truncated.safetensors"
    path.write_bytes(content[: cut % len(content)])
    with pytest.raises(TensorFileError, match="truncated.safetensors"):
        read(path)


@FUZZ
@given(metadata=json_values)
def test_metadata_of_any_json_shape_is_refused_by_name(valid_file, metadata, tmp_path_factory):
    source, read = valid_file
    _, tensors = _header_and_tensors(source)
    path = tmp_path_factory.mktemp("meta") / "shape.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(TensorFileError, match="shape.safetensors"):
        read(path)


@FUZZ
@given(key_index=st.integers(min_value=0, max_value=50), value=json_values)
def test_any_metadata_entry_replaced_by_any_value_loads_or_is_refused_by_name(valid_file, key_index, value,
                                                                           tmp_path_factory):
    source, read = valid_file
    metadata, tensors = _header_and_tensors(source)
    keys = sorted(metadata)
    metadata[keys[key_index % len(keys)]] = value
    path = tmp_path_factory.mktemp("entry") / "edited.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    _expect_loaded_or_named(read, path)


@FUZZ
@given(tensor_index=st.integers(min_value=0, max_value=50),
       shape=st.lists(st.integers(min_value=0, max_value=5), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8]))
def test_wrong_tensor_shapes_and_dtypes_load_or_are_refused_by_name(valid_file, tensor_index, shape, dtype,
                                                                     tmp_path_factory):
    source, read = valid_file
    metadata, tensors = _header_and_tensors(source)
    keys = sorted(tensors)
    tensors[keys[tensor_index % len(keys)]] = torch.zeros(shape, dtype=dtype)
    path = tmp_path_factory.mktemp("tensor") / "reshaped.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    _expect_loaded_or_named(read, path)


def test_nan_weights_a_newer_version_and_another_kind_are_refused_with_what_is_wrong(valid_file, tmp_path):
    source, read = valid_file
    metadata, tensors = _header_and_tensors(source)
    poisoned = {key: value.clone() for key, value in tensors.items()}
    key = next(key for key in sorted(poisoned) if poisoned[key].is_floating_point() and key != "held_out_error")
    poisoned[key].view(-1)[0] = float("nan")
    save_file(poisoned, str(tmp_path / "nan.safetensors"), metadata={METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(TensorFileError, match=r"nan.safetensors: tensor .* NaN or infinite"):
        read(tmp_path / "nan.safetensors")
    save_file(tensors, str(tmp_path / "newer.safetensors"),
              metadata={METADATA_KEY: json.dumps({**metadata, "version": metadata["version"] + 1})})
    with pytest.raises(TensorFileError, match=r"newer.safetensors .* newer FastGuidance.*update FastGuidance"):
        read(tmp_path / "newer.safetensors")
    save_file(tensors, str(tmp_path / "other.safetensors"),
              metadata={METADATA_KEY: json.dumps({**metadata, "format": "something.else"})})
    with pytest.raises(TensorFileError, match=r"other.safetensors holds 'something.else'"):
        read(tmp_path / "other.safetensors")


def test_metadata_asking_for_an_enormous_module_costs_no_memory(tmp_path):
    _adapters(tmp_path / "a.safetensors")
    metadata, tensors = _header_and_tensors(tmp_path / "a.safetensors")
    metadata["spec"]["hidden"] = 1 << 40  # a real module of that width would not fit any machine
    save_file(tensors, str(tmp_path / "huge.safetensors"), metadata={METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(TensorFileError, match="huge.safetensors .*do not match its metadata|huge.safetensors .*tensor"):
        load_adapters(tmp_path / "huge.safetensors")


def test_a_header_claiming_a_huge_tensor_is_refused_by_name(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}).encode()
    (tmp_path / "claim.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(TensorFileError, match="claim.safetensors"):
        load_adapters(tmp_path / "claim.safetensors")
