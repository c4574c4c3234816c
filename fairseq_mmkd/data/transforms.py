"""Image transforms shared by the training data (``image.py``), the on-device decoder (``image_device.py``) and
retrieval: ImageNet normalisation, torchvision's RandomResizedCrop box drawn from a generator, and PIL's pixel
limit switched off for one header parse.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # eval: Resize(int(S / 0.875)) + CenterCrop(S)
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_pixel_limit_off():
    """Switch PIL's global decompression-bomb check off for one ``Image.open``; ``max_pixels`` replaces it.

    Only the header parse runs inside, so the switch is held for microseconds; the lock keeps concurrent
    threads of this module from restoring each other's value.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def min_short_side_for_crop(input_size: int, scale: Sequence[float], ratio: Sequence[float]) -> int:
    """Smallest shorter side for which every RandomResizedCrop box still has >= ``input_size`` pixels a side.

    A crop covers area ``s * W * H`` (``s >= scale[0]``) with aspect ``r``; its shorter side is
    ``sqrt(s * W * H * min(r, 1/r)) >= short_side * sqrt(scale[0] * min(r, 1/r))``. Shrinking an image no
    further than this never makes the final resize upsample where the original would not have.
    """
    narrowest = min(ratio[0], 1 / ratio[0], ratio[1], 1 / ratio[1])
    return math.ceil(input_size / math.sqrt(scale[0] * narrowest))


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawing from ``generator`` instead of the global RNG.

    Same draws in the same order, so seeding the global RNG with the generator's seed reproduces it.

    Returns:
        ``(top, left, height, width)`` of the crop.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize(ImageNet mean, std) of an RGB image, in torchvision's arithmetic order."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    x = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)
