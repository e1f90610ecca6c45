"""A real ComfyUI server with the pack installed the way users install it (shared by the server and browser tests).

:func:`running_server` starts one, from ``COMFYUI_PATH`` with the Python running pytest, in a
temporary folder that holds:

- ``custom_nodes/FastGuidance``: a copy of this repository (no ``.git``, virtual environments,
  caches, node_modules or weights);
- ``custom_nodes/fgtest_conditioning``: a test-only pack with ``FGTest_RandomConditioning`` (seeded
  random CONDITIONING, so no text encoder weights are needed);
- ``diffusion_models/fg_tiny_sd15_unet.safetensors``: a one-level UNet with 320 channels and context
  768, built at test time with ComfyUI's own SD15 classes and seeded weights; model detection takes
  it for SD1.5 and the built-in ``UNETLoader`` loads it; optionally the same UNet as the standard
  checkpoint name (random text encoder and VAE) for the example workflows;
- ``extra_model_paths.yaml`` that points ``diffusion_models``, ``checkpoints`` and ``custom_nodes``
  there, and ``--base-directory`` set to an empty folder, so that the checkout's own models, packs,
  output and user folders are neither used nor written.

The server's log is kept in the temporary folder and appended to failure messages (``explain``).
Uses only the standard library for HTTP, so that collecting the tests never needs ``requests``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PACK_DIR = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

#: folder name of the pack inside custom_nodes (what a user's clone would be called)
PACK_FOLDER = "FastGuidance"
UNET_NAME = "fg_tiny_sd15_unet.safetensors"
STARTUP_TIMEOUT_S = 120
PROMPT_TIMEOUT_S = 120

#: the checkpoint name the example workflows load (what users have), written by ``running_server(checkpoint=True)``
CHECKPOINT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"

#: names (and patterns) left out of the copy of the pack
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    "*.egg-info", "bench_out", "outputs", "output", "*.safetensors", "*.ckpt", "node_modules",
)

# --------------------------------------------------------------------------------------------------
# Files the test writes into the temporary folder

#: torchvision from the registry is a CUDA build whose compiled ops do not load next to CPU torch;
#: ComfyUI imports torchvision but does not need them (COMFYUI.md §6 step 3).
SITECUSTOMIZE = '''\
import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
'''

#: a test-only pack: CONDITIONING without CLIP weights
TEST_PACK = '''\
"""Test-only nodes for FastGuidance's server test. Never installed by users."""

import torch


class FGTestRandomConditioning:
    DESCRIPTION = "Seeded random CONDITIONING [1, 77, 768] times scale (test only, no text encoder)."
    CATEGORY = "_for_testing/fastguidance"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        }}

    def make(self, seed, scale):
        generator = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, 77, 768, generator=generator) * scale, {}]],)


NODE_CLASS_MAPPINGS = {"FGTest_RandomConditioning": FGTestRandomConditioning}
'''

#: writes the SD1.5-detectable test UNet (run with cwd COMFYUI_PATH): argv[1] = output file
MAKE_UNET = Path(__file__).with_name("host_models.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# The server


@dataclass
class Response:
    status: int
    body: object


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    root: Path
    output_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def request(self, path: str, payload: object | None = None, timeout: float = 30) -> Response:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        return Response(status, body)

    def get(self, path: str) -> object:
        response = self.request(path)
        assert response.status == 200, f"GET {path} -> {response.status}: {response.body}"
        return response.body

    @contextlib.contextmanager
    def explain(self):
        """Append the server log to any assertion that fails inside the block."""
        try:
            yield
        except AssertionError as error:
            raise AssertionError(f"{error}\n\n----- ComfyUI log ({self.log_path}) -----\n{self.log()}") from None

    def run_prompt(self, prompt: dict) -> tuple[str, dict]:
        """Queue an API-format prompt and wait for its history entry; returns (prompt_id, entry)."""
        response = self.request("/prompt", {"prompt": prompt, "client_id": "fastguidance-test"})
        assert response.status == 200, f"/prompt refused the workflow ({response.status}): {json.dumps(response.body, indent=1)}"
        prompt_id = response.body["prompt_id"]
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited while running the prompt"
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"]["completed"] or entry["status"].get("status_str") == "error":
                    return prompt_id, entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT_S} s")


def _write_environment(root: Path) -> tuple[Path, Path, Path]:
    """The temporary install: packs, model folder, YAML, sitecustomize. Returns (yaml, site dir, models dir)."""
    env = root / "env"
    custom_nodes = env / "custom_nodes"
    diffusion_models = env / "models" / "diffusion_models"
    site = root / "site"
    for folder in (custom_nodes, diffusion_models, site, root / "base" / "custom_nodes"):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PACK_DIR, custom_nodes / PACK_FOLDER, ignore=COPY_IGNORE)
    (custom_nodes / "fgtest_conditioning").mkdir()
    (custom_nodes / "fgtest_conditioning" / "__init__.py").write_text(TEST_PACK)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    config = root / "extra_model_paths.yaml"
    config.write_text(
        "fastguidance_test:\n"
        f"  base_path: {json.dumps(str(env))}\n"
        "  diffusion_models: models/diffusion_models\n"
        "  checkpoints: models/checkpoints\n"
        "  fastguidance_step_predictors: models/fastguidance_step_predictors\n"
        "  custom_nodes: custom_nodes\n"
    )
    return config, site, diffusion_models


def _subprocess_env(site: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def running_server(root: Path, checkpoint: bool = False) -> Iterator[Server]:
    """Start ComfyUI in ``root`` (see the module docstring) and stop it when the block ends.

    ``checkpoint``: also write :data:`CHECKPOINT_NAME` (the test UNet plus one CLIP and one VAE
    weight, so that ``CheckpointLoaderSimple`` builds a randomly initialised SD1.5 text encoder and
    VAE around it), for workflows that load the standard checkpoint.
    """
    config, site, diffusion_models = _write_environment(root)
    env = _subprocess_env(site)

    made = subprocess.run([sys.executable, str(MAKE_UNET), str(diffusion_models / UNET_NAME)], cwd=COMFYUI_PATH,
                          env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, f"building the test UNet failed:\n{made.stdout}\n{made.stderr}"
    if checkpoint:
        checkpoints = diffusion_models.parent / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        made = subprocess.run([sys.executable, str(MAKE_UNET), str(checkpoints / CHECKPOINT_NAME), "--checkpoint"],
                              cwd=COMFYUI_PATH, env=env, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, f"building the test checkpoint failed:\n{made.stdout}\n{made.stderr}"

    port = free_port()
    log_path = root / "comfyui.log"
    base = root / "base"
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
        "--extra-model-paths-config", str(config), "--database-url", "sqlite:///:memory:",
        "--base-directory", str(base),
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", process, log_path, root, base / "output")
    try:
        with srv.explain():
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                assert process.poll() is None, f"ComfyUI exited during start-up with code {process.returncode}"
                assert time.monotonic() < deadline, f"/object_info did not answer within {STARTUP_TIMEOUT_S} s"
                try:
                    if srv.request("/object_info", timeout=5).status == 200:
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                time.sleep(0.5)
        yield srv
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # The server was started in its own session: its process group holds only what it started.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
