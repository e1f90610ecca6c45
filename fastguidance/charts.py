"""Charts the nodes draw, with Pillow alone (no plotting library).

- :func:`quality_plot`: a labelled scatter (optionally joined by a line) with axes, ticks and
  numbers, for example a trainer's held-out loss against its steps.
- :func:`tradeoff_chart`: a search's trials as one coloured series per method against a target
  line (FastGuidance Tune: model evaluations per image against the worst SSIM), as an image.

Both write atomically through :func:`fastguidance.files.atomic_write`: a reader never sees a
half-written PNG, and a failed write leaves no file behind. The drawing pieces (:func:`load_font`,
:func:`plot_frame`, …) are shared with the benchmark's report (:mod:`fastguidance.research.report`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import InvalidInputError
from .files import atomic_write

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID_INK = (225, 225, 225)
#: colour-blind-safe palette (Okabe & Ito 2008), cycled over the points of a plot
#: (its yellow left out: unreadable as text on white)
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (20, 20, 20)]


#: scalable fonts with wide character coverage (×, γ, μ, dashes, accents), tried in order before
#: Pillow's own default font, whose bundled face covers little beyond ASCII
FONT_FILES = ("DejaVuSans.ttf", "Arial.ttf", "arial.ttf", "Helvetica.ttc", "LiberationSans-Regular.ttf")


def load_font(size: int) -> ImageFont.ImageFont:
    """A font of ``size`` pixels: the first of :data:`FONT_FILES` that Pillow finds in the system's
    font folders (DejaVu Sans on most Linux, Arial on Windows and macOS), else Pillow's default font
    (scalable since Pillow 10.1; its fixed bitmap font before)."""
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 takes no size
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))
    return Path(path)


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


def check_points(points: object) -> list[tuple[str, float, float]]:
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


def overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def plot_frame(xs: Sequence[float], ys: Sequence[float], x_label: str, y_label: str, title: str,
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
    font, title_font = load_font(14), load_font(18)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    x_limits = _padded_range(list(xs))
    y_limits = _padded_range(list(ys))
    x_ticks, x_step = _nice_ticks(*x_limits)
    y_ticks, y_step = _nice_ticks(*y_limits)
    y_texts = [_format_tick(v, y_step) for v in y_ticks]
    tick_label_width = max(text_size(draw, text, font)[0] for text in y_texts)
    _, line_height = text_size(draw, "0Hg", font)
    left = 16 + line_height + 8 + tick_label_width + 8  # y caption, gap, tick numbers, gap
    right, top = width - right_margin, 16 + text_size(draw, title, title_font)[1] + 16 + header
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
        text_width = text_size(draw, text, font)[0]
        draw.text((min(px - text_width / 2, width - 2 - text_width), bottom + 8), text, fill=INK, font=font)
    for value, text in zip(y_ticks, y_texts):
        _, py = to_pixel(x_limits[0], value)
        draw.line([(left, py), (right, py)], fill=GRID_INK)
        draw.line([(left - 5, py), (left, py)], fill=INK)
        text_width, text_height = text_size(draw, text, font)
        draw.text((left - 8 - text_width, py - text_height / 2 - 3), text, fill=INK, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=2)

    # title and captions (the y caption rotated)
    title_width, _ = text_size(draw, title, title_font)
    draw.text(((width - title_width) / 2, 14), title, fill=INK, font=title_font)
    x_width, _ = text_size(draw, x_label, font)
    draw.text(((left + right - x_width) / 2, height - line_height - 14), x_label, fill=INK, font=font)
    y_width, _ = text_size(draw, y_label, font)
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
    checked = check_points(points)
    canvas, draw, to_pixel, box = plot_frame([p[1] for p in checked], [p[2] for p in checked], x_label, y_label,
                                              title, size)
    left, top, right, bottom = box
    width, font = canvas.width, load_font(14)

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
    return save_png(canvas, path)


def _place_label(draw: ImageDraw.ImageDraw, label: str, font, px: float, py: float, radius: int,
                 placed: list[tuple[int, int, int, int]], area: tuple[int, int, int, int]) -> tuple[float, float]:
    """Where the label of the dot at ``(px, py)`` goes: right of it, or left, above, below or shifted
    when that would overlap a box in ``placed`` or leave ``area`` (left, top, right, bottom); its box
    is added to ``placed``."""
    left, top, right, bottom = area
    text_width, text_height = text_size(draw, label, font)
    candidates = [(px + 9, py - text_height / 2 - 3), (px - 9 - text_width, py - text_height / 2 - 3),
                  (px - text_width / 2, py - radius - 6 - text_height - 3), (px - text_width / 2, py + radius + 4)]
    candidates += [(px + 9, py - text_height / 2 - 3 + shift) for shift in (16, -16, 32, -32)]
    chosen = candidates[0]
    for x0, y0 in candidates:
        box = (int(x0), int(y0 + 3), int(x0 + text_width), int(y0 + 3 + text_height))
        inside = box[0] >= left + 2 and box[2] <= right - 2 and box[1] >= top - 8 and box[3] <= bottom - 2
        if inside and not overlaps(box, placed):
            chosen = (x0, y0)
            break
    x0, y0 = chosen
    placed.append((int(x0), int(y0 + 3), int(x0 + text_width), int(y0 + 3 + text_height)))
    return chosen


# --------------------------------------------------------------------------------------------------
# Trade-off chart


def dashed_line(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], fill, dash: int = 8,
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
    named = {str(name): check_points([{"label": name, "x": x, "y": y} for x, y in points])
             for name, points in series.items() if points}
    extra = [{"label": "target", "x": next(iter(named.values()))[0][1], "y": target}]
    if reference is not None:
        extra.append({"label": "plain CFG", "x": reference[0], "y": reference[1]})
    extra_checked = check_points(extra)
    everything = [point for points in named.values() for point in points] + extra_checked

    font = load_font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, line_height = text_size(measure, "0Hg", font)
    canvas, draw, to_pixel, (left, top, right, bottom) = plot_frame(
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
        x += 15 + text_size(draw, name, font)[0] + 24

    # the target line
    _, target_y = to_pixel(0.0, extra_checked[0][2])
    dashed_line(draw, (left, target_y), (right, target_y), fill=(120, 120, 120))
    label = f"target {target:g}"
    label_width, label_height = text_size(draw, label, font)
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
