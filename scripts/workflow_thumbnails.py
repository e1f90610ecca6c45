"""Write each example workflow's thumbnail (``example_workflows/<name>.jpg``) from its browser-test picture.

ComfyUI's template browser shows ``example_workflows/<name>.jpg`` on the workflow's card (it asks for it
on frontends 1.27 and 1.49 alike). The pictures come from the real-host browser test
(``tests/comfy/test_browser.py`` with ``FASTGUIDANCE_SCREENSHOTS=docs/images/workflows``), so a
thumbnail shows the workflow as it looks in the page; this script only scales and encodes them:

    python scripts/workflow_thumbnails.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PICTURES = ROOT / "docs" / "images" / "workflows"
WORKFLOWS = ROOT / "example_workflows"
#: the cards are small; 512 pixels wide keeps each file near 30 kB
WIDTH = 512


def thumbnail(picture: Path) -> Image.Image:
    image = Image.open(picture).convert("RGB")
    height = round(image.height * WIDTH / image.width)
    return image.resize((WIDTH, height), Image.LANCZOS)


def main() -> None:
    missing = []
    for workflow in sorted(WORKFLOWS.glob("*.json")):
        picture = PICTURES / f"{workflow.stem}.png"
        if not picture.is_file():
            missing.append(picture.name)
            continue
        thumbnail(picture).save(WORKFLOWS / f"{workflow.stem}.jpg", "JPEG", quality=82, optimize=True)
    if missing:
        sys.exit(f"no browser-test picture for {', '.join(missing)}: run the browser test with "
                 "FASTGUIDANCE_SCREENSHOTS=docs/images/workflows first")
    print(f"wrote thumbnails for the workflows in {WORKFLOWS}", file=sys.stderr)


if __name__ == "__main__":
    main()
