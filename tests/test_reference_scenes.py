import random

import pytest
import torch

from fastguidance.errors import InvalidInputError
from fastguidance.reference.model import Tokenizer
from fastguidance.reference.scenes import (HELD_OUT_COMBINATIONS, HEADS, make_batch, parse_prompt, random_scene,
                                           render, scene_labels)


def test_generator_is_deterministic_by_seed():
    first, again, other = make_batch(24, seed=5), make_batch(24, seed=5), make_batch(24, seed=6)
    assert torch.equal(first.images, again.images)
    assert [s.prompt for s in first.scenes] == [s.prompt for s in again.scenes]
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (24, 3, 32, 32)
    assert first.images.min() >= 0 and first.images.max() <= 1


def test_every_prompt_parses_back_to_what_it_names():
    batch = make_batch(300, seed=1, held_out=None)
    for scene in batch.scenes:
        assert parse_prompt(scene.prompt).named_labels() == scene.named_labels()
        assert set(scene.named_labels()) <= set(HEADS)
        labels = scene_labels(scene)
        assert all(labels[head] == value for head, value in scene.named_labels().items())


def test_relations_are_labelled_canonically():
    left = parse_prompt("a red circle left of a blue square")
    right = parse_prompt("a blue square right of a red circle")
    assert left.named_labels() == right.named_labels()
    assert left.named_labels()["colour_a"] == "red" and left.named_labels()["axis"] == "horizontal"
    below = parse_prompt("a small green triangle below a yellow square")
    assert below.named_labels()["colour_a"] == "yellow" and below.named_labels()["size_b"] == "small"


def test_pair_layout_puts_the_first_canonical_object_left_or_on_top():
    for seed in range(20):
        scene = parse_prompt("a red square left of a blue square")
        image = render(scene, seed)
        red = (image[0] > 0.6) & (image[2] < 0.4)
        blue = (image[2] > 0.6) & (image[0] < 0.4)
        columns = torch.arange(32).float()
        assert (red.float().sum(0) * columns).sum() / red.sum() < (blue.float().sum(0) * columns).sum() / blue.sum()


def test_held_out_filter():
    rng = random.Random(0)
    for _ in range(100):
        trained = random_scene(rng, held_out=False)
        assert not {(o.colour, o.shape) for o in trained.objects} & HELD_OUT_COMBINATIONS
        held = random_scene(rng, held_out=True)
        assert {(o.colour, o.shape) for o in held.objects} & HELD_OUT_COMBINATIONS


@pytest.mark.parametrize("prompt", ["a red", "a pink circle", "four red circles", "a red circle near a blue square",
                                    "two red circle"])
def test_prompts_outside_the_grammar_are_refused_with_the_prompt(prompt):
    with pytest.raises(InvalidInputError, match="prompt"):
        parse_prompt(prompt)


def test_tokenizer_pads_and_refuses_unknown_words():
    tokenizer = Tokenizer()
    ids = tokenizer(["a red circle", ""])
    assert ids.shape == (2, tokenizer.max_tokens)
    assert (ids[0] != 0).sum() == 5 and (ids[1] != 0).sum() == 2  # <bos> a red circle <eos>; <bos> <eos>
    with pytest.raises(InvalidInputError, match="unknown: dog"):
        tokenizer(["a red dog"])
