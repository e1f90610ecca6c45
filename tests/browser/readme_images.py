"""Copy the browser test's screenshots into the README's images, smaller (palette PNG, 1200 px wide).

    FASTGUIDANCE_SCREENSHOTS=shots COMFYUI_PATH=… python -m pytest -m comfy tests/comfy/test_browser.py
    python tests/browser/readme_images.py shots docs/images

Whole workflows go to ``docs/images/workflows/<name>.png``; the chart close-ups named in ``CHARTS``
to ``docs/images/chart_<method>.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

#: README chart image → the screenshot it comes from (workflow, node id of the patch node)
CHARTS = {
    "chart_adaptive_guidance.png": "adaptive_guidance_ksampler_chart_7.png",
    "chart_compress_guidance.png": "compress_guidance_ksampler_chart_7.png",
    "chart_linear_ag.png": "linear_ag_ksampler_chart_7.png",
    "chart_step_predictor.png": "step_predictor_ksampler_chart_6.png",
    "chart_guidance_adapter.png": "guidance_adapter_ksampler_chart_6.png",
}


def smaller(source: Path, target: Path, width: int | None) -> None:
    with Image.open(source) as image:
        image = image.convert("RGB")
        if width and image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def main(shots: Path, images: Path) -> None:
    for readme_name, shot in CHARTS.items():
        smaller(shots / shot, images / readme_name, None)
    for shot in sorted(shots.glob("*.png")):
        if "_chart_" not in shot.stem:
            smaller(shot, images / "workflows" / shot.name, 1200)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
