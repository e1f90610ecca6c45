"""The registry icon: the committed docs/icon.png is what scripts/draw_icon.py draws, and pyproject names it."""

import sys
from pathlib import Path

from PIL import Image

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import draw_icon  # noqa: E402


def test_the_committed_icon_is_what_the_script_draws():
    assert draw_icon.ICON == ROOT / "docs" / "icon.png"
    assert draw_icon.ICON.is_file(), "docs/icon.png is missing: run python scripts/draw_icon.py"
    with Image.open(draw_icon.ICON) as committed:
        assert committed.format == "PNG"
        committed_pixels = committed.convert("RGBA")
    drawn = draw_icon.draw_icon()
    # decoded pixels, not bytes: another zlib or Pillow encodes the same pixels differently
    assert (committed_pixels.size, committed_pixels.tobytes()) == (drawn.size, drawn.tobytes()), \
        "docs/icon.png differs from what scripts/draw_icon.py draws: run python scripts/draw_icon.py"


def test_the_icon_is_square_small_and_not_blank():
    with Image.open(draw_icon.ICON) as icon:
        width, height = icon.size
        colours = icon.convert("RGBA").getcolors(maxcolors=1 << 16)
    assert width == height <= 400, (width, height)
    assert draw_icon.ICON.stat().st_size < 30_000
    assert colours is not None and len(colours) > 4
    for colour in (draw_icon.BACKGROUND, draw_icon.COND, draw_icon.UNCOND, draw_icon.MERGED):
        assert colour in {rgba for _, rgba in colours}, colour


def test_pyproject_icon_is_that_file_on_the_repositorys_main_branch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    repository = project["project"]["urls"]["Repository"].removesuffix("/").removesuffix(".git")
    owner_and_name = repository.removeprefix("https://github.com/")
    assert owner_and_name != repository and owner_and_name.count("/") == 1, repository
    relative = draw_icon.ICON.relative_to(ROOT).as_posix()
    expected = f"https://raw.githubusercontent.com/{owner_and_name}/main/{relative}"
    assert project["tool"]["comfy"]["Icon"] == expected
