"""Procedural scenes and their prompts: the reference data set (no download).

A scene is a few flat shapes on a dark background, 32×32 RGB, described by a prompt from a small
grammar. Three prompt forms:

- ``group`` of one object: ``a [size] <colour> <shape> [on the left | on the right | at the top |
  at the bottom | in the center]`` (size and position optional);
- ``group`` of several: ``two|three [size] <colour> <shape>s``;
- ``pair``: ``a [size] <colour> <shape> left of|right of|above|below a [size] <colour> <shape>``.

Everything is deterministic from a seed. The *labels* of a scene are all its attributes, also the
ones the prompt leaves open (the renderer draws them at random); the *named* attributes are those
the prompt states, and adherence is measured on those only. Pairs are labelled in a canonical order
(object ``a`` is the left one, or the top one), so "X left of Y" and "Y right of X" name the same
scene and a swapped picture is caught.

Held-out combinations: a few colour–shape pairs never appear in training prompts
(:data:`HELD_OUT_COMBINATIONS`); the benchmark asks for them to test generalisation.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import torch

from ...errors import InvalidInputError

IMAGE_SIZE = 32
COLOURS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.98, 0.90, 0.10),
    "purple": (0.70, 0.20, 0.90),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4.0, "large": 7.0}  # half-extent in pixels
COUNTS = {"a": 1, "two": 2, "three": 3}
POSITIONS = {  # name in the prompt -> (label, centre box (x0, x1, y0, y1) in pixels)
    "on the left": ("left", (7.0, 10.0, 13.0, 19.0)),
    "on the right": ("right", (22.0, 25.0, 13.0, 19.0)),
    "at the top": ("top", (13.0, 19.0, 7.0, 10.0)),
    "at the bottom": ("bottom", (13.0, 19.0, 22.0, 25.0)),
    "in the center": ("center", (14.0, 18.0, 14.0, 18.0)),
}
POSITION_LABELS = tuple(label for label, _ in POSITIONS.values())
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT_COMBINATIONS = frozenset({("yellow", "triangle"), ("purple", "circle"), ("green", "square")})

#: classifier heads: name -> classes
HEADS = {
    "kind": ("group", "pair"),
    "count": ("1", "2", "3"),
    "position": POSITION_LABELS,
    "colour_a": tuple(COLOURS),
    "shape_a": SHAPES,
    "size_a": tuple(SIZES),
    "colour_b": tuple(COLOURS),
    "shape_b": SHAPES,
    "size_b": tuple(SIZES),
    "axis": ("horizontal", "vertical"),
}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What to draw and how the prompt words it."""

    kind: str  # "group" or "pair"
    objects: tuple[Obj, ...]  # group: count copies of one object; pair: (first named, second named)
    position: str | None = None  # group of one: position label, when named
    relation: str | None = None  # pair
    named_size: tuple[bool, ...] = ()  # per named object (group: one flag)

    @property
    def prompt(self) -> str:
        if self.kind == "group":
            obj, count = self.objects[0], len(self.objects)
            words = [next(w for w, n in COUNTS.items() if n == count)]
            if self.named_size[0]:
                words.append(obj.size)
            words += [obj.colour, obj.shape + ("s" if count > 1 else "")]
            if self.position is not None:
                words.append(next(w for w, (label, _) in POSITIONS.items() if label == self.position))
            return " ".join(words)
        first, second = self.objects
        return " ".join([_object_phrase(first, self.named_size[0]), self.relation, _object_phrase(second, self.named_size[1])])

    @property
    def complexity(self) -> int:
        """Number of named attributes (more objects and relations = more complex)."""
        return len(self.named_labels())

    def canonical_pair(self) -> tuple[Obj, Obj, str]:
        """(left-or-top object, right-or-bottom object, axis) of a pair."""
        first, second = self.objects
        if self.relation in ("left of", "above"):
            a, b = first, second
        else:
            a, b = second, first
        return a, b, "horizontal" if self.relation in ("left of", "right of") else "vertical"

    def named_labels(self) -> dict[str, str]:
        """The attributes the prompt states, as classifier head → class."""
        if self.kind == "group":
            obj = self.objects[0]
            labels = {"kind": "group", "count": str(len(self.objects)), "colour_a": obj.colour, "shape_a": obj.shape}
            if self.named_size[0]:
                labels["size_a"] = obj.size
            if self.position is not None:
                labels["position"] = self.position
            return labels
        a, b, axis = self.canonical_pair()
        named_a, named_b = self.named_size if self.relation in ("left of", "above") else self.named_size[::-1]
        labels = {"kind": "pair", "colour_a": a.colour, "shape_a": a.shape, "colour_b": b.colour,
                  "shape_b": b.shape, "axis": axis}
        if named_a:
            labels["size_a"] = a.size
        if named_b:
            labels["size_b"] = b.size
        return labels


def _object_phrase(obj: Obj, named_size: bool) -> str:
    return " ".join(["a"] + ([obj.size] if named_size else []) + [obj.colour, obj.shape])


def random_scene(rng: random.Random, held_out: bool | None = False) -> Scene:
    """A random scene. ``held_out``: False = training combinations only, True = at least one
    held-out colour–shape combination, None = anything."""
    for _ in range(1000):
        scene = _draw_scene(rng)
        combos = {(o.colour, o.shape) for o in scene.objects}
        uses_held_out = bool(combos & HELD_OUT_COMBINATIONS)
        if held_out is None or uses_held_out == held_out:
            return scene
    raise RuntimeError("could not draw a scene with the requested held-out status")


def _draw_scene(rng: random.Random) -> Scene:
    def obj() -> Obj:
        return Obj(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), rng.choice(tuple(SIZES)))

    roll = rng.random()
    if roll < 0.45:
        return Scene("group", (obj(),), position=rng.choice(POSITION_LABELS) if rng.random() < 0.7 else None,
                     named_size=(rng.random() < 0.5,))
    if roll < 0.65:
        count = rng.choice((2, 3))
        one = obj()
        one = Obj(one.colour, one.shape, "small" if count == 3 else one.size)
        return Scene("group", (one,) * count, named_size=(rng.random() < 0.5,))
    first, second = obj(), obj()
    while (second.colour, second.shape) == (first.colour, first.shape):
        second = obj()
    return Scene("pair", (first, second), relation=rng.choice(RELATIONS),
                 named_size=(rng.random() < 0.3, rng.random() < 0.3))


#: the largest caption noise accepted: at 0.5 a two-valued word (size, "two"/"three") says nothing
MAX_CAPTION_NOISE = 0.5


def check_caption_noise(rate: float) -> None:
    """Refuse a caption-noise rate outside [0, MAX_CAPTION_NOISE), naming the input and the fix."""
    if not 0.0 <= rate < MAX_CAPTION_NOISE:
        raise InvalidInputError("caption_noise", rate, f"use a share of words from 0 (exact captions) to below {MAX_CAPTION_NOISE}")


def noisy_caption(scene: Scene, rng: random.Random, rate: float) -> Scene:
    """The scene as a noisy caption describes it (the image stays ``scene``'s).

    Web captions of real text-to-image data often name an attribute the picture does not show; then
    the conditional model p(x | c) itself draws off-prompt pictures, and CFG, which samples
    p(x) p(c | x)^s at scale s (Ho & Salimans 2022, §3.2, whose w is s − 1), brings the named
    attribute back. That is why CFG matters so much in real models.

    Each word the prompt names is replaced, with probability ``rate``, by another value of its
    kind: an object's colour, shape and (if named) size; a single object's position (if named); a
    group's "two" / "three"; a pair's relation. A replacement never forms a held-out colour–shape
    combination, so those stay unseen in training.
    """
    check_caption_noise(rate)

    def other(current, values, allowed=lambda value: True):
        fired = rng.random() < rate
        candidates = [value for value in values if value != current and allowed(value)]
        return rng.choice(candidates) if fired and candidates else current

    def noisy_object(obj: Obj, named_size: bool) -> Obj:
        colour = other(obj.colour, tuple(COLOURS), lambda c: (c, obj.shape) not in HELD_OUT_COMBINATIONS)
        shape = other(obj.shape, SHAPES, lambda s: (colour, s) not in HELD_OUT_COMBINATIONS)
        size = other(obj.size, tuple(SIZES)) if named_size else obj.size
        return Obj(colour, shape, size)

    if scene.kind == "pair":
        first, second = (noisy_object(obj, named) for obj, named in zip(scene.objects, scene.named_size))
        return Scene("pair", (first, second), relation=other(scene.relation, RELATIONS), named_size=scene.named_size)
    obj = noisy_object(scene.objects[0], scene.named_size[0])
    count = len(scene.objects)
    if count > 1:
        count = other(count, (2, 3))
    position = other(scene.position, POSITION_LABELS) if scene.position is not None else None
    return Scene("group", (obj,) * count, position=position, named_size=scene.named_size)


# -- rendering -------------------------------------------------------------------------------------

@dataclass
class _Placed:
    obj: Obj
    x: float
    y: float


def _layout(scene: Scene, rng: random.Random) -> list[_Placed]:
    if scene.kind == "group" and len(scene.objects) == 1:
        radius = SIZES[scene.objects[0].size]
        if scene.position is not None:
            x0, x1, y0, y1 = POSITIONS[_position_phrase(scene.position)][1]
            x0, x1 = max(x0, radius + 0.5), min(x1, IMAGE_SIZE - radius - 0.5)
            y0, y1 = max(y0, radius + 0.5), min(y1, IMAGE_SIZE - radius - 0.5)
            return [_Placed(scene.objects[0], rng.uniform(x0, max(x0, x1)), rng.uniform(y0, max(y0, y1)))]
        return [_Placed(scene.objects[0], *_free_point(rng, radius))]
    if scene.kind == "group":
        return _scatter(scene.objects, rng)
    a, b, axis = scene.canonical_pair()
    ra, rb = SIZES[a.size], SIZES[b.size]
    gap = ra + rb + 2.0  # centre distance that keeps the two shapes apart
    along_a = rng.uniform(ra + 0.5, IMAGE_SIZE - rb - 0.5 - gap)
    along_b = rng.uniform(along_a + gap, IMAGE_SIZE - rb - 0.5)
    across = rng.uniform(max(ra, rb) + 1.0, IMAGE_SIZE - max(ra, rb) - 1.0)
    across_b = min(max(across + rng.uniform(-2.5, 2.5), rb + 0.5), IMAGE_SIZE - rb - 0.5)
    if axis == "horizontal":
        return [_Placed(a, along_a, across), _Placed(b, along_b, across_b)]
    return [_Placed(a, across, along_a), _Placed(b, across_b, along_b)]


def _position_phrase(label: str) -> str:
    return next(w for w, (name, _) in POSITIONS.items() if name == label)


def _free_point(rng: random.Random, radius: float) -> tuple[float, float]:
    return rng.uniform(radius + 0.5, IMAGE_SIZE - radius - 0.5), rng.uniform(radius + 0.5, IMAGE_SIZE - radius - 0.5)


def _scatter(objects: tuple[Obj, ...], rng: random.Random) -> list[_Placed]:
    for _ in range(500):
        placed: list[_Placed] = []
        for obj in objects:
            radius = SIZES[obj.size]
            x, y = _free_point(rng, radius)
            if all(math.hypot(x - p.x, y - p.y) > radius + SIZES[p.obj.size] + 1.5 for p in placed):
                placed.append(_Placed(obj, x, y))
        if len(placed) == len(objects):
            return placed
    raise RuntimeError("could not scatter the objects")


@functools.lru_cache(maxsize=1)
def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (x, y), each ``[32, 32]`` (a constant)."""
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    return coords.reshape(1, -1).expand(IMAGE_SIZE, -1), coords.reshape(-1, 1).expand(-1, IMAGE_SIZE)


def _coverage(placed: _Placed) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance (negative inside)."""
    xs, ys = _grid()
    dx, dy = xs - placed.x, ys - placed.y
    radius = SIZES[placed.obj.size]
    if placed.obj.shape == "circle":
        distance = torch.sqrt(dx**2 + dy**2) - radius
    elif placed.obj.shape == "square":
        side = radius * 0.9
        distance = torch.maximum(dx.abs(), dy.abs()) - side
    else:  # upward triangle inscribed in the circle of the radius
        top, base = -radius, radius * 0.75
        half = radius * 1.05
        slope = half / (base - top)
        edge = dx.abs() - (dy - top) * slope
        distance = torch.maximum(torch.maximum(top - dy, dy - base), edge / math.sqrt(1 + slope**2))
    return (0.5 - distance).clamp(0.0, 1.0)


def render(scene: Scene, seed: int) -> torch.Tensor:
    """Draw ``scene`` as a ``[3, 32, 32]`` image in [0, 1], deterministically from ``seed``."""
    rng = random.Random(seed)
    background = 0.08 + 0.06 * rng.random()
    image = torch.full((3, IMAGE_SIZE, IMAGE_SIZE), background)
    for placed in _layout(scene, rng):
        colour = torch.tensor(COLOURS[placed.obj.colour]).reshape(3, 1, 1)
        colour = (colour * (0.9 + 0.1 * rng.random())).clamp(0, 1)
        alpha = _coverage(placed)
        image = image * (1 - alpha) + colour * alpha
    return image


def scene_labels(scene: Scene) -> dict[str, str | None]:
    """All heads' classes for a rendered scene (None where a head does not apply)."""
    labels: dict[str, str | None] = {head: None for head in HEADS}
    if scene.kind == "group":
        obj = scene.objects[0]
        labels.update(kind="group", count=str(len(scene.objects)), colour_a=obj.colour, shape_a=obj.shape, size_a=obj.size,
                      position=scene.position)
    else:
        a, b, axis = scene.canonical_pair()
        labels.update(kind="pair", colour_a=a.colour, shape_a=a.shape, size_a=a.size, colour_b=b.colour,
                      shape_b=b.shape, size_b=b.size, axis=axis)
    return labels


@dataclass
class SceneBatch:
    images: torch.Tensor  # [N, 3, 32, 32] in [0, 1]
    scenes: list[Scene] = field(default_factory=list)


def make_batch(count: int, seed: int, held_out: bool | None = False) -> SceneBatch:
    """``count`` random scenes and their images, deterministic from ``seed``."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, held_out) for _ in range(count)]
    images = torch.stack([render(scene, rng.randrange(2**31)) for scene in scenes]) if scenes else torch.empty(0, 3, 32, 32)
    return SceneBatch(images, scenes)


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt of the grammar describes (sizes left open are drawn as 'small').

    Raises :class:`InvalidInputError` naming the prompt when it is not in the grammar.
    """
    words = prompt.strip().lower().split()
    try:
        for relation in RELATIONS:
            parts = prompt.strip().lower().split(f" {relation} ")
            if len(parts) == 2:
                first, first_sized = _parse_object(parts[0].split())
                second, second_sized = _parse_object(parts[1].split())
                return Scene("pair", (first, second), relation=relation, named_size=(first_sized, second_sized))
        count = COUNTS[words[0]]
        position = None
        text = " ".join(words)
        for phrase, (label, _) in POSITIONS.items():
            if text.endswith(" " + phrase):
                position, words = label, text[: -len(phrase) - 1].split()
                break
        sized = words[1] in SIZES
        size = words[1] if sized else "small"
        colour, shape = words[1 + sized], words[2 + sized]
        if count > 1:
            if not shape.endswith("s"):
                raise KeyError(shape)
            shape = shape[:-1]
        if colour not in COLOURS or shape not in SHAPES or len(words) != 3 + sized:
            raise KeyError(prompt)
        return Scene("group", (Obj(colour, shape, size),) * count, position=position, named_size=(sized,))
    except (KeyError, IndexError):
        raise InvalidInputError("prompt", prompt, "use the reference grammar, e.g. 'a red circle left of a small blue "
                                "square', 'two large green triangles', 'a yellow square on the left'") from None


def _parse_object(words: list[str]) -> tuple[Obj, bool]:
    if words[0] != "a":
        raise KeyError(words[0])
    sized = words[1] in SIZES
    colour, shape = words[1 + sized], words[2 + sized]
    if colour not in COLOURS or shape not in SHAPES or len(words) != 3 + sized:
        raise KeyError(" ".join(words))
    return Obj(colour, shape, words[1] if sized else "small"), sized
