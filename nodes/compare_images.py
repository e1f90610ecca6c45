"""Compare Images: SSIM and PSNR between two IMAGE batches, for A/B checks (FastGuidance vs plain CFG)."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..fastguidance.errors import InvalidInputError
from ..fastguidance.metrics import PSNR_CAP_DB, compare_images
from .validation import ValidatedNode

logger = logging.getLogger(__name__)

_INPUT_NAMES = ("image_a", "image_b")


def _to_channels_first(images: object, name: str) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` → ``[B, C, H, W]`` (a view), refusing anything else by name."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(name, shape, "expected an IMAGE batch [batch, height, width, channels]; connect an "
                                             "image output (VAE Decode, Load Image) here")
    return images.movedim(-1, 1)


class CompareImagesNode(ValidatedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_CompareImages",
            display_name="Compare Images (FastGuidance)",
            category="image/fastguidance",
            description="Measures how close two images are: SSIM (structure, 1 = identical) and PSNR (pixel error, "
                        "higher = closer) of each pair, computed with kornia. Use it to check that a FastGuidance "
                        "branch still gives the picture of the plain CFG branch with the same seed. Image i of A is "
                        "compared with image i of B; a single image is compared with every image of the other "
                        "input. The summary is the text output and is also written to the server log.",
            inputs=[
                io.Image.Input("image_a", tooltip="The reference images (for example the plain CFG branch). Same "
                                                   "size as image_b; the same number of images, or a single image."),
                io.Image.Input("image_b", tooltip="The images to compare with image_a (for example the FastGuidance "
                                                   "branch, same seed). Same size as image_a; the same number of "
                                                   "images, or a single image."),
            ],
            outputs=[
                io.Float.Output("ssim", display_name="ssim",
                                tooltip="Mean SSIM over the image pairs (11×11 Gaussian window): 1.0 = identical, "
                                        "lower = more different structure."),
                io.Float.Output("psnr", display_name="psnr",
                                tooltip=f"Mean PSNR over the image pairs in dB: higher = closer (above about 40 dB "
                                        f"differences are hard to see). Identical pairs (infinite PSNR) count as {PSNR_CAP_DB:g} dB."),
                io.String.Output("text", display_name="text",
                                 tooltip="A one-line summary, e.g. 'SSIM 0.973 · PSNR 31.2 dB over 2 images' "
                                         "(also written to the server log)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image_a: torch.Tensor, image_b: torch.Tensor) -> io.NodeOutput:
        a, b = _to_channels_first(image_a, "image_a"), _to_channels_first(image_b, "image_b")
        (height_a, width_a), (height_b, width_b) = a.shape[-2:], b.shape[-2:]
        if (height_a, width_a) != (height_b, width_b):
            raise InvalidInputError("image_b", f"{height_b}×{width_b} pixels (height×width)",
                                    f"image_a is {height_a}×{width_a}; both inputs need the same size: resize one "
                                    f"with an 'Upscale Image' node (width {width_a}, height {height_a}) first")
        comparison = compare_images(a, b, names=_INPUT_NAMES)
        text = comparison.summary(cap_db=PSNR_CAP_DB)
        logger.info("FastGuidance [compare]: %s", text)
        return io.NodeOutput(comparison.mean_ssim, comparison.mean_psnr(PSNR_CAP_DB), text,
                             ui=ui.PreviewText(text))
