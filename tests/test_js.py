"""The frontend's pure data-shaping code, run by Node's built-in test runner (``tests/js/``).

Node.js is part of the development machines (see the README); where it is missing the test is
skipped with the reason rather than silently passing.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
JS_TESTS = sorted((PROJECT_ROOT / "tests" / "js").glob("*.test.mjs"))


def test_there_are_js_tests():
    assert JS_TESTS, "no tests/js/*.test.mjs"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (needed for the frontend's unit tests)")
def test_frontend_data_shaping_passes_node_test_runner():
    result = subprocess.run(["node", "--test", *map(str, JS_TESTS)], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout


def test_frontend_files_register_one_extension_each_and_chain_handlers():
    """One feature per file; a file that overrides a node handler calls the previous one."""
    for path in (PROJECT_ROOT / "js").glob("*.js"):
        text = path.read_text(encoding="utf-8")
        assert text.count("app.registerExtension(") <= 1, f"{path.name} registers several extensions"
        for handler in ("onDrawForeground", "onExecuted", "onNodeCreated", "onConfigure"):
            if f"nodeType.prototype.{handler} = function" in text:
                assert f"{handler}?.apply(this, arguments)" in text, f"{path.name} does not chain {handler}"
        if "registerExtension" not in text:
            assert "from \"../../scripts/" not in text, f"{path.name} is pure data code: it must not import the app"


def test_the_chart_knows_every_engine_action_and_every_method_node():
    """The frontend's colour table and node table agree with the engine's actions and the pack's nodes."""
    import re

    from fastguidance.engine import Action

    text = (PROJECT_ROOT / "js" / "run_chart_data.js").read_text(encoding="utf-8")
    colours = re.search(r"ACTION_COLORS = Object\.freeze\(\{(.*?)\}\)", text, re.S).group(1)
    assert set(re.findall(r"(\w+):", colours)) == {action.name.lower() for action in Action}
    methods = dict(re.findall(r"(FastGuidance_\w+): \"(\w+)\"", re.search(r"NODE_METHODS = .*?\}\)", text, re.S).group(0)))
    nodes_source = "".join(path.read_text(encoding="utf-8") for path in (PROJECT_ROOT / "nodes").glob("*.py"))
    assert set(methods) <= set(re.findall(r'node_id="(FastGuidance_\w+)"', nodes_source))
    assert methods["FastGuidance_LoadGuidanceAdapter"] == "agd"


def test_legacy_values_of_saved_workflows_are_the_paper_rule_the_nodes_ran_before():
    """Workflows saved before `cosine_space` / `convergence` existed ran the noise cosine without the
    convergence condition: the page (js/legacy_inputs.js) and the nodes' execute defaults agree."""
    import re

    from fastguidance.adaptive_guidance import CONVERGENCE_OFF, PAPER_SETTINGS

    text = (PROJECT_ROOT / "js" / "legacy_inputs.js").read_text(encoding="utf-8")
    entries = re.findall(r'(FastGuidance_\w+): Object\.freeze\(\{ cosine_space: "(\w+)", convergence: ([\d.]+) \}\)', text)
    assert {node for node, *_ in entries} == {"FastGuidance_AdaptiveGuidance", "FastGuidance_AdaptiveGuider"}
    for _, space, convergence in entries:
        assert space == PAPER_SETTINGS["cosine_space"] and float(convergence) == CONVERGENCE_OFF
    node = (PROJECT_ROOT / "nodes" / "adaptive_guidance.py").read_text(encoding="utf-8")
    assert 'LEGACY_VALUES = {"cosine_space": PAPER_SETTINGS["cosine_space"], "convergence": CONVERGENCE_OFF}' in node
    assert node.count('convergence: float = LEGACY_VALUES["convergence"]') == 2
    assert node.count('cosine_space: str = LEGACY_VALUES["cosine_space"]') == 2


def test_every_node_that_writes_a_loader_file_tells_the_page():
    """The page refreshes its lists on the message the writers send (js/file_lists.js): same event
    name on both sides, and every node that asks model_folders for a new file announces it once written."""
    import re

    text = (PROJECT_ROOT / "js" / "file_lists.js").read_text(encoding="utf-8")
    messages = (PROJECT_ROOT / "nodes" / "page_messages.py").read_text(encoding="utf-8")
    event = re.search(r'^FILE_EVENT = "([\w.]+)"', messages, re.M).group(1)
    assert f'const FILE_EVENT = "{event}";' in text
    writers = 0
    for path in (PROJECT_ROOT / "nodes").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        for folder in re.findall(r"model_folders\.new_file\(model_folders\.(\w+),", source):
            writers += 1
            assert f"page_messages.file_written(model_folders.{folder}, path)" in source, (path.name, folder)
    assert writers == 4
