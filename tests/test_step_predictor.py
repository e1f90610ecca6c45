"""AdaDiff's step predictor: features, the policy-gradient update on a known bandit, files, refusals."""

import math

import pytest
import torch

from fastguidance.errors import FastGuidanceError, InvalidInputError, TensorFileError
from fastguidance.step_predictor import (PAPER_OPTIONS, StepPredictor, complexity_correlation, conditioning_features,
                                         load_step_predictor, parse_step_options, save_step_predictor, step_reward,
                                         train_step_policy)
from fastguidance.tensorfile import save_tensor_file


def test_features_average_the_real_tokens_and_append_the_pooled_vector():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(conditioning_features(tokens, mask=mask), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(conditioning_features(tokens), torch.tensor([[104 / 3, 106 / 3]]))
    pooled = torch.tensor([[7.0, 8.0, 9.0]])
    assert torch.equal(conditioning_features(tokens, pooled, mask), torch.tensor([[2.0, 3.0, 7.0, 8.0, 9.0]]))


def test_features_refuse_bad_shapes():
    with pytest.raises(InvalidInputError, match="conditioning"):
        conditioning_features(torch.zeros(2, 3))
    with pytest.raises(InvalidInputError, match="pooled_output"):
        conditioning_features(torch.zeros(2, 3, 4), torch.zeros(3, 5))


def test_reward_trades_quality_against_steps():
    reward = step_reward(torch.tensor([1.0, 1.0, 0.5]), torch.tensor([10, 50, 10]), 50, 0.5)
    assert torch.allclose(reward, torch.tensor([0.9, 0.5, 0.4]))


def bandit(features_per_cluster=32, seed=0):
    """Two prompt clusters. Simple prompts: every option gives quality 1, so the cheapest (10) is best.
    Hard prompts: quality 0.2 below 30 steps and 1 from 30 on, so 30 is best (cheapest full quality)."""
    generator = torch.Generator().manual_seed(seed)
    simple = torch.randn(features_per_cluster, 8, generator=generator) * 0.3 + torch.tensor([2.0] + [0.0] * 7)
    hard = torch.randn(features_per_cluster, 8, generator=generator) * 0.3 + torch.tensor([-2.0] + [0.0] * 7)
    features = torch.cat([simple, hard])
    is_hard = torch.tensor([False] * features_per_cluster + [True] * features_per_cluster)

    def quality_of(rows, steps):
        steps = torch.tensor(steps)
        return torch.where(is_hard[rows] & (steps < 30), torch.tensor(0.2), torch.tensor(1.0))

    return features, is_hard, quality_of


def test_policy_gradient_finds_the_best_arm_of_each_prompt_cluster():
    torch.manual_seed(0)
    features, is_hard, quality_of = bandit()
    predictor = StepPredictor(8, PAPER_OPTIONS, hidden=32)
    before = predictor.choose(features)
    assert len(set(before)) == 1  # zero-initialised head: uniform, argmax picks the first option everywhere
    log = train_step_policy(predictor, features, quality_of, iterations=500, batch=32, cost_weight=0.5,
                            learning_rate=0.02, seed=0)
    chosen = torch.tensor(predictor.choose(features))
    assert (chosen[~is_hard] == 10).all(), chosen
    assert (chosen[is_hard] == 30).all(), chosen
    assert sum(log.reward[-20:]) / 20 > sum(log.reward[:20]) / 20
    assert len(log.reward) == len(log.steps) == len(log.entropy) == 500


def test_predictor_is_small_and_refuses_another_width():
    predictor = StepPredictor(768 + 1280)
    assert predictor.count_parameters() < 1_000_000
    with pytest.raises(InvalidInputError, match="reads 2048 features.*another conditioning width"):
        predictor(torch.zeros(1, 768))


def test_file_round_trip_and_refusals(tmp_path):
    features, _, quality_of = bandit(8)
    predictor = StepPredictor(8, (10, 20), hidden=16)
    train_step_policy(predictor, features, quality_of, iterations=3, batch=4)
    path = save_step_predictor(predictor, tmp_path / "p.safetensors", {"cost_weight": 0.5, "sampler": "euler"})
    loaded, metadata = load_step_predictor(path)
    assert loaded.options == (10, 20) and metadata["cost_weight"] == 0.5 and metadata["feature_dim"] == 8
    assert torch.equal(loaded(features), predictor.eval()(features))
    with pytest.raises(FileExistsError):
        save_step_predictor(predictor, path, {})
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"nope")
    with pytest.raises(TensorFileError):
        load_step_predictor(corrupt)
    broken = save_tensor_file(tmp_path / "broken.safetensors", {"x": torch.zeros(1)},
                              {"format": "fastguidance.step_predictor", "version": 1, "feature_dim": 8,
                               "options": [10, 20], "hidden": 16})
    with pytest.raises(FastGuidanceError, match="tensors do not match its metadata"):
        load_step_predictor(broken)


@pytest.mark.parametrize("text,expected", [("10, 20, 30", (10, 20, 30)), ("50;10", (10, 50))])
def test_step_options_parse(text, expected):
    assert parse_step_options(text) == expected


@pytest.mark.parametrize("text", ["10", "10, ten", "10, 10", "0, 5"])
def test_bad_step_options_are_refused(text):
    with pytest.raises(InvalidInputError, match="step_options"):
        parse_step_options(text)


def test_complexity_correlation():
    assert complexity_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert math.isnan(complexity_correlation([1, 2, 3], [10, 10, 10]))
