"""The pack in the real frontend: every example workflow opens, runs, and FastGuidance draws its chart.

Needs, besides ``COMFYUI_PATH``: Debian's Chromium (``apt install chromium``) and ``playwright-core``
from npm (``npm install`` in this repository; it drives the installed browser, nothing is
downloaded). Skipped with the reason when either is missing. Screenshots go to the test's temporary
folder, or to ``$FASTGUIDANCE_SCREENSHOTS`` when set (the README's pictures come from there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from comfy_server import PACK_DIR, PACK_FOLDER, running_server
from test_server import RUN_ELSEWHERE  # workflows for models this server cannot provide: opened here, run there

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLAYWRIGHT = PACK_DIR / "node_modules" / "playwright-core"
SCRIPT = PACK_DIR / "tests" / "browser" / "run_workflows.mjs"
#: nodes whose runs draw a chart
CHART_NODES = {"FastGuidance_AdaptiveGuidance", "FastGuidance_AdaptiveGuider", "FastGuidance_CompressGuidance",
               "FastGuidance_CompressGuider", "FastGuidance_LinearAG", "FastGuidance_LoadGuidanceAdapter"}
#: what the tested frontends log by themselves, with no custom node installed (checked against a
#: server without the pack): 404s for optional resources (1.49: the template cards' thumbnails), a
#: TypeError of 1.27's settings store at start-up ("reading 'id'" in onChange: it sets a setting it
#: never registered), and 1.49's own warning at start-up and reload that its graph was read before it
#: was built (the pack's files never read `rootGraph`, the getter that logs it)
IGNORED_CONSOLE = ("Failed to load resource", "favicon")
KNOWN_FRONTEND_ERRORS = ("Cannot read properties of undefined (reading 'id') @     at onChange (",
                         "console: ComfyApp graph accessed before initialization @ /assets/")

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt install chromium chromium-driver"),
    pytest.mark.skipif(not PLAYWRIGHT.is_dir(), reason="needs playwright-core: run `npm install` in the repository"),
    pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js"),
]


@pytest.fixture(scope="module")
def browser_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    shots = Path(os.environ.get("FASTGUIDANCE_SCREENSHOTS") or root / "screenshots")
    with running_server(root / "server", checkpoint=True) as server:
        with server.explain():
            # Frontend 1.27.10 cannot build model-loader widgets when one of its default model-loader
            # nodes is missing (its model-to-node store reads an undefined node definition), so every
            # CheckpointLoaderSimple in the workflows would fail: UpscaleModelLoader needs spandrel.
            missing = {"UpscaleModelLoader"} - set(server.get("/object_info"))
            assert not missing, (f"the host lacks {sorted(missing)}: install spandrel in ComfyUI's environment "
                                 "(pip install --no-deps spandrel)")
            result = subprocess.run(["node", str(SCRIPT), server.url, str(shots), CHROMIUM, PACK_FOLDER], cwd=PACK_DIR,
                                    capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, f"the browser script failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            data = json.loads(result.stdout.strip().splitlines()[-1])
            (shots / "browser_run.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
        data["server_log"] = server.log()
        # what the server was given (the repository copied at its start; another workflow may land meanwhile)
        installed = server.root / "env" / "custom_nodes" / PACK_FOLDER / "example_workflows"
        data["installed"] = sorted(path.stem for path in installed.glob("*.json"))
    return data


def pack_errors(messages):
    """Errors not known to come from the frontend itself: anything logged by or about the pack's files
    (``/extensions/<pack>/``) always counts; a missing optional resource (the favicon, 1.49's thumbnails of
    template cards under /api/workflow_templates/) does not."""
    def known(message):
        if any(ignored in message for ignored in IGNORED_CONSOLE):
            return True
        return "fastguidance" not in message.lower() and any(known in message for known in KNOWN_FRONTEND_ERRORS)
    return [m for m in messages if "/extensions/" in m or not known(m)]


def test_every_example_workflow_runs_in_the_page(browser_run):
    names = browser_run["installed"]
    assert names and set(names) <= {path.stem for path in (PACK_DIR / "example_workflows").glob("*.json")}
    assert sorted(w["name"] for w in browser_run["workflows"]) == names
    # only the workflows whose models the server lacks are left unrun, and they are opened and checked
    not_run = {w["name"]: w["missingModels"] for w in browser_run["workflows"] if w.get("notRun")}
    assert set(not_run) == set(RUN_ELSEWHERE) & set(names), not_run
    failed = {w["name"]: w["error"] for w in browser_run["workflows"] if not w["ok"] and not w.get("notRun")}
    assert not failed, f"{failed}\n\n{browser_run['server_log'][-6000:]}"


def test_the_chart_is_drawn_on_every_patch_node_that_ran(browser_run):
    for workflow in (w for w in browser_run["workflows"] if not w.get("notRun")):
        ours = [t for t in workflow["nodes"] if t in CHART_NODES]
        assert len(workflow["charts"]) == len(ours), workflow
        for chart in workflow["charts"]:
            assert chart["calls"] > 0 and chart["summary"].startswith("model evaluations: "), (workflow["name"], chart)


def test_the_step_predictor_shows_its_choice(browser_run):
    shown = [count for w in browser_run["workflows"] for count in w.get("stepCounts", [])]
    assert shown and all(count in ("2 steps", "3 steps") for count in shown), shown


def test_loaders_list_the_files_made_earlier_in_the_same_page(browser_run):
    """The workflows that write files (calibration, training) run first; the loaders of the workflows
    opened after them, in the same page, list every file the server has and are not outlined red (frontend
    1.49 flags a loader whose file is not in its list; the page refreshes its lists on the pack's file
    message). A file the server lacks (made by a muted trainer of the same workflow) is no concern here."""
    active = {(w["name"], loader["type"], loader["value"]): loader for w in browser_run["workflows"]
              for loader in w["loaders"] if not loader["muted"] and loader["onServer"]}
    assert {"FastGuidance_LinearAG", "FastGuidance_LoadGuidanceAdapter", "FastGuidance_StepPredictor"} <= {
        kind for _, kind, _ in active}, sorted(active)
    stale = {key: loader for key, loader in active.items() if not loader["listed"] or loader["flagged"]}
    assert not stale, stale


def test_a_loader_unmuted_after_the_run_that_wrote_its_file_runs_without_a_reload(browser_run):
    """Tune's workflow keeps Load FastGuidance Preset muted for later runs: unmuted after Tune wrote the
    preset, it lists the preset, is not flagged, and the next run uses it."""
    later = {w["name"]: w["laterRun"] for w in browser_run["workflows"] if w.get("laterRun")}
    assert "tune_ksampler" in later, sorted(later)
    assert "FastGuidance_LoadPreset" in later["tune_ksampler"]["unmuted"], later["tune_ksampler"]
    for name, run in later.items():
        assert run["ok"], (name, run)
        assert run["loaders"] and all(loader["listed"] and not loader["flagged"] for loader in run["loaders"]), (
            name, run["loaders"])


def test_screenshots_are_saved(browser_run):
    for workflow in browser_run["workflows"]:
        assert workflow["screenshot"] and Path(workflow["screenshot"]).stat().st_size > 10_000, workflow


def test_the_pack_never_reads_the_graph_before_the_page_built_it():
    """1.49's `rootGraph` getter logs an error when read too early: the pack's files use `app.graph` only
    once the page runs (events, node callbacks), so that known error is never the pack's."""
    for path in (PACK_DIR / "js").glob("*.js"):
        assert "rootGraph" not in path.read_text(encoding="utf-8"), path.name


def test_the_page_logged_no_errors_and_survives_a_reload(browser_run):
    assert pack_errors(browser_run["errors"]) == [], browser_run["errors"]
    for workflow in browser_run["workflows"]:
        assert pack_errors(workflow["pageErrors"]) == [], workflow["name"]
    assert pack_errors(browser_run["reload"]["errors"]) == []
