"""``benchmarks/gpu.py --smoke``: the GPU benchmark's code on the CPU, with tiny models of both families."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import COMFYUI_PATH, PACK_DIR


@pytest.fixture(scope="module")
def gpu_benchmark():
    spec = importlib.util.spec_from_file_location("fastguidance_gpu_benchmark", PACK_DIR / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_smoke_mode_measures_every_method_on_both_families(gpu_benchmark, tmp_path):
    out = tmp_path / "gpu.json"
    results = gpu_benchmark.main(["--smoke", "--comfyui", COMFYUI_PATH, "--steps", "2", "--latent", "8",
                                  "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["smoke"] and results["device"] == "cpu"
    measured = {(m["model"], m["dtype"]): m for m in results["measurements"]}
    assert set(measured) == {("sdxl", "fp32"), ("flux", "fp32")}
    for measurement in measured.values():
        rows = {row["method"]: row for row in measurement["rows"]}
        assert list(rows) == ["cfg", "ag", "compg", "adapters"]
        # 2 steps: AG cut forced at step 1, CompG guides 1 of 2 steps, adapters one pass per step
        assert {name: row["evaluation_ratio"] for name, row in rows.items()} == {
            "cfg": 1.0, "ag": 0.75, "compg": 0.75, "adapters": 0.5}
        assert rows["cfg"]["engine_per_call"]["calls"] == 0
        for name in ("ag", "compg", "adapters"):
            engine = rows[name]["engine_per_call"]
            assert engine["calls"] == 2 and engine["host_us"] > 0
        assert rows["adapters"]["engine_per_call"]["read_wait_us"] == 0  # adapters alone read nothing per call
        assert rows["adapters"]["adapter_bytes"] > 0 and rows["cfg"]["adapter_bytes"] == 0
        assert all(row["seconds"] > 0 and row["wall_ratio"] > 0 for row in rows.values())
