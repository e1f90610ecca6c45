"""PNG reports (Pillow) and atomic writes: files appear whole or not at all."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from fastguidance.errors import InvalidInputError
from fastguidance.files import atomic_write, atomic_write_text
from fastguidance.research.report import (METHOD_PALETTE, REFERENCE_COLOURS, bench_plot, image_grid, method_colours,
                                          pareto_front)
from fastguidance.charts import quality_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def batch(n=3, size=32, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def open_png(path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = Image.open(path)
    image.verify()
    return Image.open(path)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# --------------------------------------------------------------------------------------------------
# atomic_write


def test_atomic_write_replaces_the_file_and_returns_the_writer_result(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    atomic_write_text(target, "first")
    assert atomic_write(target, lambda tmp: tmp.write_text("second")) == len("second")
    assert target.read_text() == "second" and leftovers(target.parent) == []


def test_a_failing_writer_leaves_no_partial_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "out.png"

    def half_then_fail(temporary):
        assert temporary.parent == tmp_path and temporary.suffix == ".png" and temporary != target
        temporary.write_bytes(PNG_SIGNATURE)  # a partial file...
        raise RuntimeError("disk full")  # ...then the failure

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert not target.exists() and list(tmp_path.iterdir()) == []

    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and leftovers(tmp_path) == []  # the previous version survives


def test_a_failing_png_encoder_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("encoder failed")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="encoder failed"):
        image_grid([("cfg", batch())], tmp_path / "grid.png")
    with pytest.raises(OSError, match="encoder failed"):
        quality_plot([{"label": "a", "x": 1, "y": 2}], tmp_path / "plot.png", "x", "y", "t")
    assert list(tmp_path.iterdir()) == []


def test_the_written_file_has_ordinary_permissions(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "x")
    reference = tmp_path / "reference.txt"
    reference.write_text("x")
    assert os.stat(target).st_mode == os.stat(reference).st_mode


# --------------------------------------------------------------------------------------------------
# image_grid


def test_image_grid_size_and_nearest_neighbour_upscaling(tmp_path):
    # empty labels: the label column is its padding only (16 px), so the size is known exactly
    images = batch(n=3)
    path = image_grid([("", images), ("", batch(n=2, seed=1))], tmp_path / "grid.png")
    image = open_png(path)
    assert image.format == "PNG" and image.mode == "RGB"
    cell, gap, pad = 96, 4, 8  # 32×32 upscaled ×3 by default
    assert image.size == (16 + 3 * cell + 2 * gap + pad, 2 * pad + 2 * cell + gap)
    # the first image of the first row, pixel (0, 0), fills a 3×3 block
    expected = tuple(int(v) for v in (images[0, :, 0, 0] * 255).round().to(torch.uint8))
    for dx in range(3):
        for dy in range(3):
            assert image.getpixel((16 + dx, pad + dy)) == expected
    assert leftovers(tmp_path) == []


def test_image_grid_with_labels_title_and_explicit_scale(tmp_path):
    rows = [("CFG (40 evaluations)", batch(n=2)), ("AG γ̄ = 0.991\n31 evaluations", batch(n=2, seed=1))]
    image = open_png(image_grid(rows, tmp_path / "grid.png", scale=2, title="Same seeds"))
    assert image.width > 2 * 64 + 16 and image.height > 2 * 64
    labelled_strip = image.crop((0, 0, image.width - 2 * 64 - 4 - 8, image.height))
    assert labelled_strip.getextrema() != ((255, 255),) * 3, "labels and title should draw some ink"


def test_image_grid_refuses_bad_rows():
    for rows, name in [([], "rows"), ([("a", torch.rand(2, 32, 32))], "rows[0]"),
                       ([("a", batch()), ("b", torch.rand(1, 4, 8, 8))], "rows[1]"), ([(1, batch())], "rows[0]")]:
        with pytest.raises(InvalidInputError) as error:
            image_grid(rows, "/nonexistent/never-written.png")
        assert error.value.input_name == name
    with pytest.raises(InvalidInputError):
        image_grid([("a", batch())], "/nonexistent/never-written.png", scale=0)


# --------------------------------------------------------------------------------------------------
# quality_plot


POINTS = [
    {"label": "CFG", "x": 40, "y": 0.95},
    {"label": "AG 0.991", "x": 31, "y": 0.94},
    {"label": "CompG reuse", "x": 24, "y": 0.935},
    {"label": "cond only", "x": 20, "y": torch.tensor(0.41)},
]


def test_quality_plot_writes_a_png_of_the_requested_size(tmp_path):
    path = quality_plot(POINTS, tmp_path / "plot.png", "model evaluations per image", "adherence", "Adherence vs cost")
    image = open_png(path)
    assert image.size == (800, 500) and image.mode == "RGB"
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert (0, 114, 178) in colours and (213, 94, 0) in colours  # the first two points' colours
    small = open_png(quality_plot(POINTS[:1], tmp_path / "one.png", "x", "y", "one point", size=(400, 300), line=True))
    assert small.size == (400, 300)
    assert leftovers(tmp_path) == []


def test_quality_plot_refuses_non_finite_and_missing_values(tmp_path):
    for points, name in [([{"label": "a", "x": 1, "y": float("inf")}], "points[0].y"),
                         ([{"label": "a", "x": 1, "y": 2}, {"label": "b", "y": 2}], "points[1]"),
                         ([], "points")]:
        with pytest.raises(InvalidInputError) as error:
            quality_plot(points, tmp_path / "plot.png", "x", "y", "t")
        assert error.value.input_name == name
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# image_grid column titles


def test_image_grid_puts_a_wrapped_title_above_each_column(tmp_path):
    rows = [("cfg", batch(n=3)), ("ag", batch(n=3, seed=1))]
    plain = open_png(image_grid(rows, tmp_path / "plain.png"))
    prompts = ["two small red circles left of a large blue square", "a green triangle", "three yellow stars"]
    titled = open_png(image_grid(rows, tmp_path / "titled.png", column_titles=prompts))
    assert titled.width == plain.width and titled.height > plain.height + 2 * 11  # the long prompt wraps to lines
    extra = titled.height - plain.height
    label_width = plain.width - 3 * 96 - 2 * 4 - 8
    for column in range(3):  # ink above every column, inside its width
        left = label_width + column * (96 + 4)
        band = titled.crop((left, 8, left + 96, 8 + extra))
        assert band.getextrema() != ((255, 255),) * 3, column
    with pytest.raises(InvalidInputError) as error:
        image_grid(rows, tmp_path / "never.png", column_titles=prompts + ["one too many"])
    assert error.value.input_name == "column_titles"


# --------------------------------------------------------------------------------------------------
# bench_plot


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(20, 0.61), (40, 0.764), (25, 0.753), (30, 0.76), (30, 0.75), (24, 0.70), (34, 0.76), (22.8, 0.755)]
    assert pareto_front(points) == [0, 7, 3, 1]  # sorted by cost; (34, 0.76) is beaten by (30, 0.76)
    assert pareto_front([(1, 1), (1, 1)]) == [0, 1]  # equal points do not beat each other


def test_method_colours_are_distinct_and_fixed_for_the_references():
    methods = ["none", "cfg", "cfg_window"] + [f"m{i}" for i in range(len(METHOD_PALETTE))] + ["cfg", "m0"]
    colours = method_colours(methods)
    assert len(colours) == 3 + len(METHOD_PALETTE)
    assert len(set(colours.values())) == len(colours)
    assert all(colours[name] == colour for name, colour in REFERENCE_COLOURS.items())


def bench_rows():
    rows = [{"method": "none", "label": "none", "model_evals": 20.0, "adherence": 0.609},
            {"method": "cfg", "label": "cfg", "model_evals": 40.0, "adherence": 0.764}]
    rows += [{"method": "cfg_window", "label": f"cfg_window fraction={k / 20}", "model_evals": 20.0 + k,
              "adherence": 0.609 + 0.155 * (1 - (1 - k / 20) ** 2)} for k in range(1, 20)]
    for m, (method, base) in enumerate([("ag", 0.70), ("compg", 0.72), ("linear_ag", 0.71), ("adadiff", 0.74),
                                        ("adadiff+compg", 0.69), ("agd", 0.697)]):
        for i in range(4):
            rows.append({"method": method, "label": f"{method} setting={i} with a long tail of words",
                         "model_evals": 21.0 + 4.5 * i + m % 3, "adherence": base + 0.012 * i,
                         "defaults": i == 0})
    for row in rows:
        row["adherence_ci95"] = [row["adherence"] - 0.021, row["adherence"] + 0.019]
    return rows


def test_bench_plot_labels_stay_inside_and_never_overlap(tmp_path):
    rows = bench_rows()
    layout = bench_plot(rows, tmp_path / "plot.png", "Adherence against cost (96 prompts)")
    image = open_png(layout.path)
    assert image.size == layout.size == (1100, 640)
    left, top, right, bottom = layout.plot_box
    assert layout.label_boxes, "the front and the defaults rows get labels where they fit"
    boxes = list(layout.label_boxes.values())
    for box in boxes:
        assert left <= box[0] < box[2] <= right and top <= box[1] < box[3] <= bottom, box
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 18)}
    assert set(layout.colours.values()) <= colours  # every method's colour is drawn (dots and legend)
    assert len(set(layout.colours.values())) == len(layout.colours) == 9
    assert right < image.width - 150  # the legend has its own column right of the plot
