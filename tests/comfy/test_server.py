"""The pack in a real ComfyUI server, installed the way users install it (a folder in ``custom_nodes``).

One server is started for the module by :func:`comfy_server.running_server`, in a temporary folder
that holds:

- ``custom_nodes/FastGuidance``: a copy of this repository (no ``.git``, virtual environments or caches);
- ``custom_nodes/fgtest_conditioning``: a test-only pack with ``FGTest_RandomConditioning`` (seeded
  random CONDITIONING, so no text encoder weights are needed);
- ``diffusion_models/fg_tiny_sd15_unet.safetensors``: a one-level UNet with 320 channels and context
  768, built at test time with ComfyUI's own SD15 classes and seeded weights; model detection takes
  it for SD1.5 and the built-in ``UNETLoader`` loads it;
- ``extra_model_paths.yaml`` that points ``diffusion_models`` and ``custom_nodes`` there, and
  ``--base-directory`` set to an empty folder, so that the checkout's own models, packs, output and
  user folders are neither used nor written.

The server's log is kept in the temporary folder and appended to every failure message.
Uses only the standard library for HTTP, so that collecting this file never needs ``requests``.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Iterator

import pytest
import torch

from comfy_server import PACK_DIR, PACK_FOLDER, UNET_NAME, Server, running_server

#: what the pack must register, with its menu category
EXPECTED_NODES = {
    "FastGuidance_AdaptiveGuidance": "sampling/fastguidance",
    "FastGuidance_AdaptiveGuider": "sampling/custom_sampling/guiders",
    "FastGuidance_CompareImages": "image/fastguidance",
    "FastGuidance_CompressGuidance": "sampling/fastguidance",
    "FastGuidance_CompressGuider": "sampling/custom_sampling/guiders",
    "FastGuidance_LinearAGCalibrate": "sampling/fastguidance",
    "FastGuidance_LinearAG": "sampling/fastguidance",
    "FastGuidance_StepPredictor": "sampling/fastguidance",
    "FastGuidance_TrainStepPredictor": "sampling/fastguidance",
    "FastGuidance_TrainGuidanceAdapter": "sampling/fastguidance",
    "FastGuidance_LoadGuidanceAdapter": "sampling/fastguidance",
}
#: node types that only the frontend knows (never in /object_info)
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("comfy_server"), checkpoint=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


# --------------------------------------------------------------------------------------------------
# Workflows (API format)


def pack_node_ids() -> set[str]:
    """Every FastGuidance node id defined in the pack's source."""
    ids = set()
    for path in (PACK_DIR / "nodes").glob("*.py"):
        ids.update(re.findall(r'node_id\s*=\s*"(FastGuidance_\w+)"', path.read_text(encoding="utf-8")))
    return ids


SETTINGS = {"threshold": 0.95, "start_percent": 0.0, "end_percent": 1.0, "after_cutoff": "cond_only"}
#: the paper's cosine rule: what a prompt without cosine_space and convergence (saved before they existed) runs
PAPER_RULE = {"cosine_space": "noise", "convergence": 1.0}


def base_prompt() -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "FGTest_RandomConditioning", "inputs": {"seed": 1, "scale": 3.0}},
        "3": {"class_type": "FGTest_RandomConditioning", "inputs": {"seed": 2, "scale": 0.1}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def patch_branch(settings: dict = SETTINGS) -> dict:
    """UNETLoader -> FastGuidance_AdaptiveGuidance -> KSampler -> SaveLatent."""
    return {
        "10": {"class_type": "FastGuidance_AdaptiveGuidance", "inputs": {"model": ["1", 0], **settings}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": 3, "steps": 8, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "fgtest/patch_ksampler"}},
    }


def guider_branch(settings: dict = SETTINGS) -> dict:
    """UNETLoader -> FastGuidance_AdaptiveGuider -> SamplerCustomAdvanced -> SaveLatent."""
    return {
        "20": {"class_type": "FastGuidance_AdaptiveGuider", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 6.0, **settings}},
        "21": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "23": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 8,
                                                          "denoise": 1.0}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["21", 0], "guider": ["20", 0], "sampler": ["22", 0], "sigmas": ["23", 0],
            "latent_image": ["4", 0]}},
        "25": {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": "fgtest/guider_custom"}},
    }


def load_latent(server: Server, item: dict):
    from safetensors.torch import load_file

    path = server.output_dir / item.get("subfolder", "") / item["filename"]
    assert path.is_file(), f"SaveLatent reported {item} but {path} does not exist"
    return load_file(str(path))["latent_tensor"]


# --------------------------------------------------------------------------------------------------
# Tests


def test_pack_imports_from_custom_nodes(server):
    log = server.log()
    pack_path = str(server.root / "env" / "custom_nodes" / PACK_FOLDER)
    with server.explain():
        failed = [line for line in log.splitlines()
                  if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK_FOLDER in line]
        assert not failed, f"ComfyUI failed to import the pack: {failed}"
        timing = [line for line in log.splitlines() if re.search(r"seconds.*: " + re.escape(pack_path) + r"$", line)]
        assert timing, f"the pack at {pack_path} is missing from ComfyUI's import-times list"
        assert "(IMPORT FAILED)" not in timing[0]
        assert "fgtest_conditioning" in log and not any(
            "IMPORT FAILED" in line and "fgtest_conditioning" in line for line in log.splitlines())


def test_every_node_has_its_help_page_where_the_frontend_looks(server, object_info):
    """Frontend 1.27.10 fetches /extensions/<pack>/docs/<node>.md for a custom node's help panel."""
    with server.explain():
        for node_id in sorted(name for name in object_info if name.startswith("FastGuidance_")):
            response = server.request(f"/extensions/{PACK_FOLDER}/docs/{node_id}.md")
            assert response.status == 200, f"no help page for {node_id}: {response.status}"
            assert response.body == (PACK_DIR / "js" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")


def test_object_info_lists_nodes_with_categories_descriptions_tooltips(server, object_info):
    with server.explain():
        defined = pack_node_ids()
        assert set(EXPECTED_NODES) <= defined, f"node ids found in nodes/*.py: {sorted(defined)}"
        listed = {name for name in object_info if name.startswith("FastGuidance_")}
        assert listed == defined, f"/object_info lists {sorted(listed)}, nodes/*.py defines {sorted(defined)}"
        assert "FGTest_RandomConditioning" in object_info
        for node_id in sorted(defined):
            info = object_info[node_id]
            if node_id in EXPECTED_NODES:
                assert info["category"] == EXPECTED_NODES[node_id], node_id
            assert info["python_module"].startswith("custom_nodes."), (node_id, info["python_module"])
            assert info.get("description", "").strip(), f"{node_id} has no description"
            assert info.get("display_name", "").strip(), f"{node_id} has no display name"
            for section in ("required", "optional"):
                for name, spec in info["input"].get(section, {}).items():
                    options = spec[1] if len(spec) > 1 else {}
                    assert str(options.get("tooltip", "")).strip(), f"{node_id}.{name} ({section}) has no tooltip"
            tooltips = info.get("output_tooltips") or []
            assert len(tooltips) == len(info["output"]) and all(t and t.strip() for t in tooltips), \
                f"{node_id} output tooltips: {tooltips}"


def test_workflow_with_both_nodes_runs(server):
    # the patch names the paper's rule; the guider's prompt predates cosine_space and convergence (an old API
    # prompt), so it must run the same rule
    prompt = {**base_prompt(), **patch_branch({**SETTINGS, **PAPER_RULE}), **guider_branch(SETTINGS)}
    log_before = len(server.log())
    with server.explain():
        _, entry = server.run_prompt(prompt)
        status = entry["status"]
        errors = [message for message in status.get("messages", []) if message[0] == "execution_error"]
        assert status.get("status_str") == "success" and status.get("completed") is True and not errors, \
            json.dumps(status, indent=1)
        outputs = entry["outputs"]
        assert set(outputs) >= {"12", "25"}, f"outputs: {outputs}"
        latents = {node: load_latent(server, outputs[node]["latents"][0]) for node in ("12", "25")}
        for node, latent in latents.items():
            assert tuple(latent.shape) == (1, 4, 8, 8) and bool(latent.isfinite().all()), (node, latent.shape)
        # The patch on KSampler and the guider on SamplerCustomAdvanced run the same policy on the same
        # noise, sigmas and conditionings: they must agree.
        difference = float((latents["12"] - latents["25"]).abs().max())
        assert difference < 1e-4, f"KSampler+patch and SamplerCustomAdvanced+guider differ by {difference}"

        # The engine logs one summary per sampling run (COMFYUI.md §5: logging, not print).
        new_log = server.log()[log_before:]
        summaries = re.findall(r"FastGuidance \[ag\]: (\d+)/(\d+) uncond evaluations skipped.*", new_log)
        assert len(summaries) == 2, f"expected one run summary per sampler, found {summaries}"
        # With threshold 0.95 the noise cosine crosses it half-way: some, not all, unconds are skipped.
        for skipped, calls in summaries:
            assert int(calls) == 8 and 0 < int(skipped) < 8, summaries


@pytest.mark.parametrize("branch", [patch_branch, guider_branch], ids=["patch", "guider"])
def test_reversed_window_is_refused_before_running(server, branch):
    bad = dict(SETTINGS, start_percent=0.8, end_percent=0.2)
    prompt = {**base_prompt(), **branch(bad)}
    node = "10" if branch is patch_branch else "20"
    with server.explain():
        response = server.request("/prompt", {"prompt": prompt, "client_id": "fastguidance-test"})
        assert response.status == 400, f"{response.status}: {response.body}"
        node_errors = response.body.get("node_errors", {})
        assert node in node_errors, json.dumps(response.body, indent=1)
        messages = [" ".join(str(error.get(key, "")) for key in ("message", "details"))
                    for error in node_errors[node]["errors"]]
        assert any("start_percent" in message and "0.8" in message for message in messages), messages
        assert "prompt_id" not in response.body


COMPRESS_SETTINGS = {"compression": 4.0, "guided_steps": 0, "skew": 2.0, "mode": "reuse"}


def compress_prompt(settings: dict = COMPRESS_SETTINGS) -> dict:
    """The patch and guider branches with the Compress Guidance nodes in place of the Adaptive Guidance ones."""
    prompt = {**base_prompt(), **patch_branch({}), **guider_branch({})}
    prompt["10"] = {"class_type": "FastGuidance_CompressGuidance", "inputs": {"model": ["1", 0], **settings}}
    prompt["20"] = {"class_type": "FastGuidance_CompressGuider", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 6.0, **settings}}
    return prompt


def test_compress_guidance_nodes_run(server):
    log_before = len(server.log())
    with server.explain():
        _, entry = server.run_prompt(compress_prompt())
        status = entry["status"]
        assert status.get("status_str") == "success" and status.get("completed") is True, json.dumps(status, indent=1)
        latents = {node: load_latent(server, entry["outputs"][node]["latents"][0]) for node in ("12", "25")}
        difference = float((latents["12"] - latents["25"]).abs().max())
        assert difference < 1e-4, f"KSampler+patch and SamplerCustomAdvanced+guider differ by {difference}"
        # compression 4 over 8 steps: 2 guided steps, the other 6 reuse their guidance
        summaries = re.findall(r"FastGuidance \[compg\]: (\d+)/(\d+) uncond evaluations skipped.*",
                               server.log()[log_before:])
        assert summaries == [("6", "8"), ("6", "8")], summaries


def test_compress_guidance_bad_compression_is_refused_before_running(server):
    prompt = compress_prompt(dict(COMPRESS_SETTINGS, compression=0.5))
    with server.explain():
        response = server.request("/prompt", {"prompt": prompt, "client_id": "fastguidance-test"})
        assert response.status == 400, f"{response.status}: {response.body}"
        node_errors = response.body.get("node_errors", {})
        for node in ("10", "20"):
            assert node in node_errors, json.dumps(response.body, indent=1)
            messages = [" ".join(str(error.get(key, "")) for key in ("message", "details"))
                        for error in node_errors[node]["errors"]]
            assert any("compression" in message and "0.5" in message for message in messages), messages


# --------------------------------------------------------------------------------------------------
# The example workflows against the running host


def widget_inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of each entry of ``widgets_values``, in the frontend's order."""
    widgets = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            widgets.append((name, kind, options))
            if options.get("control_after_generate"):
                widgets.append(("control_after_generate", "CONTROL", {}))
    return widgets


def socket_type(info: dict, name: str) -> str | None:
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec is not None:
            return "COMBO" if isinstance(spec[0], list) else spec[0]
    return None


def check_widget_value(where: str, kind, options: dict, value) -> None:
    if kind == "CONTROL":
        assert value in CONTROL_AFTER_GENERATE, f"{where}: {value!r} is not a control_after_generate mode"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
        assert kind == "FLOAT" or float(value).is_integer(), f"{where}: {value!r} is not an integer"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value!r} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r}"
    else:  # combo
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if not (isinstance(value, str) and value.endswith(MODEL_FILE_SUFFIXES)):  # model files are not on this host
            assert value in choices, f"{where}: {value!r} not in {choices}"


def test_example_workflows_match_the_host(server, object_info):
    templates = server.get("/workflow_templates")
    files = sorted((PACK_DIR / "example_workflows").glob("*.json"))
    with server.explain():
        assert files, "no example workflows"
        assert sorted(templates.get(PACK_FOLDER, [])) == sorted(f.stem for f in files), templates
        for path in files:
            served = server.request(f"/api/workflow_templates/{PACK_FOLDER}/{path.name}")
            assert served.status == 200, f"{path.name} is not served: {served.status}"
            workflow = json.loads(path.read_text(encoding="utf-8"))
            nodes = {node["id"]: node for node in workflow["nodes"]}
            for node in workflow["nodes"]:
                where = f"{path.name} node {node['id']} ({node['type']})"
                if node["type"] in FRONTEND_ONLY_NODES:
                    continue
                assert node["type"] in object_info, f"{where}: unknown node type"
                info = object_info[node["type"]]
                widgets = widget_inputs(info)
                values = node.get("widgets_values", [])
                assert len(values) == len(widgets), \
                    f"{where}: widgets_values {values} do not match widgets {[w[0] for w in widgets]}"
                for (name, kind, options), value in zip(widgets, values):
                    check_widget_value(f"{where}.{name}", kind, options, value)
                for slot in node.get("inputs", []):
                    assert socket_type(info, slot["name"]) == slot["type"], f"{where}: input {slot}"
                host_outputs = list(zip(info["output_name"], info["output"]))
                outputs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
                if node["type"].startswith("FastGuidance_"):  # ours: the saved list is the node's list
                    assert outputs == host_outputs, f"{where}: outputs {outputs}"
                # host nodes gain outputs between versions (SaveImage/PreviewImage in 0.33, COMFYUI.md §7):
                # the outputs that links use must be the host's, at the same slot
                for slot, output in enumerate(node.get("outputs", [])):
                    if output.get("links"):
                        assert slot < len(host_outputs) and (output["name"], output["type"]) == host_outputs[slot], \
                            f"{where}: linked output {slot} {output} is not the host's {host_outputs[slot:slot + 1]}"
            for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
                source_info = object_info[nodes[source]["type"]]
                target_node = nodes[target]
                assert link_id in (nodes[source]["outputs"][source_slot].get("links") or []), \
                    f"{path.name} link {link_id}: not listed on its source's output {source_slot}"
                assert source_info["output"][source_slot] == kind, f"{path.name} link {link_id}: source type"
                input_name = target_node["inputs"][target_slot]["name"]
                assert socket_type(object_info[target_node["type"]], input_name) in (kind, "*"), \
                    f"{path.name} link {link_id}: target {target_node['type']}.{input_name} is not {kind}"


def test_step_predictor_drives_ksampler_steps(server):
    """StepPredictor's INT output linked to KSampler's steps input, posted to /prompt."""
    sys.path.insert(0, str(PACK_DIR))
    try:
        from fastguidance.step_predictor import StepPredictor, save_step_predictor
    finally:
        sys.path.remove(str(PACK_DIR))
    folder = server.root / "env" / "models" / "fastguidance_step_predictors"
    folder.mkdir(parents=True, exist_ok=True)
    predictor = StepPredictor(768, (2, 3, 4), hidden=8)  # FGTest_RandomConditioning: width 768, no pooled vector
    with torch.no_grad():
        predictor.network[-1].bias[1] = 5.0  # always 3 steps
    save_step_predictor(predictor, folder / "fg_steps.safetensors", {"sampler": "euler"}, overwrite=True)
    prompt = base_prompt()
    prompt.update({
        "30": {"class_type": "FastGuidance_StepPredictor", "inputs": {
            "positive": ["2", 0], "predictor": "fg_steps.safetensors", "model": ["1", 0], "scheduler": "normal"}},
        "31": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": ["30", 0], "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "32": {"class_type": "SaveLatent", "inputs": {"samples": ["31", 0], "filename_prefix": "fgtest/predicted"}},
    })
    with server.explain():
        _, entry = server.run_prompt(prompt)
        assert entry["status"]["completed"], entry["status"]
        assert entry["outputs"]["30"]["text"] == ["3 steps"], entry["outputs"]
        assert "FastGuidance [adadiff]: 3 steps" in server.log()
        assert "3/3" in server.log()  # the KSampler's progress bar: three steps


#: CPU-sized settings applied to the example workflows before they are posted (same graph, smaller run)
CPU_SIZED = {"steps": 3, "width": 64, "height": 64, "runs": 1, "iterations": 2, "batch": 2, "step_options": "2, 3",
             "trajectories": 2, "train_steps": 2}
#: nodes whose images must stay large enough for SSIM (11×11 latents)
CPU_SIZED_BY_NODE = {"FastGuidance_TrainStepPredictor": {"width": 96, "height": 96}}


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow as the API prompt the frontend would post (widget order from /object_info)."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        inputs = {}
        for (name, _, _), value in zip(widget_inputs(info), node.get("widgets_values", [])):
            if name != "control_after_generate":
                inputs[name] = value
        sized = {**CPU_SIZED, **CPU_SIZED_BY_NODE.get(node["type"], {})}
        for name in list(inputs):
            if name in sized and not (node["type"] == "EmptyLatentImage" and name == "batch_size"):
                inputs[name] = sized[name]
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                assert nodes[source]["type"] not in FRONTEND_ONLY_NODES
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


#: example workflows whose models this server cannot load (it builds only a tiny SD1.5): where their graph runs instead
RUN_ELSEWHERE = {"wan22_guidance_adapters": "tests/comfy/test_adapter_families_host.py, on tiny Wan 2.2 models (no "
                                            "Wan UNet or UMT5 text encoder file can be built small enough here)"}


def test_every_example_workflow_runs_when_posted_in_api_format(server, object_info):
    files = sorted((path for path in (PACK_DIR / "example_workflows").glob("*.json") if path.stem not in RUN_ELSEWHERE),
                   key=lambda path: (0 if ("calibrate" in path.stem or "train" in path.stem) else 1, path.stem))
    with server.explain():
        for path in files:
            prompt = to_api_prompt(json.loads(path.read_text(encoding="utf-8")), object_info)
            _, entry = server.run_prompt(prompt)
            assert entry["status"]["completed"], f"{path.name}: {entry['status']}"
            assert server.request("/free", {"free_memory": True}).status == 200  # no results cached across workflows
