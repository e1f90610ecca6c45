"""PNG reports of the benchmark, drawn with Pillow alone (no plotting library).

- :func:`image_grid`: labelled rows of images (for example CFG and each method for the same seeds),
  nearest-neighbour upscaled so that small images (32×32) stay visible.
- :func:`quality_plot`: a labelled scatter (optionally joined by a line) with axes, ticks and
  numbers, for example prompt adherence against model evaluations per image.
- :func:`tradeoff_chart`: a search's trials as one coloured series per method against a target
  line (FastGuidance Tune: model evaluations per image against the worst SSIM), as an image.
- :func:`bench_plot`: the benchmark's rows, adherence against model evaluations: one colour per
  method with a legend, 95% error bars, CFG and the fixed CFG window as reference lines, the Pareto
  front; labels only where they fit inside the plot without overlapping.

The first two write atomically through :func:`fastguidance.files.atomic_write`: a reader never sees a
half-written PNG, and a failed write leaves no file behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import InvalidInputError
from .files import atomic_write

#: grid images are upscaled (integer factor, nearest neighbour) to at least this height by default
MIN_CELL_HEIGHT = 96
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID_INK = (225, 225, 225)
#: colour-blind-safe palette (Okabe & Ito 2008), cycled over the points of a plot
#: (its yellow left out: unreadable as text on white)
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (20, 20, 20)]


#: scalable fonts with wide character coverage (×, γ, μ, dashes, accents), tried in order before
#: Pillow's own default font, whose bundled face covers little beyond ASCII
_FONT_FILES = ("DejaVuSans.ttf", "Arial.ttf", "arial.ttf", "Helvetica.ttc", "LiberationSans-Regular.ttf")


def _font(size: int) -> ImageFont.ImageFont:
    """A font of ``size`` pixels: the first of :data:`_FONT_FILES` that Pillow finds in the system's
    font folders (DejaVu Sans on most Linux, Arial on Windows and macOS), else Pillow's default font
    (scalable since Pillow 10.1; its fixed bitmap font before)."""
    for name in _FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 takes no size
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))
    return Path(path)


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
        if lines and _text_size(draw, lines[-1] + " " + word, font)[0] <= width:
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

    font, title_font = _font(14), _font(18)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(gap, 8)
    label_width = max(_text_size(measure, label, font)[0] for label, _ in rows) + 2 * pad
    cells = [(label, _to_pil(images, scale)) for label, images in rows]
    row_heights = [max(max(image.height for image in images), _text_size(measure, label, font)[1] + 2 * pad)
                   for label, images in cells]
    row_widths = [sum(image.width for image in images) + gap * (len(images) - 1) for _, images in cells]
    title_height = _text_size(measure, title, title_font)[1] + 2 * pad if title else 0
    column_font = _font(11)
    if column_titles is not None:
        if isinstance(column_titles, str) or len(column_titles) > len(cells[0][1]):
            raise InvalidInputError("column_titles", column_titles,
                                    f"expected at most {len(cells[0][1])} texts, one per column of the first row")
        column_titles = [_wrap(measure, str(text), column_font, image.width)
                         for text, image in zip(column_titles, cells[0][1])]
        title_height += max((_text_size(measure, text, column_font)[1] for text in column_titles), default=0) + pad
    width = label_width + max(row_widths) + pad
    height = title_height + sum(row_heights) + gap * (len(cells) - 1) + 2 * pad
    if title:
        width = max(width, _text_size(measure, title, title_font)[0] + 2 * pad)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=INK, font=title_font)
    if column_titles:
        left = label_width
        for text, image in zip(column_titles, cells[0][1]):
            text_width, text_height = _text_size(draw, text, column_font)
            draw.multiline_text((left + (image.width - text_width) / 2, title_height + pad - 6 - text_height), text,
                                fill=INK, font=column_font, align="center")
            left += image.width + gap
    top = title_height + pad
    for (label, images), row_height in zip(cells, row_heights):
        label_height = _text_size(draw, label, font)[1]
        draw.multiline_text((pad, top + (row_height - label_height) // 2), label, fill=INK, font=font)
        left = label_width
        for image in images:
            canvas.paste(image, (left, top + (row_height - image.height) // 2))
            left += image.width + gap
        top += row_height + gap
    return _save_png(canvas, path)


# --------------------------------------------------------------------------------------------------
# Quality plot


def _nice_ticks(low: float, high: float, target: int = 6) -> tuple[list[float], float]:
    """Round tick values inside [low, high], about ``target`` of them, with a step of 1, 2, 2.5 or
    5 × 10^k (Heckbert, "Nice numbers for graph labels", Graphics Gems, 1990); returns (ticks, step)."""
    raw = (high - low) / max(target - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    return [i * step for i in range(first, last + 1)], step


def _padded_range(values: list[float], margin: float = 0.06) -> tuple[float, float]:
    """The axis limits: [min, max] widened by ``margin`` of the spread on each side, so that no dot
    sits on an axis; a single value gets ±10% of itself (±1 for 0)."""
    low, high = min(values), max(values)
    if high <= low:
        spread = abs(low) * 0.1 or 1.0
        return low - spread, high + spread
    spread = (high - low) * margin
    return low - spread, high + spread


def _format_tick(value: float, step: float) -> str:
    exponent = math.floor(math.log10(step) + 1e-9)
    mantissa = step / 10.0 ** exponent
    decimals = max(0, -exponent) + (1 if abs(mantissa - 2.5) < 1e-6 else 0)
    text = f"{value:,.{decimals}f}"
    return "0" if float(text.replace(",", "")) == 0 else text


def _check_points(points: object) -> list[tuple[str, float, float]]:
    if not isinstance(points, Sequence) or isinstance(points, (str, bytes)) or not points:
        raise InvalidInputError("points", type(points).__name__, "expected a non-empty list of {label, x, y} dicts")
    checked = []
    for index, point in enumerate(points):
        name = f"points[{index}]"
        if not isinstance(point, Mapping) or not {"label", "x", "y"} <= set(point):
            raise InvalidInputError(name, point, "expected a dict with keys label, x and y")
        values = []
        for key in ("x", "y"):
            value = point[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInputError(f"{name}.{key}", value, "expected a finite number (cap infinite PSNRs "
                                                                "first, e.g. with fastguidance.metrics.mean_psnr)")
            values.append(float(value))
        checked.append((str(point["label"]), values[0], values[1]))
    return checked


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def _plot_frame(xs: Sequence[float], ys: Sequence[float], x_label: str, y_label: str, title: str,
                size: tuple[int, int], header: int = 0, right_margin: int = 24):
    """A white canvas with the title, round ticks, grid lines and axis captions of a plot spanning
    ``xs`` and ``ys`` (plus a 6% margin); ``header`` pixels are left free below the title (a legend),
    ``right_margin`` pixels right of the plot (24; more for a legend beside it).

    Returns ``(canvas, draw, to_pixel, (left, top, right, bottom))``: ``to_pixel(x, y)`` maps data
    to canvas coordinates, the box is the plotting area.
    """
    width, height = size
    if width < 200 or height < 150:
        raise InvalidInputError("size", size, "expected at least 200×150 pixels")
    font, title_font = _font(14), _font(18)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    x_limits = _padded_range(list(xs))
    y_limits = _padded_range(list(ys))
    x_ticks, x_step = _nice_ticks(*x_limits)
    y_ticks, y_step = _nice_ticks(*y_limits)
    y_texts = [_format_tick(v, y_step) for v in y_ticks]
    tick_label_width = max(_text_size(draw, text, font)[0] for text in y_texts)
    _, line_height = _text_size(draw, "0Hg", font)
    left = 16 + line_height + 8 + tick_label_width + 8  # y caption, gap, tick numbers, gap
    right, top = width - right_margin, 16 + _text_size(draw, title, title_font)[1] + 16 + header
    bottom = height - (8 + line_height + 8 + line_height + 12)  # tick numbers, gap, x caption

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_limits[0]) / (x_limits[1] - x_limits[0]) * (right - left)
        py = bottom - (y - y_limits[0]) / (y_limits[1] - y_limits[0]) * (bottom - top)
        return px, py

    # grid, ticks and numbers
    for value in x_ticks:
        px, _ = to_pixel(value, y_limits[0])
        draw.line([(px, top), (px, bottom)], fill=GRID_INK)
        draw.line([(px, bottom), (px, bottom + 5)], fill=INK)
        text = _format_tick(value, x_step)
        text_width = _text_size(draw, text, font)[0]
        draw.text((min(px - text_width / 2, width - 2 - text_width), bottom + 8), text, fill=INK, font=font)
    for value, text in zip(y_ticks, y_texts):
        _, py = to_pixel(x_limits[0], value)
        draw.line([(left, py), (right, py)], fill=GRID_INK)
        draw.line([(left - 5, py), (left, py)], fill=INK)
        text_width, text_height = _text_size(draw, text, font)
        draw.text((left - 8 - text_width, py - text_height / 2 - 3), text, fill=INK, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=2)

    # title and captions (the y caption rotated)
    title_width, _ = _text_size(draw, title, title_font)
    draw.text(((width - title_width) / 2, 14), title, fill=INK, font=title_font)
    x_width, _ = _text_size(draw, x_label, font)
    draw.text(((left + right - x_width) / 2, height - line_height - 14), x_label, fill=INK, font=font)
    y_width, _ = _text_size(draw, y_label, font)
    caption = Image.new("RGB", (y_width + 4, line_height + 8), BACKGROUND)
    ImageDraw.Draw(caption).text((2, 0), y_label, fill=INK, font=font)
    caption = caption.rotate(90, expand=True)
    canvas.paste(caption, (14, int((top + bottom - caption.height) / 2)))
    return canvas, draw, to_pixel, (left, top, right, bottom)


def quality_plot(points: Sequence[Mapping], path: str | os.PathLike, x_label: str, y_label: str, title: str,
                 size: tuple[int, int] = (800, 500), line: bool = False) -> Path:
    """Write a labelled scatter plot PNG: one coloured, labelled dot per point.

    Args:
        points: dicts with ``label`` (str), ``x`` and ``y`` (finite numbers), for example
            ``{"label": "AG 0.991", "x": 31.0, "y": 0.94}`` (model evaluations per image, adherence).
        path: the PNG to write (atomically; its folder is created).
        x_label, y_label, title: axis captions and the title.
        size: (width, height) in pixels; readable at the default 800×500.
        line: also join the points, in the given order, with a line.

    The axes span the data plus a 6% margin (a single value gets ±10%); round ticks (1, 2, 2.5 or
    5 × 10^k) with grid lines. A label goes right of its dot, or left, above or below when that would overlap
    an earlier label or leave the plot.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    checked = _check_points(points)
    canvas, draw, to_pixel, box = _plot_frame([p[1] for p in checked], [p[2] for p in checked], x_label, y_label,
                                              title, size)
    left, top, right, bottom = box
    width, font = canvas.width, _font(14)

    # the points
    pixels = [to_pixel(x, y) for _, x, y in checked]
    if line and len(pixels) > 1:
        draw.line(pixels, fill=(150, 150, 150), width=2)
    radius = 5
    # labels avoid the dots and each other
    placed = [(int(px) - radius, int(py) - radius, int(px) + radius, int(py) + radius) for px, py in pixels]
    for index, ((label, _, _), (px, py)) in enumerate(zip(checked, pixels)):
        colour = PALETTE[index % len(PALETTE)]
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour, outline=INK)
        draw.text(_place_label(draw, label, font, px, py, radius, placed, (left, top, width, bottom)), label,
                  fill=colour, font=font)
    return _save_png(canvas, path)


def _place_label(draw: ImageDraw.ImageDraw, label: str, font, px: float, py: float, radius: int,
                 placed: list[tuple[int, int, int, int]], area: tuple[int, int, int, int]) -> tuple[float, float]:
    """Where the label of the dot at ``(px, py)`` goes: right of it, or left, above, below or shifted
    when that would overlap a box in ``placed`` or leave ``area`` (left, top, right, bottom); its box
    is added to ``placed``."""
    left, top, right, bottom = area
    text_width, text_height = _text_size(draw, label, font)
    candidates = [(px + 9, py - text_height / 2 - 3), (px - 9 - text_width, py - text_height / 2 - 3),
                  (px - text_width / 2, py - radius - 6 - text_height - 3), (px - text_width / 2, py + radius + 4)]
    candidates += [(px + 9, py - text_height / 2 - 3 + shift) for shift in (16, -16, 32, -32)]
    chosen = candidates[0]
    for x0, y0 in candidates:
        box = (int(x0), int(y0 + 3), int(x0 + text_width), int(y0 + 3 + text_height))
        inside = box[0] >= left + 2 and box[2] <= right - 2 and box[1] >= top - 8 and box[3] <= bottom - 2
        if inside and not _overlaps(box, placed):
            chosen = (x0, y0)
            break
    x0, y0 = chosen
    placed.append((int(x0), int(y0 + 3), int(x0 + text_width), int(y0 + 3 + text_height)))
    return chosen


# --------------------------------------------------------------------------------------------------
# Trade-off chart


def _dashed_line(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], fill, dash: int = 8,
                 width: int = 2) -> None:
    """A horizontal dashed line from ``start`` to ``end`` (same y)."""
    x, y = start
    while x < end[0]:
        draw.line([(x, y), (min(x + dash, end[0]), y)], fill=fill, width=width)
        x += 2 * dash


def tradeoff_chart(series: Mapping[str, Sequence[tuple[float, float]]], target: float,
                   reference: tuple[float, float] | None = None,
                   chosen: Mapping[str, tuple[float, float, str]] | None = None,
                   title: str = "Cost against fidelity", x_label: str = "model evaluations per image",
                   y_label: str = "worst SSIM to plain CFG", size: tuple[int, int] = (800, 500)) -> Image.Image:
    """Draw a search's trials: one colour per series, a dashed horizontal target line (an image).

    Args:
        series: name → ``(x, y)`` points in the order measured, e.g. ``{"ag": [(31.0, 0.97), …]}``
            (model evaluations per image, worst SSIM); each series gets a :data:`PALETTE` colour and
            a legend entry above the plot.
        target: the y value drawn as a dashed line across the plot, labelled ``target``.
        reference: an optional point drawn as a black square labelled ``plain CFG``.
        chosen: optional, per series name, ``(x, y, label)`` of its selected point: ringed and labelled.
        title, x_label, y_label, size: as in :func:`quality_plot`.

    The axes span every point, the target and the reference (:func:`quality_plot`'s margins and ticks).

    Returns:
        an RGB :class:`PIL.Image.Image` of ``size`` (the caller saves or converts it).
    """
    if not isinstance(series, Mapping) or not any(series.values()):
        raise InvalidInputError("series", series, "expected at least one series with at least one (x, y) point")
    named = {str(name): _check_points([{"label": name, "x": x, "y": y} for x, y in points])
             for name, points in series.items() if points}
    extra = [{"label": "target", "x": next(iter(named.values()))[0][1], "y": target}]
    if reference is not None:
        extra.append({"label": "plain CFG", "x": reference[0], "y": reference[1]})
    extra_checked = _check_points(extra)
    everything = [point for points in named.values() for point in points] + extra_checked

    font = _font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, line_height = _text_size(measure, "0Hg", font)
    canvas, draw, to_pixel, (left, top, right, bottom) = _plot_frame(
        [p[1] for p in everything], [p[2] for p in everything], x_label, y_label, title, size, header=line_height + 12)
    width = canvas.width

    # legend, one entry per series (plus the reference), between the title and the plot
    entries = [(name, PALETTE[index % len(PALETTE)]) for index, name in enumerate(named)]
    if reference is not None:
        entries.append(("plain CFG", INK))
    x, y = left, top - line_height - 14
    for name, colour in entries:
        draw.rectangle([x, y + 4, x + 10, y + 14], fill=colour, outline=INK)
        draw.text((x + 15, y), name, fill=INK, font=font)
        x += 15 + _text_size(draw, name, font)[0] + 24

    # the target line
    _, target_y = to_pixel(0.0, extra_checked[0][2])
    _dashed_line(draw, (left, target_y), (right, target_y), fill=(120, 120, 120))
    label = f"target {target:g}"
    label_width, label_height = _text_size(draw, label, font)
    draw.text((right - label_width - 4, target_y - label_height - 8), label, fill=(90, 90, 90), font=font)

    # the points of each series, then the labels (which avoid every dot and each other)
    radius = 5
    placed: list[tuple[int, int, int, int]] = []
    for index, (name, points) in enumerate(named.items()):
        colour = PALETTE[index % len(PALETTE)]
        for _, point_x, point_y in points:
            px, py = to_pixel(point_x, point_y)
            draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour, outline=INK)
            placed.append((int(px) - radius, int(py) - radius, int(px) + radius, int(py) + radius))
    labels = []
    if reference is not None:
        px, py = to_pixel(extra_checked[1][1], extra_checked[1][2])
        draw.rectangle([px - radius, py - radius, px + radius, py + radius], fill=INK)
        placed.append((int(px) - radius, int(py) - radius, int(px) + radius, int(py) + radius))
        labels.append(("plain CFG", INK, px, py))
    for index, name in enumerate(named):
        if chosen and name in chosen:
            cx, cy, text = chosen[name]
            px, py = to_pixel(float(cx), float(cy))
            colour = PALETTE[index % len(PALETTE)]
            draw.ellipse([px - radius - 4, py - radius - 4, px + radius + 4, py + radius + 4], outline=colour, width=2)
            labels.append((text, colour, px, py))
    for text, colour, px, py in labels:
        position = _place_label(draw, text, font, px, py, radius + 4, placed, (left, top, width, bottom))
        draw.text(position, text, fill=colour, font=font)
    return canvas


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
    width, height = _text_size(draw, text, font)
    offsets = [(radius + 4, -height / 2), (-radius - 4 - width, -height / 2), (-width / 2, -radius - 4 - height),
               (-width / 2, radius + 4)]
    for shift in (14, 28, 42):
        offsets += [(radius + 4, -height / 2 - shift), (radius + 4, -height / 2 + shift),
                    (-radius - 4 - width, -height / 2 - shift), (-radius - 4 - width, -height / 2 + shift)]
    for dx, dy in offsets:
        box = (int(px + dx), int(py + dy), int(px + dx + width), int(py + dy + height))
        padded = (box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2)
        if box[0] >= left + 2 and box[2] <= right - 2 and box[1] >= top + 2 and box[3] <= bottom - 2 \
                and not _overlaps(padded, taken):
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
    checked = _check_points([{"label": row.get("label", row.get("method")), "x": row[x_key], "y": row[y_key]}
                             for row in rows]) if rows else _check_points(rows)
    methods = [str(row["method"]) for row in rows]
    colours = method_colours(methods)
    bars = [row.get(f"{y_key}_ci95") for row in rows]
    scale = 100.0  # adherence in points
    ys = [p[2] * scale for p in checked] + [v * scale for bar in bars if bar for v in bar]
    cfg = next((p for p, method in zip(checked, methods) if method == "cfg" and p[0] == "cfg"), None)
    if cfg is not None:
        ys.append(cfg[2] * scale - 2.0)

    font = _font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_entries = [(method, colour, "dot") for method, colour in colours.items()]
    legend_entries += [("CFG", INK, "dash"), ("CFG − 2 points", INK, "dot-line"), ("CFG window", REFERENCE_COLOURS["cfg_window"], "line"),
                       ("Pareto front", (200, 200, 200), "thick")]
    legend_width = max(_text_size(measure, name, font)[0] for name, _, _ in legend_entries) + 44
    canvas, draw, to_pixel, box = _plot_frame([p[1] for p in checked], ys, "model evaluations per image",
                                              "adherence (% of named attributes)", title, size,
                                              right_margin=legend_width + 24)
    left, top, right, bottom = box
    taken: list[tuple[int, int, int, int]] = []

    def pixel(x: float, y: float) -> tuple[float, float]:
        return to_pixel(x, y * scale)

    # reference lines: CFG and CFG − 2 points, the window's curve, the Pareto front
    if cfg is not None:
        _, cfg_y = pixel(0.0, cfg[2])
        _dashed_line(draw, (left, cfg_y), (right, cfg_y), fill=INK, dash=8, width=1)
        _, limit_y = pixel(0.0, cfg[2] - 0.02)
        _dashed_line(draw, (left, limit_y), (right, limit_y), fill=INK, dash=2, width=1)
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
    _, line_height = _text_size(draw, "0Hg", font)
    for name, colour, kind in legend_entries:
        middle = y + line_height / 2 + 2
        if kind == "dot":
            draw.ellipse([x + 6, middle - 5, x + 16, middle + 5], fill=colour, outline=INK)
        elif kind == "dash":
            _dashed_line(draw, (x, middle), (x + 22, middle), fill=colour, dash=6, width=1)
        elif kind == "dot-line":
            _dashed_line(draw, (x, middle), (x + 22, middle), fill=colour, dash=2, width=1)
        elif kind == "line":
            draw.line([(x, middle), (x + 22, middle)], fill=colour, width=2)
        else:
            draw.line([(x, middle), (x + 22, middle)], fill=colour, width=6)
        draw.text((x + 30, y), name, fill=INK, font=font)
        y += line_height + 8
    saved = _save_png(canvas, path)
    return PlotLayout(saved, canvas.size, box, label_boxes, colours)
