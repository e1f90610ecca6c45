"""``python -m fastguidance bench``: a smoke run with tiny settings writes its files, with the window
baselines and seeded bootstrap intervals; every option is checked before any sampling."""

import json

import pytest
from PIL import Image

from fastguidance.__main__ import main
from fastguidance.research.bench import (BenchSettings, Progress, matched_window_steps, method_names, progress_line,
                                         run_bench, verdict)
from fastguidance.research.bench_methods import all_variants

REQUIRED = {"method", "settings", "model_evals", "steps", "seconds", "speedup_vs_cfg", "ssim_to_cfg", "psnr_to_cfg",
            "adherence", "frechet", "window", "vs_window", "vs_cfg"}
INTERVALS = {f"{metric}{suffix}_ci95" for metric in ("adherence", "ssim_to_cfg", "frechet")
             for suffix in ("", "_vs_cfg", "_vs_window")}


def test_bench_smoke_run_writes_json_grid_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["bench", "--steps", "3", "--samples", "4", "--held-out", "2", "--batch", "2", "--out", str(out)])
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["steps"] == 3 and data["settings"]["samples"] == 4
    methods = [row["method"] for row in data["rows"]]
    assert methods[:2] == ["none", "cfg"] and "ag" in methods and "guidance_interval" in methods
    windows = [row for row in data["rows"] if row["method"] == "cfg_window"]
    assert len(data["rows"]) == len(all_variants()) + len(windows)
    assert {row["settings"]["fraction"] for row in windows} <= {round(1 / 3, 4), round(2 / 3, 4)}  # 1 or 2 of 3 steps
    by_label = {row["label"]: row for row in data["rows"]}
    for row in data["rows"]:
        assert REQUIRED | INTERVALS <= set(row)
        assert 0.0 <= row["adherence"] <= 1.0
        low, high = row["adherence_ci95"]
        assert 0.0 <= low <= row["adherence"] <= high <= 1.0
        if row["method"] in ("none", "cfg", "cfg_window") or not 2.5 <= row["model_evals"] < 6.5:
            assert row["window"] is None and row["adherence_vs_window_ci95"] is None
        else:  # the window of the row's own cost (rounded), or CFG / no guidance at the ends
            window = by_label[row["window"]]
            assert abs(window["model_evals"] - row["model_evals"]) <= 0.5
            assert row["vs_window"] == verdict(row["adherence_vs_window_ci95"])
    cfg = by_label["cfg"]
    none = by_label["none"]
    assert cfg["model_evals"] == 2 * 3 and none["model_evals"] == 3
    assert cfg["ssim_to_cfg"] == 1.0 and cfg["adherence_vs_cfg_ci95"] == [0.0, 0.0] and cfg["vs_cfg"] is None
    for window in windows:  # a window of n guided steps costs N + n evaluations
        assert window["model_evals"] == 3 + round(3 * window["settings"]["fraction"])
    defaults = {row["method"] for row in data["rows"] if row["defaults"]}
    assert defaults == {"ag", "compg", "linear_ag", "adadiff", "agd"}
    tuned = [row for row in data["rows"] if row["tune_target"] is not None]
    assert sorted((row["method"], row["tune_target"]) for row in tuned) == [
        (method, target) for method in ("ag", "compg", "linear_ag") for target in (0.95, 0.98)]
    assert all(row["tuning"]["samplings"] >= 2 and row["tuning"]["prompts"] == 8 for row in tuned)
    boot = data["settings"]["bootstrap"]
    assert boot["resamples"] == 1000 and boot["prompts_for_2_points"] >= 1
    for name in ("grid.png", "plot.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    table = capsys.readouterr().out
    assert "cfg_window" in table and "bench.json" in table and "resolving a 2-point difference needs" in table


def test_bench_intervals_are_seeded_and_the_method_filter_keeps_cfg(tmp_path):
    settings = BenchSettings(steps=2, samples=6, held_out=0, methods=("guidance_interval",), resamples=200,
                             frechet_resamples=50)
    first = run_bench(settings, tmp_path / "a", stream=None)
    again = run_bench(settings, tmp_path / "b", stream=None)
    assert {row["method"] for row in first["rows"]} == {"cfg", "guidance_interval", "cfg_window"}  # the matched window
    keys = sorted(INTERVALS)
    assert [[row[key] for key in keys] for row in first["rows"]] == [[row[key] for key in keys] for row in again["rows"]]
    other_seed = run_bench(BenchSettings(**{**settings.__dict__, "seed": 1}), tmp_path / "c", stream=None)
    assert [row["adherence_ci95"] for row in other_seed["rows"]] != [row["adherence_ci95"] for row in first["rows"]]


@pytest.mark.parametrize("arguments, option", [
    (["--scale", "-1"], "--scale"), (["--scale", "nan"], "--scale"), (["--steps", "0"], "--steps"),
    (["--samples", "1"], "--samples"), (["--samples", "6", "--held-out", "7"], "--held-out"),
    (["--batch", "0"], "--batch"), (["--seed", "-3"], "--seed"), (["--resamples", "10"], "--resamples"),
    (["--resamples", "100", "--frechet-resamples", "200"], "--frechet-resamples"),
    (["--methods", "ag,nonsense"], "--methods"),
])
def test_bad_options_are_refused_in_one_line_before_sampling(tmp_path, capsys, arguments, option):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_status:
        main(["bench", *arguments, "--out", str(out)])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("python -m fastguidance bench: error: " + option)
    assert "Traceback" not in error and not (out / "bench.json").exists()


def test_output_and_readme_are_checked_before_sampling(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("no markers here")
    for arguments, message in [(["--out", str(blocker / "sub")], "--out = "), (["--out", str(blocker)], "it is a file"),
                               (["--update-table", str(blocker)], "markers"),
                               (["--update-table", str(tmp_path / "missing.md")], "no such file")]:
        with pytest.raises(SystemExit) as exit_status:
            main(["bench", "--out", str(tmp_path / "out"), *arguments])
        assert exit_status.value.code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error and arguments[0] in error, error
    assert not (tmp_path / "out" / "bench.json").exists()


class _Stop(Exception):
    pass


def test_a_small_sample_gets_a_third_held_out_and_argparse_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import fastguidance.research.bench as bench

    seen = {}

    def record(settings, out):
        seen["settings"] = settings
        raise _Stop

    monkeypatch.setattr(bench, "run_bench", record)
    with pytest.raises(_Stop):
        main(["bench", "--samples", "6", "--out", str(tmp_path)])
    assert seen["settings"].held_out == 2 and seen["settings"].samples == 6
    with pytest.raises(SystemExit) as exit_status:
        main(["bench", "--steps", "many"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--steps" in error and "usage" not in error


def test_help_shows_defaults_and_the_method_names(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 96)" in text and "(default: 5.0)" in text and "(default: dpmpp_2m)" in text
    for name in method_names():
        assert name in text
    assert {"cfg_window", "guidance_interval", "ag", "compg", "linear_ag", "adadiff", "agd"} <= set(method_names())


def test_progress_line_shows_elapsed_and_what_is_left():
    assert progress_line("[1/2] ag: 8/16 images", 90.0, 8, 32) == \
        "bench 1m30s elapsed, about 4m30s left · [1/2] ag: 8/16 images"
    assert "estimating" in progress_line("preparing", 3.0, 0, 32)
    assert "finishing" in progress_line("done", 3700.0, 32, 32) and "1h01m" in progress_line("x", 3700.0, 32, 32)
    assert len(progress_line("x" * 300, 1.0, 1, 2)) == 110
    clock = iter([0.0, 60.0, 60.0])
    lines = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    progress = Progress(10, Stream(), clock=lambda: next(clock))
    progress.advance(5)
    progress.show("calibrating LinearAG: sampling CFG paths 1–16 of 64 (one-time)")
    assert "1m00s elapsed, about 1m00s left · calibrating LinearAG" in lines[0]


def test_defaults_only_keeps_the_references_defaults_interval_and_combinations():
    from fastguidance.research.bench import selected_variants

    labels = [variant.label for variant in selected_variants((), defaults_only=True)]
    assert labels[:2] == ["none", "cfg"] and "cfg scale=2.0" not in labels
    assert {"ag (defaults)", "compg (defaults)", "linear_ag (defaults)", "adadiff (defaults)", "agd (defaults)",
            "guidance_interval", "adadiff+ag", "ag+compg rate=5.0"} <= set(labels)
    assert not any("tuned" in label or "threshold" in label for label in labels)
    assert [v.label for v in selected_variants(("agd",), defaults_only=True)] == ["cfg", "agd (defaults)"]


def test_matched_window_and_verdict():
    assert matched_window_steps(34.1, 20) == 14 and matched_window_steps(39.6, 20) == 20
    assert matched_window_steps(19.6, 20) == 0 and matched_window_steps(11.4, 20) is None
    assert matched_window_steps(40.4, 20) == 20 and matched_window_steps(45.0, 20) is None
    assert verdict([0.01, 0.03]) == "better" and verdict([-0.03, -0.001]) == "worse"
    assert verdict([-0.01, 0.02]) == "no real difference" and verdict(None) is None


# --------------------------------------------------------------------------------------------------
# the reference training commands: the same one-line refusals, before any model is loaded


@pytest.mark.parametrize("arguments, option", [
    (["adapters", "--steps", "0"], "--steps"), (["model", "--width", "12"], "--width"),
    (["model", "--width", "4"], "--width"), (["model", "--caption-noise", "0.5"], "--caption-noise"),
    (["adapters", "--caption-noise", "0.1"], "--caption-noise"), (["classifier", "--cost-weight", "1"], "--cost-weight"),
    (["step_predictor", "--batch", "-2"], "--batch"), (["step_predictor", "--cost-weight", "-1"], "--cost-weight"),
    (["adapters", "--seed", "-1"], "--seed"), (["adapters"], "--out"),  # the shipped file exists, no --overwrite
])
def test_training_commands_refuse_bad_options_in_one_line(tmp_path, capsys, monkeypatch, arguments, option):
    from fastguidance.research.reference import train

    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the options were checked"))
    with pytest.raises(SystemExit) as exit_status:
        train.main(arguments)
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"python -m fastguidance.research.reference.train: error: {option} = ")


def test_training_commands_check_the_output_file_up_front(tmp_path, capsys, monkeypatch):
    from fastguidance.research.reference import train

    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the options were checked"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out, message in [(tmp_path / "adapters.pt", ".safetensors"), (blocker / "sub" / "a.safetensors", "cannot create"),
                         (tmp_path / "CON.safetensors", "reserves"), (tmp_path / "a:b.safetensors", "plain file name")]:
        with pytest.raises(SystemExit):
            train.main(["adapters", "--out", str(out)])
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--out = " in error and message in error, error
    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "600 adapters" in help_text and "(default: 32)" in help_text  # --width's default
