"""Real-host fixtures: a ComfyUI checkout (``COMFYUI_PATH``) and tiny real models built with its classes.

Every test in this folder is marked ``comfy`` and skipped, with the reason, when ``COMFYUI_PATH``
is not set. Run them with ComfyUI's own Python environment::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -m comfy
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import host_models

PACK_DIR = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = "needs a ComfyUI checkout: set COMFYUI_PATH (docs/development.md, The two hosts)"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.comfy)
            if not COMFYUI_PATH:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@dataclass
class Host:
    """The imported host and the pack as ComfyUI loaded it."""

    nodes: types.ModuleType  # ComfyUI's nodes.py
    pack: types.ModuleType  # the pack's root module, as loaded by ComfyUI

    def node(self, node_id: str, unique_id: str | None = None):
        """A V3 node class prepared the way the executor does (hidden inputs set)."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        if hasattr(cls, "PREPARE_CLASS_CLONE"):
            return prepared_class(cls, {"UNIQUE_ID": unique_id} if unique_id else {})
        return cls()

    def call(self, node_id: str, *args):
        """Run any node (V1 or V3) with positional inputs; returns its outputs (indexable)."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        if hasattr(cls, "PREPARE_CLASS_CLONE"):
            return prepared_class(cls).execute(*args)
        return getattr(cls(), cls.FUNCTION)(*args)


def node_defaults(host: Host, node_id: str) -> dict:
    """The default of every widget input of a node, as its schema declares them (what a new node in the
    page starts with); link inputs (MODEL, CONDITIONING, …) have none and are left out."""
    inputs = host.nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    return {name: spec[1]["default"] for section in ("required", "optional")
            for name, spec in inputs.get(section, {}).items() if len(spec) > 1 and "default" in spec[1]}


def prepared_class(cls, hidden: dict | None = None):
    """``cls.PREPARE_CLASS_CLONE`` on either supported host: the one place that knows its argument.

    The executor calls it before every V3 node run; its argument is not a public API and changed
    (COMFYUI.md §7): 0.3.64 takes the hidden inputs themselves (``{"UNIQUE_ID": id}``), 0.33 a
    ``V3Data`` dict that holds them under ``"hidden_inputs"`` (read by ``HiddenHolder.from_v3_data``).
    """
    from comfy_api.latest import _io

    hidden = dict(hidden or {})
    if hasattr(_io.HiddenHolder, "from_v3_data"):
        return cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return cls.PREPARE_CLASS_CLONE(hidden)


@pytest.fixture(scope="session")
def host() -> Host:
    nodes, pack_module = host_models.load_pack(COMFYUI_PATH, PACK_DIR)
    return Host(nodes=nodes, pack=sys.modules[pack_module])


@pytest.fixture(scope="session")
def tiny_model(host):
    """A real SD1.5 ``BaseModel`` (tiny) in a ``ModelPatcher``, seeded."""
    return host_models.patcher(host_models.tiny_model(seed=0))


def make_conds(batch: int = 1, context_dim: int = 64, seed: int = 1, positive_scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    positive = torch.randn(batch, 77, context_dim, generator=generator) * positive_scale
    negative = torch.randn(batch, 77, context_dim, generator=generator) * 0.1
    return [[positive, {}]], [[negative, {}]]


@pytest.fixture()
def runs(host, monkeypatch):
    """Every GuidanceRun that finishes during the test, captured at the report."""
    engine_patch = sys.modules[host.pack.__name__ + ".nodes.engine_patch"]
    captured = []
    original = engine_patch._report

    def capture(config, host_run, guider_name):
        captured.append(host_run.run)
        return original(config, host_run, guider_name)

    monkeypatch.setattr(engine_patch, "_report", capture)
    return captured


def empty_pack_folder(tmp_path, monkeypatch, name: str):
    """An empty ``models/<name>`` folder for one test (the host's registry entry is restored after)."""
    import folder_paths
    folder = tmp_path / name
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(folder)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


def pack_module(host: Host, name: str) -> types.ModuleType:
    """A module of the pack as ComfyUI loaded it (``"fastguidance.guidance_adapters.adapters"``, ``"nodes.adapter_patch"``)."""
    return sys.modules[f"{host.pack.__name__}.{name}"]


class FakeClip:
    """Enough of CLIP for the trainers: seeded token embeddings of width 64 per prompt text (no pooled)."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        generator = torch.Generator().manual_seed(sum(map(ord, text)) % 10_000)
        scale = 3.0 if text else 0.1
        return [[torch.randn(1, 77, 64, generator=generator) * scale, {}]]


@pytest.fixture()
def conds():
    return make_conds()


def latent(batch: int = 1, size: int = 8, seed: int = 2, channels: int = 4) -> dict:
    return {"samples": torch.zeros(batch, channels, size, size)}


class CallCounter:
    """Counts forward passes and the conds in each, via ``model_function_wrapper``."""

    def __init__(self):
        self.calls: list[list[int]] = []  # cond_or_uncond of each forward pass

    def __deepcopy__(self, memo):
        return self  # model_options are deep-copied on clone(): keep counting into this object

    def __call__(self, apply_model, args):
        self.calls.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    @property
    def uncond_passes(self) -> int:
        return sum(1 for call in self.calls if 1 in call)

    @property
    def cond_passes(self) -> int:
        return sum(1 for call in self.calls if 0 in call)


def counted(model):
    """A clone of ``model`` that counts its forward passes; returns (clone, counter)."""
    counter = CallCounter()
    clone = model.clone()
    clone.set_model_unet_function_wrapper(counter)
    return clone, counter


def ksampler(host: Host, model, positive, negative, cfg=6.0, sampler_name="euler", scheduler="normal", steps=10,
             batch=1, denoise=1.0, seed=3, latent_image=None):
    """Run the stock KSampler node function and return the latent tensor."""
    latent_image = latent_image if latent_image is not None else latent(batch)
    out = host.nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise=denoise)
    return out[0]["samples"]
