"""Draw the pack's icon for the Comfy registry (``docs/icon.png``, named by ``[tool.comfy] Icon``).

The picture: two strands enter from the left, the conditional prediction (amber, solid) and the
unconditional one (teal, dashed: it is evaluated on only some steps), and merge into one arrow: guidance
that costs less than two model passes a step. Flat colours, no text, so it reads at 64 pixels.

Only Pillow's polygon fill draws it, on integer vertices this script computes, at :data:`SUPERSAMPLE`
times the size, then ``Image.reduce`` averages it down (antialiasing with integer arithmetic): the same
Pillow gives the same pixels on every machine. ``tests/test_icon.py`` checks the committed file is what
this draws:

    python scripts/draw_icon.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
ICON = ROOT / "docs" / "icon.png"
#: the registry's cards show icons small; 256 is sharp on them and keeps the file near 5 kB
SIZE = 256
SUPERSAMPLE = 4

BACKGROUND = (30, 38, 51, 255)
COND = (255, 176, 46, 255)
UNCOND = (60, 200, 192, 255)
MERGED = (245, 247, 250, 255)

#: sizes and places in units of a 256-pixel icon: two strands side by side make the trunk's width
STRAND_WIDTH = 24.0
CORNER_RADIUS = 48.0
STRANDS_START_X = 44.0
STRANDS_START_Y = (68.0, 188.0)
TRUNK_START_X = 146.0
TRUNK_END_X = 176.0
ARROW_TIP_X = 226.0
ARROW_HALF_HEIGHT = 54.0
MIDDLE = 128.0
#: the teal strand's drawn stretches, as fractions of its curve (gaps = evaluations skipped)
UNCOND_DASHES = ((0.0, 0.22), (0.38, 0.6), (0.76, 1.0))

Point = tuple[float, float]


def _bezier(p0: Point, p1: Point, p2: Point, p3: Point, t: float) -> Point:
    s = 1.0 - t
    return (s * s * s * p0[0] + 3 * s * s * t * p1[0] + 3 * s * t * t * p2[0] + t * t * t * p3[0],
            s * s * s * p0[1] + 3 * s * s * t * p1[1] + 3 * s * t * t * p2[1] + t * t * t * p3[1])


def _strand_curve(start_y: float, end_y: float) -> tuple[Point, Point, Point, Point]:
    """A cubic from the left at ``start_y`` to the trunk's start at ``end_y``, horizontal at both ends."""
    x0, x3 = STRANDS_START_X, TRUNK_START_X
    return (x0, start_y), (x0 + 0.45 * (x3 - x0), start_y), (x3 - 0.45 * (x3 - x0), end_y), (x3, end_y)


def _arc(centre: Point, radius: float, start: float, end: float, steps: int) -> list[Point]:
    return [(centre[0] + radius * math.cos(start + (end - start) * i / steps),
             centre[1] + radius * math.sin(start + (end - start) * i / steps)) for i in range(steps + 1)]


def _thick_curve(curve, t0: float, t1: float, width: float, round_start: bool) -> list[Point]:
    """The outline of ``curve`` between ``t0`` and ``t1`` drawn ``width`` wide: offsets along the
    normals, a round cap at the start when ``round_start``, a square end otherwise."""
    steps = max(2, round(64 * (t1 - t0)))
    ts = [t0 + (t1 - t0) * i / steps for i in range(steps + 1)]
    points = [_bezier(*curve, t) for t in ts]
    normals = []
    for i in range(len(points)):
        (ax, ay), (bx, by) = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
        length = math.hypot(bx - ax, by - ay)
        normals.append((-(by - ay) / length, (bx - ax) / length))
    half = width / 2
    left = [(x + nx * half, y + ny * half) for (x, y), (nx, ny) in zip(points, normals)]
    right = [(x - nx * half, y - ny * half) for (x, y), (nx, ny) in zip(points, normals)]
    outline = left + right[::-1]
    if round_start:
        (x, y), (nx, ny) = points[0], normals[0]
        facing = math.atan2(ny, nx)  # from the right offset round the back (facing + pi/2) to the left one
        outline += _arc((x, y), half, facing + math.pi, facing, 16)[1:-1]
    return outline


def _rounded_square(size: float, radius: float) -> list[Point]:
    corners = ((size - radius, size - radius, 0.0), (radius, size - radius, 0.5 * math.pi),
               (radius, radius, math.pi), (size - radius, radius, 1.5 * math.pi))
    return [point for x, y, start in corners for point in _arc((x, y), radius, start, start + 0.5 * math.pi, 12)]


def draw_icon() -> Image.Image:
    """The icon, ``SIZE`` pixels square, RGBA (transparent outside the rounded square)."""
    scale = SIZE / 256.0 * SUPERSAMPLE
    canvas = Image.new("RGBA", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)

    def fill(outline: list[Point], colour) -> None:
        draw.polygon([(round(x * scale), round(y * scale)) for x, y in outline], fill=colour)

    fill(_rounded_square(256.0, CORNER_RADIUS), BACKGROUND)
    cond = _strand_curve(STRANDS_START_Y[0], MIDDLE - STRAND_WIDTH / 2)
    uncond = _strand_curve(STRANDS_START_Y[1], MIDDLE + STRAND_WIDTH / 2)
    fill(_thick_curve(cond, 0.0, 1.0, STRAND_WIDTH, round_start=True), COND)
    for t0, t1 in UNCOND_DASHES:
        fill(_thick_curve(uncond, t0, t1, STRAND_WIDTH, round_start=t0 == 0.0), UNCOND)
    # the trunk starts a pixel early so no seam shows between it and the strands
    fill([(TRUNK_START_X - 1, MIDDLE - STRAND_WIDTH), (TRUNK_END_X, MIDDLE - STRAND_WIDTH),
          (TRUNK_END_X, MIDDLE + STRAND_WIDTH), (TRUNK_START_X - 1, MIDDLE + STRAND_WIDTH)], MERGED)
    fill([(TRUNK_END_X, MIDDLE - ARROW_HALF_HEIGHT), (ARROW_TIP_X, MIDDLE),
          (TRUNK_END_X, MIDDLE + ARROW_HALF_HEIGHT)], MERGED)
    return canvas.reduce(SUPERSAMPLE)


def main() -> None:
    ICON.parent.mkdir(parents=True, exist_ok=True)
    draw_icon().save(ICON, "PNG", optimize=True)
    print(f"wrote {ICON} ({ICON.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
