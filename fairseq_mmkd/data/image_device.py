"""Training-image augmentation with the JPEG decode moved from the DataLoader workers to the training device.

On a GPU, decoding JPEGs is what limits the CPU pipeline (about 330 ImageNet-sized JPEGs/s per worker, see
BENCHMARKS.md). With device decoding the workers only read each file's bytes, parse its header and draw
the augmentation (crop box and flip) exactly as the CPU path does; the training process then decodes the
whole batch at once with ``torchvision.io.decode_jpeg`` on the device (nvjpeg on CUDA; libjpeg on CPU,
which the tests use) and applies the crop, the bicubic resize, the flip and the normalisation there.

Same augmentation statistics as the CPU path (``image.train_transform``), by construction:

* The crop box and flip come from the same generator draws in the same order (``sample_seed(index)``),
  on the same image size: a file the CPU path would decode at full size gets the identical box and flip.
* Resize: PIL's bicubic resampling coefficients (Keys' cubic with a = -0.5, support widened by the scale
  when shrinking, kernel renormalised at the borders; the same as ``F.interpolate(mode="bicubic",
  antialias=True)``), applied to the whole batch at once as two batched matrix products on float pixels
  (``resize_crops``); the result is clamped to [0, 255] and rounded as PIL does. PIL computes
  in 8-bit fixed point and rounds and clips between its horizontal and vertical passes; this path does so
  once, so pixels differ from PIL's by at most one grey level but for rare pixels at hard edges (measured:
  mean 0.14 levels, 86% identical, max 3; ``tests/image/test_device_decode.py`` states the tolerance and why).
* Which files take this path: baseline or progressive JPEGs in RGB or greyscale that end with an EOI
  marker and are small enough that the CPU path would not shrink them (shorter side below
  ``2 * min_short_side``: all of ImageNet at 224 px but a few dozen photos) and within ``max_pixels``.
  Everything else (PNG and other formats, CMYK JPEGs, truncated files, huge photos, undecodable headers)
  takes today's CPU path in the worker, unchanged, and unreadable files are replaced and counted as today.
  EXIF orientation is read from the header in the worker and applied on the device before cropping.
* A JPEG that nvjpeg rejects although its header parsed is decoded again with PIL in the training
  process (``fallback``): with the same crop box if PIL reads it, or replaced by the next readable image
  and counted in ``bad_images`` if it is truly corrupt, as the CPU path would.

Nothing here imports fairseq; the task decides when to use it (``task.gpu_decode``).
"""
from __future__ import annotations

import io
import logging
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .transforms import IMAGENET_MEAN, IMAGENET_STD, _pil_pixel_limit_off, random_resized_crop_box

logger = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that transpose the image


def jpeg_ends_with_eoi(data: bytes) -> bool:
    """A complete JPEG ends with the EOI marker (padding zeros and a short trailer of up to 64 bytes allowed);
    a truncated download does not. Truncated files then take the CPU path, which reports them as today."""
    tail = data[-4096:].rstrip(b"\0")[-66:]
    return _EOI in tail


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 from an opened (not decoded) image; 1 when absent or unreadable, as
    ``ImageOps.exif_transpose`` in the CPU path then leaves the image as it is."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to ``[C, H, W]`` pixels, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-1).flip(-2)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:  # transpose
        return pixels.transpose(-1, -2)
    if orientation == 6:  # rotate 270 (90 clockwise)
        return pixels.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return pixels.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:  # rotate 90 (counter-clockwise)
        return pixels.transpose(-1, -2).flip(-2)
    return pixels


def device_decodable_header(data: bytes, min_short_side: int, max_pixels: Optional[int]) -> Optional[tuple]:
    """``(width, height, orientation)`` after orientation when the file can be decoded on the device, else
    ``None`` (the CPU path then takes it, and reports a file it cannot read exactly as today). Reads the
    header only: microseconds, not a decode."""
    if not data.startswith(_JPEG_MAGIC) or not jpeg_ends_with_eoi(data):
        return None
    try:
        with _pil_pixel_limit_off():
            img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        width, height = img.size
        if min(width, height) >= 2 * min_short_side:  # the CPU path would draft/reduce it: keep its geometry
            return None
        if max_pixels is not None and width * height > max_pixels:
            return None
        orientation = exif_orientation(img)
    except Exception:
        return None
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return width, height, orientation


def draw_augmentation(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                      generator: torch.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """Crop box and flip in exactly the CPU path's order of draws (``image.train_crop``)."""
    box = random_resized_crop_box(width, height, scale, ratio, generator)
    flip = torch.rand(1, generator=generator).item() < 0.5
    return box, flip


class EncodedBatch:
    """A training batch whose JPEGs are still encoded: what DataLoader workers send in device-decode mode.

    Not a tensor, dict or list, so fairseq's ``move_to_cuda`` and bf16 conversion leave it alone (nvjpeg
    takes its input from CPU memory). Its tensors travel from the workers through shared memory.

    Attributes:
        size: output side ``S``.
        data: all encoded files of the batch, concatenated (uint8, CPU).
        offsets: ``[K + 1]`` byte offsets of the K encoded files in ``data``.
        boxes: ``[K, 4]`` crop boxes ``(top, left, height, width)`` in oriented pixel coordinates.
        flips, orientations: ``[K]`` horizontal flip and EXIF orientation of each encoded file.
        positions: ``[K]`` their positions in the batch.
        paths_index: ``[K]`` dataset index of each file (for the fallback decode).
        sample_index: ``[K]`` dataset index of the sample each one stands for (for a replacement).
        ready: ``[B - K, 3, S, S]`` uint8 crops the workers already made with the CPU path; at
            ``ready_positions``.
    """

    def __init__(self, size: int, data, offsets, boxes, flips, orientations, positions, paths_index,
                 sample_index, ready, ready_positions):
        self.size = size
        self.data, self.offsets = data, offsets
        self.boxes, self.flips, self.orientations = boxes, flips, orientations
        self.positions, self.paths_index, self.sample_index = positions, paths_index, sample_index
        self.ready, self.ready_positions = ready, ready_positions

    def __len__(self) -> int:
        return len(self.positions) + len(self.ready_positions)

    @property
    def num_encoded(self) -> int:
        return len(self.positions)

    def pin_memory(self):  # called by the DataLoader's pin-memory thread: the ready crops go to the GPU
        self.ready = self.ready.pin_memory()
        return self

    def encoded(self, i: int) -> torch.Tensor:
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])]

    @classmethod
    def collate(cls, samples: Sequence[dict], size: int) -> "EncodedBatch":
        enc = [(pos, s) for pos, s in enumerate(samples) if "jpeg" in s]
        ready = [(pos, s) for pos, s in enumerate(samples) if "jpeg" not in s]
        lengths = [len(s["jpeg"]) for _, s in enc]
        offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = torch.cat([s["jpeg"] for _, s in enc]) if enc else torch.zeros(0, dtype=torch.uint8)
        long = lambda xs: torch.tensor(xs, dtype=torch.long).reshape(-1)  # noqa: E731
        return cls(
            size=size, data=data, offsets=torch.from_numpy(offsets),
            boxes=torch.tensor([s["box"] for _, s in enc], dtype=torch.long).reshape(-1, 4),
            flips=torch.tensor([bool(s["flip"]) for _, s in enc], dtype=torch.bool),
            orientations=long([s["orientation"] for _, s in enc]), positions=long([p for p, _ in enc]),
            paths_index=long([s["path_index"] for _, s in enc]), sample_index=long([s["id"] for _, s in enc]),
            ready=(torch.stack([s["pixels"] for _, s in ready]) if ready
                   else torch.zeros(0, 3, size, size, dtype=torch.uint8)),
            ready_positions=long([p for p, _ in ready]))


def resize_crop(pixels: torch.Tensor, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """Crop ``box`` out of ``[3, H, W]`` uint8 pixels, resize to ``size`` with torch's antialiased bicubic, flip.

    One image at a time (a resize per image): the reference ``resize_crops`` is tested against.
    Returns float pixels in [0, 255], rounded as PIL's 8-bit output is.
    """
    top, left, h, w = (int(v) for v in box)
    crop = pixels[:, top:top + h, left:left + w].unsqueeze(0).float()
    if (h, w) != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        crop = crop.clamp_(0, 255).round_()
    crop = crop[0]
    return crop.flip(-1) if flip else crop


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8-valued ``[B, 3, S, S]`` (any dtype) -> ImageNet-normalised float32, in the CPU path's order."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


def _decode_all(batch: EncodedBatch, device: torch.device) -> list:
    """nvjpeg/libjpeg decode of every encoded file; ``None`` where the decoder rejects one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    inputs = [batch.encoded(i) for i in range(batch.num_encoded)]
    if not inputs:
        return []
    try:
        return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole call: find it
        out = []
        for data in inputs:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


# Crops are resized in chunks whose zero-padded float copy stays under this many elements (1 GiB): a batch of
# ImageNet-sized crops is one chunk; a batch of large photos is split instead of allocating tens of GB.
_RESIZE_CHUNK_ELEMENTS = 2 ** 28
# ... and a chunk of 8 or more crops is closed before zero padding would make it cost more than this many
# times the crops' own pixels (crops are taken smallest first, so similar sizes share a chunk).
_PADDING_WASTE = 1.5


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (Keys, a = -0.5), the one torch's antialiased bicubic uses too."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(lengths: torch.Tensor, size: int, width: int) -> torch.Tensor:
    """``[K, size, width]`` weights of PIL's antialiased bicubic resize from ``lengths[k]`` samples to ``size``.

    The same coefficients as PIL's ``precompute_coeffs``: output sample ``i`` is centred at ``(i + 0.5) *
    scale`` in the input, the kernel is stretched by ``max(scale, 1)`` when shrinking, cut at the input's
    ends (``[0, lengths[k])``), and renormalised to sum to 1. Columns at or beyond ``lengths[k]`` are 0, so
    inputs of different lengths can share one zero-padded tensor.
    """
    lengths = lengths.to(torch.float32).view(-1, 1, 1)
    scale = lengths / size
    stretch = scale.clamp(min=1.0)
    support = 2.0 * stretch
    centre = (torch.arange(size, dtype=torch.float32, device=lengths.device).view(1, -1, 1) + 0.5) * scale
    first = torch.floor(centre - support + 0.5).clamp(min=0)
    last = torch.minimum(torch.floor(centre + support + 0.5), lengths)
    j = torch.arange(width, dtype=torch.float32, device=lengths.device).view(1, 1, -1)
    w = _bicubic((j - centre + 0.5) / stretch) * ((j >= first) & (j < last))
    return w / w.sum(dim=-1, keepdim=True)


def resize_crops(crops: Sequence[torch.Tensor], size: int, flips: Sequence[bool]) -> torch.Tensor:
    """Resize ``[3, h_k, w_k]`` uint8 crops to ``[K, 3, size, size]`` (PIL bicubic), flipping where asked.

    Batched: each chunk of crops is zero-padded into one tensor and resized by two batched matrix products
    with per-crop weight matrices (``resize_weights``; a flip is the horizontal weights reversed), so the cost
    in kernel launches is one copy per crop plus a constant, not a resize per crop. Returns float pixels
    clamped to [0, 255] and rounded, as PIL's 8-bit output is.
    """
    device = crops[0].device
    out = torch.empty(len(crops), 3, size, size, dtype=torch.float32, device=device)
    order = sorted(range(len(crops)), key=lambda k: crops[k].shape[1] * crops[k].shape[2])
    while order:
        chunk, hmax, wmax, area = [], 0, 0, 0
        for k in order:
            h, w = crops[k].shape[1:]
            padded_size = (len(chunk) + 1) * max(hmax, h) * max(wmax, w)
            if chunk and (3 * padded_size > _RESIZE_CHUNK_ELEMENTS  # memory
                          or (len(chunk) >= 8 and padded_size > _PADDING_WASTE * (area + h * w))):  # compute
                break
            chunk.append(k)
            hmax, wmax, area = max(hmax, h), max(wmax, w), area + h * w
        order = order[len(chunk):]
        padded = torch.zeros(len(chunk), 3, hmax, wmax, dtype=torch.float32, device=device)
        for j, k in enumerate(chunk):
            padded[j, :, :crops[k].shape[1], :crops[k].shape[2]].copy_(crops[k])
        heights = torch.tensor([crops[k].shape[1] for k in chunk], device=device)
        widths = torch.tensor([crops[k].shape[2] for k in chunk], device=device)
        wy = resize_weights(heights, size, hmax)
        wx = resize_weights(widths, size, wmax)
        flip = torch.tensor([bool(flips[k]) for k in chunk], device=device).view(-1, 1, 1)
        wx = torch.where(flip, wx.flip(1), wx)
        resized = torch.matmul(torch.matmul(wy.unsqueeze(1), padded), wx.unsqueeze(1).transpose(-1, -2))
        out[torch.tensor(chunk, device=device)] = resized
    return out.clamp_(0, 255).round_()


def decode_batch(batch: EncodedBatch, device, fallback: Callable[[int, int, tuple, bool], tuple[torch.Tensor, int]],
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """The normalised ``[B, 3, S, S]`` training batch on ``device``, and how many files were replaced here.

    Args:
        batch: what the workers sent.
        device: where to decode and augment (the model's device).
        fallback: ``fallback(path_index, sample_index, box, flip) -> (uint8 [3, S, S], num_replaced)``
            for a file the device decoder rejects (``ImageListDataset.fallback_crop``).
        dtype: dtype of the returned batch (the model's).
    """
    device = torch.device(device)
    s = batch.size
    out = torch.empty(len(batch), 3, s, s, dtype=torch.float32, device=device)
    if len(batch.ready_positions):
        out[batch.ready_positions.to(device)] = batch.ready.to(device, non_blocking=True).float()
    boxes, flips = batch.boxes.tolist(), batch.flips.tolist()
    orientations, positions = batch.orientations.tolist(), batch.positions.tolist()
    crops, crop_flips, crop_positions, replaced = [], [], [], 0
    for i, pixels in enumerate(_decode_all(batch, device)):
        top, left, h, w = boxes[i]
        if pixels is not None:
            pixels = orient(pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels, orientations[i])
        if pixels is None or top + h > pixels.shape[1] or left + w > pixels.shape[2]:  # rejected, or the header lied
            crop, n = fallback(int(batch.paths_index[i]), int(batch.sample_index[i]), tuple(boxes[i]), flips[i])
            replaced += n
            out[positions[i]] = crop.to(device).float()
            continue
        crops.append(pixels[:, top:top + h, left:left + w])
        crop_flips.append(flips[i])
        crop_positions.append(positions[i])
    if crops:
        out[torch.tensor(crop_positions, device=device)] = resize_crops(crops, s, crop_flips)
    return normalize(out).to(dtype), replaced


def device_decode_works(device) -> Optional[str]:
    """``None`` when ``decode_jpeg`` runs on ``device`` here, else why not (checked once at start-up)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (10, 200, 30)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        img = decode_jpeg([data], mode=ImageReadMode.RGB, device=torch.device(device))[0]
        if tuple(img.shape) != (3, 8, 16):
            return f"decode_jpeg returned shape {tuple(img.shape)}"
    except Exception as e:  # torchvision without nvjpeg, no image extension, ...
        return f"{type(e).__name__}: {e}"
    return None


__all__ = ["EncodedBatch", "decode_batch", "device_decodable_header", "device_decode_works", "draw_augmentation",
           "exif_orientation", "jpeg_ends_with_eoi", "normalize", "orient", "resize_crop", "resize_crops",
           "resize_weights"]
