"""Compare Images inside the real host: values, broadcasting, refusals, the text shown on the node."""

from __future__ import annotations

import pytest
import torch

NODE = "FastGuidance_CompareImages"


def comfy_images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE: [B, H, W, C] float in [0, 1]."""
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def noisy(images: torch.Tensor, std: float = 0.1, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise).clamp(0, 1)


def shown_text(output) -> str:
    """The text the node sends to the page (``ui``), as the executor serialises it."""
    ui = output.ui.as_dict() if hasattr(output.ui, "as_dict") else output.ui
    (text,) = ui["text"]
    return text


def test_identical_images_score_one_and_the_capped_psnr(host):
    images = comfy_images()
    output = host.call(NODE, images, images.clone())
    ssim, psnr, text = output[0], output[1], output[2]
    assert isinstance(ssim, float) and isinstance(psnr, float) and isinstance(text, str)
    assert ssim == pytest.approx(1.0, abs=1e-6)
    assert psnr == 100.0
    assert text == "SSIM 1.000 · PSNR inf dB (identical) over 2 images"
    assert shown_text(output) == text


def test_noisy_images_score_below_one(host):
    images = comfy_images()
    output = host.call(NODE, images, noisy(images))
    assert 0.0 < output[0] < 1.0
    assert 10.0 < output[1] < 40.0
    assert output[2].startswith("SSIM 0.") and output[2].endswith("dB over 2 images")
    assert shown_text(output) == output[2]


def test_the_host_layout_is_channels_last(host):
    """Only the last dimension is channels: a per-channel change must not look like a spatial one."""
    images = comfy_images(batch=1, height=40, width=24)
    shifted = images.clone()
    shifted[..., 0] = (shifted[..., 0] + 0.1).clamp(max=1)  # red channel only
    output = host.call(NODE, images, shifted)
    assert output[0] < 1.0 and output[2].endswith("over 1 image")


def test_a_single_image_is_compared_with_every_image_of_the_other_batch(host):
    reference = comfy_images(batch=1)
    batch = torch.cat([reference, noisy(reference), noisy(reference, 0.3)])
    broadcast = host.call(NODE, reference, batch)
    one_by_one = [host.call(NODE, reference, batch[i:i + 1]) for i in range(3)]
    assert broadcast[2].endswith("over 3 images (1 identical, counted as 100 dB)")
    assert broadcast[0] == pytest.approx(sum(o[0] for o in one_by_one) / 3, abs=1e-6)
    assert broadcast[1] == pytest.approx(sum(o[1] for o in one_by_one) / 3, abs=1e-4)
    swapped = host.call(NODE, batch, reference)
    assert swapped[0] == pytest.approx(broadcast[0]) and swapped[1] == pytest.approx(broadcast[1])


def test_different_batch_sizes_are_refused_naming_the_inputs(host):
    with pytest.raises(ValueError) as error:  # the pack's InvalidInputError (loaded under ComfyUI's module name)
        host.call(NODE, comfy_images(batch=2), comfy_images(batch=3))
    message = str(error.value)
    assert type(error.value).__name__ == "InvalidInputError"
    assert "image_b" in message and "image_a has 2 images" in message and "single image" in message


def test_different_sizes_are_refused_naming_the_sizes_and_the_fix(host):
    with pytest.raises(ValueError) as error:
        host.call(NODE, comfy_images(height=32, width=32), comfy_images(height=48, width=32))
    message = str(error.value)
    assert "image_b" in message and "48×32" in message and "32×32" in message and "resize" in message


def test_the_node_is_an_output_node_with_tooltips(host):
    schema = host.nodes.NODE_CLASS_MAPPINGS[NODE].GET_SCHEMA()
    assert schema.is_output_node and schema.category == "image/fastguidance"
    assert [o.display_name for o in schema.outputs] == ["ssim", "psnr", "text"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
