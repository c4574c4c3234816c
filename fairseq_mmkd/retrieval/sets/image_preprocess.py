"""Image side of retrieval evaluation: uint8 images -> the encoder's normalised input, and its description.

Kept apart from ``evaluate.py`` (which sees only feature functions and embeddings) so that an image set can say
how its images reach the model (``RetrievalSet.protocol``) and another modality can bring its own module.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _shrinks(stored: Sequence[int], input_size: int) -> bool:
    return stored[0] > input_size or stored[1] > input_size


def preprocess(images: torch.Tensor, input_size: int, device) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, S, S]`` on ``device``, resized and ImageNet-normalised.

    The whole batch is converted and resized on the device; no per-image Python or PIL work. Resizing is
    bicubic. Upsampling (CIFAR's 32 -> 224) uses ``antialias=False``: antialiasing only matters when
    shrinking, and without it torch uses its standard bicubic kernel (a = -0.75, like torchvision's tensor
    ``Resize``), which differs from PIL's bicubic (a = -0.5) by a small interpolation detail. Shrinking
    (larger custom images) uses ``antialias=True`` to avoid aliasing. The result is clamped to the valid
    pixel range, as a uint8 resize would be, before normalisation.
    """
    x = images.to(device, non_blocking=True).float().div_(255.0)
    height, width = x.shape[-2:]
    if (height, width) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False,
                          antialias=_shrinks((height, width), input_size)).clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_protocol(stored: Sequence[int], input_size: int) -> dict:
    """What ``preprocess`` does to ``stored`` = (H, W) images for an encoder of ``input_size``, as recorded in
    evaluation protocols (JSON-ready)."""
    height, width = int(stored[0]), int(stored[1])
    resized = (height, width) != (input_size, input_size)
    return {
        "resize_method": "bicubic" if resized else "none",
        "resize_from": [height, width],
        "resize_to": [int(input_size), int(input_size)],
        "resize_antialias": bool(resized and _shrinks(stored, input_size)),
        "resize_implementation": ("torch.nn.functional.interpolate(mode='bicubic', align_corners=False) on the "
                                  "device, clamped to [0, 1]" if resized else "none"),
        "crop": "none",
        "pixel_scale": "1/255",
        "normalization_mean": list(IMAGENET_MEAN),
        "normalization_std": list(IMAGENET_STD),
    }
