"""The example workflows in ``example_workflows/`` are well-formed UI-format graphs (no ComfyUI needed).

ComfyUI lists a pack's ``example_workflows/*.json`` in the frontend's template browser (COMFYUI.md §5);
the frontend opens them as saved UI workflows. These checks are structural: the format's keys, that
every link joins existing nodes and slots with one type, and that the FastGuidance nodes used and
defined agree. Whether widget values and slot types match the real host's node definitions is
checked against a running server in ``tests/comfy/test_server.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = PROJECT_ROOT / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
#: nodes that exist only in the frontend (no Python class, no "Node name for S&R")
NOTE_NODES = {"Note", "MarkdownNote"}
TOP_LEVEL_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "properties"}


def defined_node_ids() -> set[str]:
    """FastGuidance node ids declared in the pack's node source (``node_id="FastGuidance_..."``)."""
    ids: set[str] = set()
    for path in (PROJECT_ROOT / "nodes").glob("*.py"):
        ids.update(re.findall(r'node_id\s*=\s*"(FastGuidance_\w+)"', path.read_text(encoding="utf-8")))
    return ids


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def is_pair_of_numbers(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def test_there_are_example_workflows():
    assert WORKFLOWS, f"no example workflows in {WORKFLOW_DIR}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_is_ui_format(path):
    workflow = load(path)
    assert isinstance(workflow, dict)
    assert TOP_LEVEL_KEYS <= set(workflow), f"missing keys: {sorted(TOP_LEVEL_KEYS - set(workflow))}"
    assert "prompt" not in workflow and not all(isinstance(v, dict) and "class_type" in v for v in workflow.values()), \
        "this looks like an API-format prompt, not a UI workflow"
    assert workflow["version"] == 0.4
    assert isinstance(workflow["nodes"], list) and workflow["nodes"]
    assert isinstance(workflow["links"], list) and isinstance(workflow["groups"], list)
    assert isinstance(workflow["config"], dict) and isinstance(workflow["extra"], dict)

    ids = [node["id"] for node in workflow["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    assert workflow["last_node_id"] >= max(ids)
    orders = [node["order"] for node in workflow["nodes"]]
    assert sorted(orders) == list(range(len(orders))), f"node orders are not 0..{len(orders) - 1}: {orders}"
    for node in workflow["nodes"]:
        where = f"node {node.get('id')} ({node.get('type')})"
        assert NODE_KEYS <= set(node), f"{where}: missing {sorted(NODE_KEYS - set(node))}"
        assert isinstance(node["id"], int) and isinstance(node["type"], str) and node["type"]
        assert is_pair_of_numbers(node["pos"]) and is_pair_of_numbers(node["size"]), where
        assert isinstance(node["flags"], dict) and node["mode"] in (0, 2, 4), where
        assert isinstance(node.get("widgets_values", []), list), where
        if node["type"] not in NOTE_NODES:
            assert node["properties"].get("Node name for S&R") == node["type"], where
        for slot in node.get("inputs", []):
            assert {"name", "type", "link"} <= set(slot), f"{where}: input {slot}"
        for slot in node.get("outputs", []):
            assert {"name", "type", "links"} <= set(slot), f"{where}: output {slot}"
    for group in workflow["groups"]:
        assert isinstance(group.get("title"), str) and len(group.get("bounding", [])) == 4, group


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_links_join_existing_slots_with_one_type(path):
    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    link_ids = [link[0] for link in workflow["links"]]
    assert len(link_ids) == len(set(link_ids)), "duplicate link ids"
    if link_ids:
        assert workflow["last_link_id"] >= max(link_ids)
    links = {}
    for link in workflow["links"]:
        assert isinstance(link, list) and len(link) == 6, f"link {link} is not [id, from, from_slot, to, to_slot, type]"
        link_id, source, source_slot, target, target_slot, kind = link
        where = f"link {link_id}"
        assert source in nodes and target in nodes, f"{where}: unknown node"
        outputs, inputs = nodes[source].get("outputs", []), nodes[target].get("inputs", [])
        assert 0 <= source_slot < len(outputs), f"{where}: node {source} has no output {source_slot}"
        assert 0 <= target_slot < len(inputs), f"{where}: node {target} has no input {target_slot}"
        output, input_ = outputs[source_slot], inputs[target_slot]
        assert output["type"] == kind, f"{where}: {kind} from an output of type {output['type']}"
        # "*" inputs (PreviewAny) accept any type; the link keeps the output's type, as the frontend saves it
        assert input_["type"] in (kind, "*"), f"{where}: {kind} into input {input_['name']} of type {input_['type']}"
        assert link_id in (output["links"] or []), f"{where}: not listed by node {source} output {source_slot}"
        assert input_["link"] == link_id, f"{where}: node {target} input {input_['name']} says {input_['link']}"
        links[link_id] = link
    # and the other way round: every link a slot names exists and starts or ends there
    for node in workflow["nodes"]:
        for slot_index, slot in enumerate(node.get("inputs", [])):
            if slot["link"] is not None:
                assert slot["link"] in links, f"node {node['id']} input {slot['name']}: no link {slot['link']}"
                assert links[slot["link"]][3:5] == [node["id"], slot_index]
        for slot_index, slot in enumerate(node.get("outputs", [])):
            for link_id in slot["links"] or []:
                assert link_id in links, f"node {node['id']} output {slot['name']}: no link {link_id}"
                assert links[link_id][1:3] == [node["id"], slot_index]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_explains_itself_with_a_note(path):
    notes = [node for node in load(path)["nodes"] if node["type"] in NOTE_NODES]
    assert notes and all(isinstance(n["widgets_values"][0], str) and n["widgets_values"][0].strip() for n in notes)


def test_fastguidance_nodes_used_and_defined_agree():
    defined = defined_node_ids()
    assert defined, "no node_id=\"FastGuidance_...\" found in nodes/*.py"
    used_by: dict[str, list[str]] = {}
    for path in WORKFLOWS:
        for node in load(path)["nodes"]:
            if node["type"].startswith("FastGuidance_"):
                used_by.setdefault(node["type"], []).append(path.name)
    unknown = set(used_by) - defined
    assert not unknown, f"workflows use node ids the pack does not define: {sorted(unknown)} ({used_by})"
    unused = defined - set(used_by)
    assert not unused, f"no example workflow uses {sorted(unused)}"


def test_every_workflow_has_a_screenshot_in_the_docs():
    """docs/workflows.md shows each example workflow after a browser-test run (tests/browser/readme_images.py)."""
    page = (PROJECT_ROOT / "docs" / "workflows.md").read_text(encoding="utf-8")
    for path in WORKFLOWS:
        image = f"images/workflows/{path.stem}.png"
        assert (PROJECT_ROOT / "docs" / image).is_file(), f"{image} is missing: run the browser test with FASTGUIDANCE_SCREENSHOTS"
        assert f"({image})" in page, f"docs/workflows.md does not show {image}"
        assert f"`{path.stem}`" in page, f"docs/workflows.md's table does not list {path.stem}"


def test_every_picture_the_readme_shows_exists():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme) + re.findall(r'<img src="([^"]+)"', readme)
    assert any(path.startswith("example_workflows/") for path in shown), "the README's quick start shows no workflow"
    for path in shown:
        assert (PROJECT_ROOT / path).is_file(), f"the README shows {path}, which does not exist"
        if path.startswith("example_workflows/"):
            assert f"`{Path(path).stem}`" in readme, f"the README shows {path} without naming its workflow"
