"""A smoke run of ``python -m fastguidance bench`` with tiny settings writes its files."""

import json

from PIL import Image

from fastguidance.__main__ import main
from fastguidance.bench_methods import all_variants

REQUIRED = {"method", "settings", "model_evals", "steps", "seconds", "speedup_vs_cfg", "ssim_to_cfg", "psnr_to_cfg",
            "adherence", "frechet"}


def test_bench_smoke_run_writes_json_grid_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["bench", "--steps", "3", "--samples", "4", "--held-out", "2", "--batch", "2", "--out", str(out)])
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["steps"] == 3 and data["settings"]["samples"] == 4
    methods = [row["method"] for row in data["rows"]]
    assert methods[:2] == ["none", "cfg"] and "ag" in methods
    assert len(data["rows"]) == len(all_variants())
    for row in data["rows"]:
        assert REQUIRED <= set(row)
        assert 0.0 <= row["adherence"] <= 1.0
    defaults = {row["method"] for row in data["rows"] if row["defaults"]}
    assert defaults == {"ag", "compg", "linear_ag", "adadiff", "agd"}
    tuned = [row for row in data["rows"] if row["tune_target"] is not None]
    assert sorted((row["method"], row["tune_target"]) for row in tuned) == [
        (method, target) for method in ("ag", "compg", "linear_ag") for target in (0.95, 0.98)]
    assert all(row["tuning"]["samplings"] >= 2 and row["tuning"]["prompts"] == 8 for row in tuned)
    cfg = next(row for row in data["rows"] if row["method"] == "cfg")
    none = next(row for row in data["rows"] if row["method"] == "none")
    assert cfg["model_evals"] == 2 * 3 and none["model_evals"] == 3
    assert cfg["ssim_to_cfg"] == 1.0
    for name in ("grid.png", "plot.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    table = capsys.readouterr().out
    assert "cfg" in table and "bench.json" in table


def test_bench_method_filter_keeps_cfg(tmp_path):
    out = tmp_path / "bench"
    main(["bench", "--steps", "2", "--samples", "2", "--held-out", "0", "--methods", "ag", "--out", str(out)])
    methods = {row["method"] for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert methods == {"cfg", "ag"}
