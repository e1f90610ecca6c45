"""Every input of every node checked before any work, in the real host (issue 19).

In-process: each node's ``validate_inputs`` accepts its schema defaults and answers every bad value
(wrong type, NaN, infinity, out of range, unknown choice) with the pack's message naming the input,
never an exception; ``execute`` refuses the same values (as links deliver them) before it touches
its model. Over HTTP: random API prompts posted to a real server are answered 400 with the pack's
messages, never with an exception of the pack's validation, and write no file anywhere.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_server import UNET_NAME, running_server
from conftest import node_defaults, pack_module

BAD_VALUES = ["abc", "", float("nan"), float("inf"), float("-inf"), 1e300, -1e300, {"a": 1}, True, None]


def pack_nodes(host) -> list[str]:
    return sorted(name for name in host.nodes.NODE_CLASS_MAPPINGS if name.startswith("FastGuidance_"))


def widget_inputs(host, node_id: str) -> dict[str, tuple]:
    schema = host.nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    return {name: spec for section in ("required", "optional") for name, spec in schema.get(section, {}).items()
            if spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or isinstance(spec[0], list)}


def is_valid(spec: tuple, value: object) -> bool:
    """What the schema allows (the contract the pack enforces), computed independently of the pack."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        return isinstance(value, str) and value in (kind if isinstance(kind, list) else options.get("options", []))
    if kind in ("INT", "FLOAT"):
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (kind == "FLOAT" or float(value).is_integer())  # INT: any whole value (a link may send 20.0)
                and options.get("min", -math.inf) <= value <= options.get("max", math.inf))
    if kind == "STRING":
        return isinstance(value, str)
    return isinstance(value, bool)


def as_host_converts(spec: tuple, value: object) -> object:
    """The value the host hands ``validate_inputs``: it converts typed-in INT, FLOAT, STRING and BOOLEAN
    values first (``int(v)``, ``float(v)``, …) and passes the raw value on when that fails."""
    convert = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(spec[0] if isinstance(spec[0], str) else "")
    if convert is None:
        return value
    try:
        return convert(value)
    except Exception:  # noqa: BLE001 - whatever the host's conversion raises, it keeps the raw value
        return value


def test_every_node_accepts_its_defaults_and_names_every_bad_value(host):
    for node_id in pack_nodes(host):
        node = host.node(node_id)
        inputs = widget_inputs(host, node_id)
        if not inputs:
            continue
        defaults = node_defaults(host, node_id)
        assert node.validate_inputs(**defaults) is True, (node_id, node.validate_inputs(**defaults))
        for name, spec in inputs.items():
            for value in BAD_VALUES:
                if value is None or is_valid(spec, value):
                    continue
                answer = node.validate_inputs(**{**defaults, name: value})
                assert isinstance(answer, str) and answer.startswith(f"{name} = "), (node_id, name, value, answer)
            if spec[0] in ("INT", "FLOAT") and "max" in spec[1]:
                above = spec[1]["max"] + 1
                answer = node.validate_inputs(**{**defaults, name: above})
                assert isinstance(answer, str) and answer.startswith(f"{name} = "), (node_id, name, above, answer)
                assert "from" in answer and "to" in answer, answer  # the range, as the tooltip states it


@pytest.mark.parametrize("node_id, name", [("FastGuidance_AdaptiveGuidance", "threshold"),
                                           ("FastGuidance_CompressGuidance", "skew"),
                                           ("FastGuidance_LinearAG", "error_bound")])
def test_execute_refuses_a_linked_bad_value_before_it_touches_the_model(host, node_id, name):
    errors = pack_module(host, "fastguidance.errors")
    arguments = {**node_defaults(host, node_id), "model": None, name: float("nan")}
    if node_id == "FastGuidance_LinearAG":
        arguments["coefficients"] = "any.safetensors"
    with pytest.raises(errors.InvalidInputError, match=f"^{name} = nan"):
        host.node(node_id).execute(**arguments)  # model None: any use of it before the check would fail differently


def test_every_node_checks_its_inputs_at_queue_time_and_before_execute(host):
    """One shared way (nodes/validation.py ValidatedNode): no node can forget validate_inputs or the check
    before execute, also on the class clone the host makes per call."""
    validation = pack_module(host, "nodes.validation")
    for node_id in pack_nodes(host):
        cls = host.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(cls, validation.ValidatedNode), node_id
        assert getattr(cls.execute.__func__, "checks_inputs", False), node_id
        assert getattr(host.node(node_id).execute.__func__, "checks_inputs", False), node_id
        assert cls.validate_inputs.__func__ is validation.ValidatedNode.validate_inputs.__func__, node_id


@pytest.mark.parametrize("linked", [3, 3.0, np.int64(3), np.float32(3.0)])
def test_a_linked_whole_number_of_any_numeric_type_reaches_an_int_input_as_an_int(host, tiny_model, linked):
    engine_patch = pack_module(host, "nodes.engine_patch")
    settings = {**node_defaults(host, "FastGuidance_CompressGuidance"), "guided_steps": linked}
    assert host.node("FastGuidance_CompressGuidance").validate_inputs(**settings) is True
    patched = host.node("FastGuidance_CompressGuidance").execute(tiny_model, **settings)[0]
    policy = patched.model_options["transformer_options"][engine_patch.ENGINE_KEY].policies[-1]
    assert policy.guided_steps == 3 and type(policy.guided_steps) is int


@pytest.mark.parametrize("linked", [3.5, np.float64(3.5), np.bool_(True)])
def test_a_linked_fraction_or_bool_in_an_int_input_is_refused_before_any_work(host, linked):
    errors = pack_module(host, "fastguidance.errors")
    settings = {**node_defaults(host, "FastGuidance_CompressGuidance"), "guided_steps": linked}
    with pytest.raises(errors.InvalidInputError, match="^guided_steps = .* use a whole number"):
        host.node("FastGuidance_CompressGuidance").execute(None, **settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("validation_server")) as srv:
        yield srv


def files_under(root) -> set[str]:
    found = set()
    for folder, _, names in os.walk(root):
        found.update(os.path.relpath(os.path.join(folder, name), root) for name in names)
    return found


#: nodes the prompt wires the fuzzed node to; "2"'s CONDITIONING goes into every MODEL/CLIP input on
#: purpose: the link's wrong type makes the prompt invalid, so it never runs, while the host still
#: asks the node's validate_inputs about every widget value (execution.py validates all inputs)
BASE = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET_NAME, "weight_dtype": "default"}},
    "2": {"class_type": "FGTest_RandomConditioning", "inputs": {"seed": 1, "scale": 3.0}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
}
LINKS = {"MODEL": ["2", 0], "CLIP": ["2", 0], "CONDITIONING": ["2", 0], "LATENT": ["4", 0], "IMAGE": ["2", 0]}

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 64), max_value=1 << 64)
                | st.floats() | st.text(max_size=12) | st.sampled_from(["euler", "none", "a/b", "CON", "..", "x" * 300]))
random_value = json_scalars | st.dictionaries(st.text(max_size=4), json_scalars, max_size=2)


@settings(derandomize=True, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_api_prompts_get_the_packs_answers_and_write_nothing(server, host, data):
    node_id = data.draw(st.sampled_from([n for n in pack_nodes(host) if widget_inputs(host, n)]))
    schema = host.nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    inputs, fuzzed = {}, {}
    for section in ("required", "optional"):
        for name, spec in schema.get(section, {}).items():
            kind = spec[0] if not isinstance(spec[0], list) else "COMBO"
            if kind in LINKS:
                inputs[name] = LINKS[kind]
            elif kind in ("VAE",):
                continue
            elif data.draw(st.booleans(), label=f"fuzz {name}"):
                inputs[name] = fuzzed[name] = data.draw(random_value, label=name)
            elif len(spec) > 1 and "default" in spec[1]:
                inputs[name] = spec[1]["default"]
    prompt = {**BASE, "10": {"class_type": node_id, "inputs": inputs},
              "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}}}
    before = files_under(server.root)
    with server.explain():
        response = server.request("/prompt", {"prompt": prompt, "client_id": "fastguidance-fuzz"})
        assert response.status == 400 and isinstance(response.body, dict), (response.status, response.body)
        assert server.process.poll() is None, "the server died"
        errors = response.body.get("node_errors", {}).get("10", {}).get("errors", [])
        assert errors, json.dumps(response.body)[:2000]
        for error in errors:
            assert error["type"] not in ("exception_during_validation", "exception_during_inner_validation"), error
        custom = " | ".join(e.get("details", "") for e in errors if e["type"] == "custom_validation_failed")
        specs = {**schema.get("required", {}), **schema.get("optional", {})}
        bad = [name for name, value in fuzzed.items()
               if not isinstance(value, dict)  # a dict is the host's own "__value__" wrapper syntax
               and value is not None and not is_valid(specs[name], as_host_converts(specs[name], value))]
        if bad:
            assert custom, (node_id, fuzzed, errors)
            # the first bad input is named (a fuzzed dict may come first: it is refused by name too)
            assert any(f"{name} = " in custom for name in fuzzed), (node_id, bad, custom)
        after = files_under(server.root)
        new = {path for path in after - before if not path.startswith(("base/user", "base/temp", "comfyui.log"))
               and not path.endswith(".log")}
        assert not new, new


#: guiders share their patch node's settings table
SHARED_TABLES = {"FastGuidance_AdaptiveGuider": "FastGuidance_AdaptiveGuidance",
                 "FastGuidance_CompressGuider": "FastGuidance_CompressGuidance"}


def test_the_readme_states_every_enforced_range(host):
    """Each node's table in docs/nodes.md (and so its help page) gives every number input the range the pack enforces,
    written as the pack's messages write it ("0–1.0001")."""
    from pathlib import Path

    validation = pack_module(host, "fastguidance.validation")
    readme = (Path(__file__).resolve().parents[2] / "docs" / "nodes.md").read_text(encoding="utf-8")

    def rows_of(node_id: str) -> dict[str, str]:
        section = readme.split(f"`{node_id}`", 1)[1].split("\n## ", 1)[0]
        rows = {}
        for line in section.splitlines():
            if line.startswith("| `"):
                for name in line.split("|")[1].replace("`", "").split(","):
                    rows[name.strip()] = line
        return rows

    missing = []
    for node_id in pack_nodes(host):
        rows = {**(rows_of(SHARED_TABLES[node_id]) if node_id in SHARED_TABLES else {}), **rows_of(node_id)}
        for name, spec in widget_inputs(host, node_id).items():
            if spec[0] in ("INT", "FLOAT"):
                expected = f"{validation._number(spec[1]['min'])}–{validation._number(spec[1]['max'])}"
                if expected not in rows.get(name, ""):
                    missing.append(f"{node_id}.{name}: {expected} (row: {rows.get(name, 'absent')})")
    assert not missing, "\n".join(missing)
