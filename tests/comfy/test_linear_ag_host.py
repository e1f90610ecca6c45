"""LinearAG inside the real host: calibrate on a tiny model, then the patch skips the chosen steps."""

from __future__ import annotations

import sys

import pytest

from conftest import counted, empty_pack_folder, ksampler, latent, make_conds

STEPS = 8


@pytest.fixture()
def linear_ag_folder(host, tmp_path, monkeypatch):
    return empty_pack_folder(tmp_path, monkeypatch, "fastguidance_linear_ag")


def calibrate(host, model, name="tiny", runs=2, batch=4, steps=STEPS, sampler="euler", scheduler="normal",
              overwrite=False):
    positive, negative = make_conds()
    node = host.node("FastGuidance_LinearAGCalibrate", "7")
    return node.execute(model, positive, negative, latent(batch), 5, runs, sampler, scheduler, steps, 6.0, 2, 1e-3,
                        name, overwrite)[0]


def linear_ag(host, model, file="tiny.safetensors", mode="after_step", after_step=2, error_bound=0.3,
              interpolate=False):
    return host.node("FastGuidance_LinearAG", "8").execute(model, file, mode, after_step, error_bound, interpolate)[0]


@pytest.fixture()
def calibrated(host, tiny_model, linear_ag_folder):
    report = calibrate(host, tiny_model)
    return linear_ag_folder / "tiny.safetensors", report


def test_calibration_writes_a_file_with_its_metadata_and_reports_the_error(host, calibrated):
    path, report = calibrated
    table = sys.modules[host.pack.__name__ + ".fastguidance.linear_ag"].LinearAGCoefficients.load(path)
    assert table.steps == STEPS and len(table.call_sigmas) == STEPS
    assert table.info["sampler"] == "euler" and table.info["scheduler"] == "normal"
    assert table.info["paths"] == 8 and table.info["held_out_paths"] == 2
    assert table.info["architecture"] == "SD15" and len(table.info["model_fingerprint"]) == 16
    assert str(path) in report and f"call {STEPS - 1:3d}" in report
    errors = table.held_out_error.tolist()
    assert all(0.0 <= e < 1.5 for e in errors), errors


def test_the_patch_skips_exactly_the_chosen_steps(host, tiny_model, calibrated):
    positive, negative = make_conds()
    model, counter = counted(linear_ag(host, tiny_model, after_step=2))
    ksampler(host, model, positive, negative, steps=STEPS)
    # steps 0 and 1 are full CFG (one batched pass with cond and uncond), steps 2..7 cond only
    assert counter.uncond_passes == 2 and counter.cond_passes == STEPS
    alternate, counter = counted(linear_ag(host, tiny_model, mode="alternate"))
    ksampler(host, alternate, positive, negative, steps=STEPS)
    assert counter.uncond_passes == STEPS // 2


def test_estimates_stay_close_to_cfg_on_the_calibrated_model(host, tiny_model, calibrated):
    positive, negative = make_conds()
    stock = ksampler(host, tiny_model, positive, negative, steps=STEPS)
    cond_only_steps = ksampler(host, tiny_model, positive, negative, steps=STEPS, cfg=1.0)
    estimated = ksampler(host, linear_ag(host, tiny_model, mode="alternate"), positive, negative, steps=STEPS)
    # the estimate is closer to CFG than dropping guidance altogether
    assert (estimated - stock).norm() < (cond_only_steps - stock).norm()


def test_an_error_bound_of_zero_is_exactly_cfg(host, tiny_model, calibrated):
    positive, negative = make_conds()
    stock = ksampler(host, tiny_model, positive, negative, steps=STEPS)
    never = ksampler(host, linear_ag(host, tiny_model, mode="error_bound", error_bound=0.0), positive, negative,
                     steps=STEPS)
    assert (never - stock).abs().max().item() == 0.0


def test_another_step_count_is_refused_unless_interpolating(host, tiny_model, calibrated):
    positive, negative = make_conds()
    with pytest.raises(Exception, match="calibrated for 8 steps of euler / normal.*interpolate_sigmas"):
        ksampler(host, linear_ag(host, tiny_model), positive, negative, steps=12)
    model, counter = counted(linear_ag(host, tiny_model, interpolate=True))
    ksampler(host, model, positive, negative, steps=12)
    assert counter.uncond_passes == 2 and counter.cond_passes == 12


def test_an_existing_file_is_not_overwritten_without_consent(host, tiny_model, calibrated):
    path, _ = calibrated
    before = path.read_bytes()
    with pytest.raises(Exception, match="filename.*already exists.*overwrite"):
        calibrate(host, tiny_model)
    assert path.read_bytes() == before
    calibrate(host, tiny_model, runs=1, overwrite=True)
    assert path.read_bytes() != before


def test_bad_names_and_missing_files_are_refused(host, tiny_model, linear_ag_folder):
    with pytest.raises(Exception, match="filename"):
        calibrate(host, tiny_model, name="../escape")
    with pytest.raises(Exception, match="coefficients.*LinearAG Calibrate"):
        linear_ag(host, tiny_model, file="missing.safetensors")
    assert "window" in host.node("FastGuidance_LinearAGCalibrate").validate_inputs(window=9)
    assert "filename" in host.node("FastGuidance_LinearAGCalibrate").validate_inputs(filename="a/b")
    assert "after_step" in host.node("FastGuidance_LinearAG").validate_inputs(after_step=0)
    assert host.node("FastGuidance_LinearAG").validate_inputs(mode="alternate") is True


def test_the_coefficient_list_shows_the_folder(host, calibrated):
    spec = host.nodes.NODE_CLASS_MAPPINGS["FastGuidance_LinearAG"].INPUT_TYPES()["required"]["coefficients"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combos carry their options apart
    assert "tiny.safetensors" in options
