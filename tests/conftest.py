"""Test set-up shared by the CI suite and the real-host suite.

The project root is appended (not prepended) to ``sys.path`` so that ``import fastguidance`` works
while ComfyUI's top-level ``nodes`` module, in the real-host tests, is not shadowed by the pack's
``nodes/`` package.
"""

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.append(str(PROJECT_ROOT))
