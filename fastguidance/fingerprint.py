"""A short identity of a model's weights, stored in calibration, adapter and predictor files.

Files made for one model are refused (or warned about) when used with another. Hashing every
weight of a multi-GB model would take seconds, so the fingerprint hashes every tensor's name,
shape and dtype plus a strided sample of its values: two different checkpoints of one
architecture differ in the sample, a fine-tune too unless it left every sampled value unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

#: values sampled from each tensor
SAMPLES_PER_TENSOR = 8


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """16 hex digits identifying ``named_tensors`` (e.g. ``model.state_dict().items()``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            sample = flat[::stride][:SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float32)
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
