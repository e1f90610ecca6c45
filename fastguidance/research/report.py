"""The benchmark's PNG reports, drawn with Pillow alone (no plotting library).

- :func:`image_grid`: labelled rows of images (for example CFG and each method for the same seeds),
  nearest-neighbour upscaled so that small images (32×32) stay visible.
- :func:`bench_plot`: the benchmark's rows, adherence against model evaluations: one colour per
  method with a legend, 95% error bars, CFG and the fixed CFG window as reference lines, the Pareto
  front; labels only where they fit inside the plot without overlapping.

Both write atomically (:func:`fastguidance.charts.save_png`). Research code: the nodes' charts are
in :mod:`fastguidance.charts`, whose drawing pieces these reuse.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..charts import (BACKGROUND, INK, PALETTE, check_points, dashed_line, load_font, overlaps, plot_frame, save_png,
                      text_size)
from ..errors import InvalidInputError

#: grid images are upscaled (integer factor, nearest neighbour) to at least this height by default
MIN_CELL_HEIGHT = 96


# --------------------------------------------------------------------------------------------------
# Image grid


def _to_pil(images: torch.Tensor, scale: int) -> list[Image.Image]:
    """``[B, C, H, W]`` in [0, 1] (C = 1 or 3) → B RGB images, upscaled ×``scale`` (nearest)."""
    pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    result = []
    for array in pixels:
        image = Image.fromarray(array)  # uint8 [H, W, 3] → RGB
        if scale != 1:
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        result.append(image)
    return result


def _check_rows(rows: object) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or not rows:
        raise InvalidInputError("rows", type(rows).__name__, "expected a non-empty list of (label, images) pairs")
    checked = []
    for index, row in enumerate(rows):
        name = f"rows[{index}]"
        if not (isinstance(row, Sequence) and len(row) == 2 and isinstance(row[0], str)):
            raise InvalidInputError(name, type(row).__name__, "expected a (label, images) pair with a str label")
        label, images = row
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1 \
                or images.shape[1] not in (1, 3) or images.shape[2] < 1 or images.shape[3] < 1:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidInputError(name, shape, "expected images [B, 3, H, W] (or [B, 1, H, W]) with values in [0, 1]")
        if not bool(torch.isfinite(images).all()):
            raise InvalidInputError(name, "non-finite values", "expected finite image values in [0, 1]")
        checked.append((label, images))
    return checked


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` broken into lines of at most ``width`` pixels at spaces (a word longer than that stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_size(draw, lines[-1] + " " + word, font)[0] <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def image_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | os.PathLike, scale: int | None = None,
               title: str | None = None, gap: int = 4, column_titles: Sequence[str] | None = None) -> Path:
    """Write a PNG with one row per labelled image batch: ``label | image 0 | image 1 | …``.

    Args:
        rows: ``(label, images)`` pairs; ``images`` is ``[B, 3, H, W]`` (or one channel) in [0, 1]
            (values outside are clamped). Rows may differ in B and in image size. Labels may hold
            ``\\n`` for several lines.
        path: the PNG to write (atomically; its folder is created).
        scale: integer nearest-neighbour upscaling of every image; ``None`` picks the smallest
            factor that makes the tallest image at least :data:`MIN_CELL_HEIGHT` pixels high
            (×3 for 32×32 images, ×1 from 96 pixels up).
        title: an optional line above the grid.
        gap: pixels between images and around the grid.
        column_titles: optional text above each column (the prompt of the column's images), wrapped
            to the width of the first row's images; at most as many as that row has images.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    rows = _check_rows(rows)
    if scale is None:
        tallest = max(images.shape[2] for _, images in rows)
        scale = max(1, math.ceil(MIN_CELL_HEIGHT / tallest))
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise InvalidInputError("scale", scale, "expected an integer upscaling factor ≥ 1 (or None for automatic)")

    font, title_font = load_font(14), load_font(18)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(gap, 8)
    label_width = max(text_size(measure, label, font)[0] for label, _ in rows) + 2 * pad
    cells = [(label, _to_pil(images, scale)) for label, images in rows]
    row_heights = [max(max(image.height for image in images), text_size(measure, label, font)[1] + 2 * pad)
                   for label, images in cells]
    row_widths = [sum(image.width for image in images) + gap * (len(images) - 1) for _, images in cells]
    title_height = text_size(measure, title, title_font)[1] + 2 * pad if title else 0
    column_font = load_font(11)
    if column_titles is not None:
        if isinstance(column_titles, str) or len(column_titles) > len(cells[0][1]):
            raise InvalidInputError("column_titles", column_titles,
                                    f"expected at most {len(cells[0][1])} texts, one per column of the first row")
        column_titles = [_wrap(measure, str(text), column_font, image.width)
                         for text, image in zip(column_titles, cells[0][1])]
        title_height += max((text_size(measure, text, column_font)[1] for text in column_titles), default=0) + pad
    width = label_width + max(row_widths) + pad
    height = title_height + sum(row_heights) + gap * (len(cells) - 1) + 2 * pad
    if title:
        width = max(width, text_size(measure, title, title_font)[0] + 2 * pad)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=INK, font=title_font)
    if column_titles:
        left = label_width
        for text, image in zip(column_titles, cells[0][1]):
            text_width, text_height = text_size(draw, text, column_font)
            draw.multiline_text((left + (image.width - text_width) / 2, title_height + pad - 6 - text_height), text,
                                fill=INK, font=column_font, align="center")
            left += image.width + gap
    top = title_height + pad
    for (label, images), row_height in zip(cells, row_heights):
        label_height = text_size(draw, label, font)[1]
        draw.multiline_text((pad, top + (row_height - label_height) // 2), label, fill=INK, font=font)
        left = label_width
        for image in images:
            canvas.paste(image, (left, top + (row_height - image.height) // 2))
            left += image.width + gap
        top += row_height + gap
    return save_png(canvas, path)


# --------------------------------------------------------------------------------------------------
# Benchmark plot

#: one colour per method of the benchmark, in order of first appearance (Okabe & Ito 2008 without
#: its yellow, then Paul Tol's "muted" scheme): 15 distinct colours, readable as text on white
METHOD_PALETTE = PALETTE[:6] + [(51, 34, 136), (17, 119, 51), (136, 34, 85), (68, 170, 153), (153, 153, 51),
                                (170, 68, 153), (102, 17, 0), (0, 68, 136), (221, 119, 119)]
#: fixed colours of the references: no guidance grey, CFG black, the CFG window mid grey
REFERENCE_COLOURS = {"none": (150, 150, 150), "cfg": INK, "cfg_window": (110, 110, 110)}
#: longest label drawn beside a point (longer ones are cut with "…"; the legend names the method)
MAX_POINT_LABEL = 30


@dataclass
class PlotLayout:
    """What :func:`bench_plot` drew where (for checks): the file, the plotting area and every label's box."""

    path: Path
    size: tuple[int, int]
    plot_box: tuple[int, int, int, int]
    label_boxes: dict[str, tuple[int, int, int, int]]
    colours: dict[str, tuple[int, int, int]]


def method_colours(methods: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A colour per distinct method: the references their fixed colours, the others
    :data:`METHOD_PALETTE` in order of first appearance (cycled past 15 methods)."""
    colours: dict[str, tuple[int, int, int]] = {}
    for method in methods:
        if method not in colours:
            colours[method] = REFERENCE_COLOURS.get(method) or METHOD_PALETTE[
                sum(1 for m in colours if m not in REFERENCE_COLOURS) % len(METHOD_PALETTE)]
    return colours


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal x and higher or equal y, one of
    them strictly), sorted by x: the best adherence available at each cost."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy >= y) and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _short(label: str, limit: int = MAX_POINT_LABEL) -> str:
    return label if len(label) <= limit else label[:limit - 1] + "…"


def _free_label_box(draw: ImageDraw.ImageDraw, text: str, font, px: float, py: float, radius: int,
                    taken: list[tuple[int, int, int, int]], area: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """A box for ``text`` near the point ``(px, py)`` that stays inside ``area`` and overlaps nothing
    in ``taken`` (right, left, above, below, then further out); ``None`` when there is none."""
    left, top, right, bottom = area
    width, height = text_size(draw, text, font)
    offsets = [(radius + 4, -height / 2), (-radius - 4 - width, -height / 2), (-width / 2, -radius - 4 - height),
               (-width / 2, radius + 4)]
    for shift in (14, 28, 42):
        offsets += [(radius + 4, -height / 2 - shift), (radius + 4, -height / 2 + shift),
                    (-radius - 4 - width, -height / 2 - shift), (-radius - 4 - width, -height / 2 + shift)]
    for dx, dy in offsets:
        box = (int(px + dx), int(py + dy), int(px + dx + width), int(py + dy + height))
        padded = (box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2)
        if box[0] >= left + 2 and box[2] <= right - 2 and box[1] >= top + 2 and box[3] <= bottom - 2 \
                and not overlaps(padded, taken):
            return box
    return None


def bench_plot(rows: Sequence[Mapping], path: str | os.PathLike, title: str, size: tuple[int, int] = (1100, 640),
               x_key: str = "model_evals", y_key: str = "adherence") -> PlotLayout:
    """Write the benchmark's plot: adherence (points) against model evaluations per image.

    Args:
        rows: ``bench.json`` rows: ``method``, ``label``, ``model_evals``, ``adherence`` and, where
            present, ``adherence_ci95`` (drawn as a vertical error bar) and ``defaults`` (labelled).
        path: the PNG to write (atomically).
        title: the line above the plot.

    Drawn: one colour per method (:func:`method_colours`, legend right of the plot); CFG's adherence
    as a dashed black line with CFG − 2 points dotted; the fixed CFG window (rows of method
    ``cfg_window``, with ``none`` and ``cfg`` at its ends) as a grey line; the Pareto front
    (:func:`pareto_front`) as a thick light line through ringed points. Labels name the front's points
    and the ``defaults`` rows, only where a label fits inside the plot without overlapping a point
    or another label (it may cross a thin error bar; the legend names the rest by colour).

    Returns:
        a :class:`PlotLayout` (the file, the plotting area, the labels' boxes, the colours).
    """
    checked = check_points([{"label": row.get("label", row.get("method")), "x": row[x_key], "y": row[y_key]}
                             for row in rows]) if rows else check_points(rows)
    methods = [str(row["method"]) for row in rows]
    colours = method_colours(methods)
    bars = [row.get(f"{y_key}_ci95") for row in rows]
    scale = 100.0  # adherence in points
    ys = [p[2] * scale for p in checked] + [v * scale for bar in bars if bar for v in bar]
    cfg = next((p for p, method in zip(checked, methods) if method == "cfg" and p[0] == "cfg"), None)
    if cfg is not None:
        ys.append(cfg[2] * scale - 2.0)

    font = load_font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_entries = [(method, colour, "dot") for method, colour in colours.items()]
    legend_entries += [("CFG", INK, "dash"), ("CFG − 2 points", INK, "dot-line"), ("CFG window", REFERENCE_COLOURS["cfg_window"], "line"),
                       ("Pareto front", (200, 200, 200), "thick")]
    legend_width = max(text_size(measure, name, font)[0] for name, _, _ in legend_entries) + 44
    canvas, draw, to_pixel, box = plot_frame([p[1] for p in checked], ys, "model evaluations per image",
                                              "adherence (% of named attributes)", title, size,
                                              right_margin=legend_width + 24)
    left, top, right, bottom = box
    taken: list[tuple[int, int, int, int]] = []

    def pixel(x: float, y: float) -> tuple[float, float]:
        return to_pixel(x, y * scale)

    # reference lines: CFG and CFG − 2 points, the window's curve, the Pareto front
    if cfg is not None:
        _, cfg_y = pixel(0.0, cfg[2])
        dashed_line(draw, (left, cfg_y), (right, cfg_y), fill=INK, dash=8, width=1)
        _, limit_y = pixel(0.0, cfg[2] - 0.02)
        dashed_line(draw, (left, limit_y), (right, limit_y), fill=INK, dash=2, width=1)
    window = sorted((p[1], p[2]) for p, method in zip(checked, methods)
                    if method == "cfg_window" or (method in ("none", "cfg") and p[0] == method))
    if len(window) > 1:
        draw.line([pixel(x, y) for x, y in window], fill=REFERENCE_COLOURS["cfg_window"], width=2)
    front = pareto_front([(p[1], p[2]) for p in checked])
    if len(front) > 1:
        draw.line([pixel(checked[i][1], checked[i][2]) for i in front], fill=(200, 200, 200), width=6)

    # error bars, then the points (front points ringed)
    radius = 5
    for point, bar, method in zip(checked, bars, methods):
        px, _ = pixel(point[1], point[2])
        if bar:
            _, high = pixel(point[1], bar[1])
            _, low = pixel(point[1], bar[0])
            draw.line([(px, high), (px, low)], fill=colours[method], width=1)
            draw.line([(px - 3, high), (px + 3, high)], fill=colours[method], width=1)
            draw.line([(px - 3, low), (px + 3, low)], fill=colours[method], width=1)
    for index, (point, method) in enumerate(zip(checked, methods)):
        px, py = pixel(point[1], point[2])
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colours[method], outline=INK)
        if index in front:
            draw.ellipse([px - radius - 3, py - radius - 3, px + radius + 3, py + radius + 3], outline=INK, width=1)
        taken.append((int(px) - radius, int(py) - radius, int(px) + radius, int(py) + radius))

    # labels: the front first (most useful), then the defaults rows
    labelled = front + [i for i, row in enumerate(rows) if row.get("defaults") and i not in front]
    label_boxes: dict[str, tuple[int, int, int, int]] = {}
    labelled_at: set[tuple[float, float]] = set()
    for index in labelled:
        if (checked[index][1], checked[index][2]) in labelled_at:
            continue  # the same cost and adherence as a labelled row: one label per spot
        text = _short(checked[index][0])
        px, py = pixel(checked[index][1], checked[index][2])
        found = _free_label_box(draw, text, font, px, py, radius + 3, taken, (left, top, right, bottom))
        if found is None:
            continue
        labelled_at.add((checked[index][1], checked[index][2]))
        bbox_left, bbox_top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.rectangle([found[0] - 1, found[1] - 1, found[2] + 1, found[3] + 1], fill=BACKGROUND)
        draw.text((found[0] - bbox_left, found[1] - bbox_top), text, fill=colours[methods[index]], font=font)
        taken.append(found)
        label_boxes[checked[index][0]] = found

    # legend right of the plot
    x, y = right + 20, top
    _, line_height = text_size(draw, "0Hg", font)
    for name, colour, kind in legend_entries:
        middle = y + line_height / 2 + 2
        if kind == "dot":
            draw.ellipse([x + 6, middle - 5, x + 16, middle + 5], fill=colour, outline=INK)
        elif kind == "dash":
            dashed_line(draw, (x, middle), (x + 22, middle), fill=colour, dash=6, width=1)
        elif kind == "dot-line":
            dashed_line(draw, (x, middle), (x + 22, middle), fill=colour, dash=2, width=1)
        elif kind == "line":
            draw.line([(x, middle), (x + 22, middle)], fill=colour, width=2)
        else:
            draw.line([(x, middle), (x + 22, middle)], fill=colour, width=6)
        draw.text((x + 30, y), name, fill=INK, font=font)
        y += line_height + 8
    saved = save_png(canvas, path)
    return PlotLayout(saved, canvas.size, box, label_boxes, colours)
