"""FastGuidance Tune's search (fastguidance.tune): bisection on synthetic trade-offs, presets, a real run."""

import math

import pytest
import torch

from fastguidance.engine import GuidancePolicy
from fastguidance.errors import InvalidInputError, TensorFileError
from fastguidance.adaptive_guidance import AdaptiveGuidance
from fastguidance.compress_guidance import CompressGuidance
from fastguidance.research.sampling import sample
from fastguidance.schedules import DiscreteVPSchedule, make_sigmas
from fastguidance.tune import (PRESET_FORMAT, TuneMethod, TuneResult, adaptive_guidance_method, bisection_trials,
                               compress_guidance_method, fidelity, latents_as_images, load_preset,
                               policy_from_settings, preset_mismatch, save_preset, tune)
from toy_models import ScriptedCosineModel


class KnobPolicy(GuidancePolicy):
    def __init__(self, value):
        self.value = value


def synthetic_sampler(fidelity_of, evaluations_of, batch=3, log=None):
    """A 'sampling' whose per-image fidelity and evaluations are known functions of the knob.

    Images are constant tensors: the reference is 0.5 everywhere and a trial's image i is shifted
    so that ``compare`` (below) returns exactly ``fidelity_of(value, i)``.
    """
    def run(policies):
        if log is not None:
            log.append(None if not policies else policies[0].value)
        if not policies:
            return torch.ones(batch), [40.0] * batch
        value = policies[0].value if hasattr(policies[0], "value") else float(policies[0].guided_steps)
        return torch.tensor([fidelity_of(value, i) for i in range(batch)]), [evaluations_of(value)] * batch
    return run


def compare_identity(images, reference):
    return images.tolist()


def knob_method(candidates):
    return TuneMethod("ag", "threshold", tuple(candidates), KnobPolicy)


@pytest.mark.parametrize("boundary", [0, 1, 7, 18, 19])
def test_bisection_finds_the_boundary_of_a_monotone_trade_off(boundary):
    # candidate k (0 = most conservative) costs 40 − k evaluations; fidelity falls with k and crosses
    # the target 0.95 between candidate `boundary` and `boundary + 1`; image 2 is the worst
    candidates = list(range(20))
    def fidelity_of(k, image):
        return 1.0 - 0.05 * (k / (boundary + 0.5)) - (0.001 if image == 2 else 0.0)
    seen = []
    result = tune(synthetic_sampler(fidelity_of, lambda k: 40.0 - k, log=seen), [knob_method(candidates)],
                  target=0.95, compare=compare_identity)
    best = result.best["ag"]
    assert best.value == boundary and best.evaluations == 40 - boundary and best.meets
    assert result.winner is best
    # a handful of samplings, not a grid: the reference plus ⌈log2(21)⌉ = 5
    assert seen[0] is None and len(seen) <= 1 + bisection_trials(20) == 6
    assert result.samplings == len(seen)
    assert all(trial.meets == (trial.value <= boundary) for trial in result.trials)


def test_no_candidate_meets_the_target_keeps_plain_cfg():
    result = tune(synthetic_sampler(lambda k, i: 0.5, lambda k: 30.0), [knob_method(range(8))],
                  target=0.95, compare=compare_identity)
    assert result.best["ag"] is None and result.winner is None
    assert "no threshold met the target" in result.text() and "chosen: plain CFG" in result.text()
    assert result.to_dict()["method"] == "none" and result.to_dict()["evaluations"] == 40.0


def test_the_worst_image_decides_not_the_mean():
    # image 0 fails from k = 3 on although the mean stays above the target until k = 9
    def fidelity_of(k, image):
        return 0.9 if (image == 0 and k >= 3) else 1.0
    result = tune(synthetic_sampler(fidelity_of, lambda k: 40.0 - k), [knob_method(range(10))],
                  target=0.95, compare=compare_identity)
    assert result.best["ag"].value == 2


def test_the_winner_is_the_cheapest_method_that_met_the_target():
    cheap = TuneMethod("compg", "guided_steps", (19.0, 10.0, 5.0), KnobPolicy)
    dear = TuneMethod("ag", "threshold", (0.999, 0.99), KnobPolicy)
    evaluations = {19.0: 39.0, 10.0: 30.0, 5.0: 25.0, 0.999: 36.0, 0.99: 28.0}
    result = tune(synthetic_sampler(lambda v, i: 1.0 if v != 5.0 else 0.5, evaluations.__getitem__),
                  [dear, cheap], target=0.95, compare=compare_identity)
    assert result.best["ag"].value == 0.99 and result.best["compg"].value == 10.0
    assert result.winner.method == "ag" and result.winner.evaluations == 28.0


@pytest.mark.parametrize("target", [0.4, 1.2, float("nan"), "0.9", True])
def test_a_target_out_of_range_is_refused_before_any_sampling(target):
    calls = []
    with pytest.raises(InvalidInputError, match="target"):
        tune(synthetic_sampler(lambda k, i: 1.0, lambda k: 1.0, log=calls), [knob_method(range(3))], target=target)
    assert calls == []


def test_method_candidates_run_from_conservative_to_aggressive():
    ag = adaptive_guidance_method()
    assert ag.candidates[0] == pytest.approx(0.99999) and ag.candidates[-1] == pytest.approx(1 - 10 ** -1.5, abs=1e-6)
    assert all(a > b for a, b in zip(ag.candidates, ag.candidates[1:]))
    policy = ag.make_policy(0.999)
    assert isinstance(policy, AdaptiveGuidance) and policy.cosine_space == "denoised" and policy.convergence == 0.5
    compg = compress_guidance_method(20)
    assert compg.candidates == tuple(float(n) for n in range(19, 0, -1))
    policy = compg.make_policy(5.0)
    assert isinstance(policy, CompressGuidance) and policy.guided_steps == 5 and policy.mode == "compress"
    with pytest.raises(InvalidInputError, match="steps"):
        compress_guidance_method(1)


def test_latents_are_compared_frame_by_frame_in_the_references_range():
    reference = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    images, ref = latents_as_images(reference, reference)
    assert images.shape == (6, 4, 16, 16) and torch.equal(images, ref)
    assert float(ref.min()) == 0.0 and float(ref.max()) == 1.0
    assert fidelity(reference, reference) == pytest.approx([1.0, 1.0])
    spoiled = reference.clone()
    spoiled[1, :, 2] = 0  # one frame of the second video
    values = fidelity(spoiled, reference)
    assert values[0] == pytest.approx(1.0) and values[1] < 0.5


def test_tuning_compress_guidance_on_a_real_sampling_run_meets_its_target():
    model = ScriptedCosineModel(shape=(2, 4, 16, 16), rates=[1.0, 0.4])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = make_sigmas(DiscreteVPSchedule(), "karras", 10)

    def run(policies):
        result = sample(model, noise, sigmas, "cond", "uncond", 5.0, "euler", list(policies))
        spent = result.run.evaluations_per_sample() if result.run is not None else [20, 20]
        return result.latent, spent

    result = tune(run, [compress_guidance_method(10)], target=0.9)
    best = result.best["compg"]
    assert best is not None and best.evaluations < 20
    latent, spent = run([result.policy_of(best)])
    assert min(fidelity(latent, run(())[0])) >= 0.9 and sum(spent) / 2 == best.evaluations


# -- presets -------------------------------------------------------------------------------------------


def small_result():
    compg = TuneMethod("compg", "guided_steps", (9.0, 5.0, 2.0),
                       lambda value: CompressGuidance(guided_steps=int(value)), {"skew": 1.0, "mode": "compress"},
                       integer=True)
    return tune(synthetic_sampler(lambda v, i: 1.0 if v != 2.0 else 0.5, lambda v: 10.0 + v),
                [compg], target=0.95, compare=compare_identity)


MADE_FOR = {"model_fingerprint": "abc123", "sampler": "euler", "scheduler": "karras", "steps": 10, "cfg": 5.0}


def test_a_preset_round_trips_and_applies_its_policy(tmp_path):
    result = small_result()
    path = save_preset(tmp_path / "p.safetensors", result, MADE_FOR)
    metadata = load_preset(path)
    assert metadata["format"] == PRESET_FORMAT and metadata["method"] == "compg"
    assert metadata["settings"] == {"skew": 1.0, "mode": "compress", "guided_steps": 5}
    assert "compg: guided_steps 5: 15 evaluations" in result.text()
    assert metadata["evaluations"] == 15.0 and metadata["target"] == 0.95 and metadata["steps"] == 10
    policy = policy_from_settings(metadata["method"], metadata["settings"])
    assert isinstance(policy, CompressGuidance) and policy.guided_steps == 5
    assert policy_from_settings("none", {}) is None
    assert preset_mismatch(metadata, "abc123", {"steps": 10, "cfg": 5.0}) is None


def test_a_preset_is_never_overwritten_silently(tmp_path):
    result = small_result()
    path = save_preset(tmp_path / "p.safetensors", result, MADE_FOR)
    with pytest.raises(FileExistsError):
        save_preset(path, result, MADE_FOR)
    save_preset(path, result, {**MADE_FOR, "steps": 12}, overwrite=True)
    assert load_preset(path)["steps"] == 12


def test_a_preset_for_another_model_or_schedule_says_what_it_was_made_for(tmp_path):
    result = small_result()
    metadata = load_preset(save_preset(tmp_path / "p.safetensors", result, MADE_FOR))
    why = preset_mismatch(metadata, "zzz999", {"steps": 20})
    assert why == "it was tuned for model abc123 (this one is zzz999), steps 10 (this one is 20)"


def test_a_file_that_is_not_a_valid_preset_is_refused_by_name(tmp_path):
    from fastguidance.tensorfile import save_tensor_file
    other = save_tensor_file(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"format": "x", "version": 1})
    with pytest.raises(TensorFileError, match="other.safetensors"):
        load_preset(other)
    broken = save_tensor_file(tmp_path / "broken.safetensors", {"x": torch.zeros(1)},
                              {"format": PRESET_FORMAT, "version": 1, "method": "magic", "settings": []})
    with pytest.raises(TensorFileError, match="broken.safetensors.*tune again"):
        load_preset(broken)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(TensorFileError, match="junk.safetensors"):
        load_preset(tmp_path / "junk.safetensors")


# -- the search's assumption, checked on the trials it ran ---------------------------------------------


def dipping_fidelity(k, image):
    """Falls by 0.01 per candidate, with a dip at k = 4 (0.90): the bisection tries 9 (0.91, fails), then 4
    (fails), then 1, 2, 3 (pass); 9 kept more than the more conservative 4, and 5 (0.95) would have passed."""
    return 0.90 if k == 4 else 1.0 - 0.01 * k


def test_a_trial_out_of_order_is_reported_in_the_result_and_its_text():
    result = tune(synthetic_sampler(dipping_fidelity, lambda k: 40.0 - k), [knob_method(range(20))],
                  target=0.95, compare=compare_identity)
    assert [trial.value for trial in result.trials] == [9, 4, 1, 2, 3]
    assert result.best["ag"].value == 3  # the bisection's answer; 5 also met the target: it was missed
    assert [(entry.trial.value, entry.conservative.value) for entry in result.out_of_order] == [(9, 4)]
    text = result.text()
    assert ("ag: out of order: threshold 9 kept a worst SSIM of 0.9100, more than the more conservative 4 (0.9000)"
            in text) and "a setting beyond the one found may also meet the target" in text
    assert result.to_dict()["out_of_order"] == [{"method": "ag", "value": 9.0, "worst": pytest.approx(0.91),
                                                 "conservative_value": 4.0, "conservative_worst": pytest.approx(0.90)}]


@pytest.mark.parametrize("boundary", [0, 7, 19])
def test_a_monotone_trade_off_has_no_trial_out_of_order(boundary):
    def fidelity_of(k, image):
        return 1.0 - 0.05 * (k / (boundary + 0.5))
    result = tune(synthetic_sampler(fidelity_of, lambda k: 40.0 - k), [knob_method(range(20))],
                  target=0.95, compare=compare_identity)
    assert result.out_of_order == [] and "out of order" not in result.text()


def test_equal_fidelity_and_rounding_are_not_out_of_order():
    # a plateau (AG cutting at the same step for two thresholds) and a rise below ORDER_TOLERANCE
    from fastguidance.tune import ORDER_TOLERANCE, Trial, out_of_order
    method = knob_method(range(4))
    trials = [Trial("ag", 0, 40.0, [0.99], True), Trial("ag", 1, 39.0, [0.97], True),
              Trial("ag", 2, 38.0, [0.97], True), Trial("ag", 3, 37.0, [0.97 + ORDER_TOLERANCE / 2], True)]
    assert out_of_order(trials, {"ag": method}) == []
    rising = trials[:3] + [Trial("ag", 3, 37.0, [0.97 + 2 * ORDER_TOLERANCE], True)]
    assert [entry.trial.value for entry in out_of_order(rising, {"ag": method})] == [3]


def chart_colours(image):
    import numpy as np
    return {tuple(int(v) for v in pixel) for pixel in np.asarray(image.convert("RGB")).reshape(-1, 3)}


def test_a_trial_out_of_order_is_drawn_on_the_chart_in_a_colour_of_its_own():
    from fastguidance.charts import PALETTE
    from fastguidance.tune import tradeoff_figure
    broken = tune(synthetic_sampler(dipping_fidelity, lambda k: 40.0 - k), [knob_method(range(20))],
                  target=0.95, compare=compare_identity)
    monotone = tune(synthetic_sampler(lambda k, i: 1.0 - 0.01 * k, lambda k: 40.0 - k), [knob_method(range(20))],
                    target=0.95, compare=compare_identity)
    # one method: its dots in PALETTE[0]; the trial out of order (and its legend entry) in PALETTE[1]
    assert PALETTE[0] in chart_colours(tradeoff_figure(broken)) and PALETTE[0] in chart_colours(tradeoff_figure(monotone))
    assert PALETTE[1] in chart_colours(tradeoff_figure(broken))
    assert PALETTE[1] not in chart_colours(tradeoff_figure(monotone))


# -- a search read back from its preset ----------------------------------------------------------------


def test_a_preset_gives_back_the_search_it_holds(tmp_path):
    # CompG's guided steps 20 down to 1 (candidate k = 20 − guided steps), with the dip of dipping_fidelity
    method = TuneMethod("compg", "guided_steps", tuple(float(20 - k) for k in range(20)), KnobPolicy, integer=True)
    result = tune(synthetic_sampler(lambda v, i: dipping_fidelity(20 - v, i), lambda v: 20.0 + v), [method],
                  target=0.95, compare=compare_identity)
    assert len(result.out_of_order) == 1
    metadata = load_preset(save_preset(tmp_path / "p.safetensors", result, {**MADE_FOR, "inputs": {"seed": 1}}))
    again = TuneResult.from_dict(metadata, [method])
    assert again.trials == result.trials and again.best == result.best
    assert (again.target, again.cfg_evaluations, again.samplings) == (result.target, result.cfg_evaluations,
                                                                      result.samplings)
    assert again.text() == result.text() and again.winner == result.winner
    # trials another search could not have run (another list of settings) are refused
    other = TuneMethod("compg", "guided_steps", (19.0, 10.0), KnobPolicy, integer=True)
    with pytest.raises(ValueError, match="not among the searched settings"):
        TuneResult.from_dict(metadata, [other])


def test_content_digest_follows_the_content_only():
    from fastguidance.tune import content_digest
    tensor = torch.arange(6.0).reshape(2, 3)
    conditioning = [[tensor, {"pooled_output": tensor[0], "strength": 1.0}]]
    assert content_digest(conditioning) == content_digest([[tensor.clone(), {"strength": 1.0, "pooled_output": tensor[0].clone()}]])
    changed = tensor.clone()
    changed[1, 2] += 1e-3
    assert content_digest(conditioning) != content_digest([[changed, {"pooled_output": tensor[0], "strength": 1.0}]])
    assert content_digest(tensor) != content_digest(tensor.reshape(3, 2))  # the shape counts
    assert content_digest(tensor) != content_digest(tensor.half())  # and the dtype
    assert content_digest({"a": 1}) != content_digest({"a": 1.5}) and content_digest(None) != content_digest("None")
    assert len(content_digest(b"bytes")) == 16 and content_digest(b"bytes") != content_digest(b"bytez")


def test_input_differences_name_what_changed():
    from fastguidance.tune import input_differences
    inputs = {"seed": 3, "model": "abc", "positive": "d1"}
    assert input_differences({"inputs": dict(inputs)}, inputs) == []
    assert input_differences({"inputs": {**inputs, "seed": 4}}, inputs) == ["seed"]
    assert input_differences({"inputs": {"seed": 3}}, inputs) == ["model", "positive"]
    assert input_differences({}, inputs) == ["seed", "model", "positive"]  # a preset with no record


def test_a_preset_of_a_segment_records_it_and_a_broken_segment_is_refused(tmp_path):
    from fastguidance.tensorfile import save_tensor_file
    result = small_result()
    segment = {**MADE_FOR, "steps": 20, "start_at_step": 10, "end_at_step": 20}
    metadata = load_preset(save_preset(tmp_path / "p.safetensors", result, segment))
    assert (metadata["start_at_step"], metadata["end_at_step"], metadata["steps"]) == (10, 20, 20)
    assert preset_mismatch(metadata, None, {"start_at_step": 0}) == "it was tuned for start_at_step 10 (this one is 0)"
    for start, end in [(10, 10), (-1, 20), (10, 25), ("10", 20)]:
        broken = save_tensor_file(tmp_path / f"b{start}{end}.safetensors", {"x": torch.zeros(1)},
                                  {"format": PRESET_FORMAT, "version": 1, "method": "none", "settings": {},
                                   "steps": 20, "start_at_step": start, "end_at_step": end})
        with pytest.raises(TensorFileError, match="tune again"):
            load_preset(broken)
