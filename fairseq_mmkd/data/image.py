"""Training images for distillation: find them, decode them robustly, augment them as data2vec 2.0 does.

The augmentation is the data2vec 2.0 image pretraining recipe (``MaeImageDataset`` with the
``mae_image_pretraining`` defaults, Baevski et al. 2022, "Efficient Self-supervised Learning with
Contextualized Target Representations for Vision, Speech and Language"): RandomResizedCrop(S, scale=(0.2, 1),
ratio=(3/4, 4/3), bicubic), RandomHorizontalFlip(0.5), ToTensor, Normalize(ImageNet mean/std). Given the
same random draws it is bit-identical to that torchvision pipeline (the tests check this). The eval transform
is Resize(int(S / 0.875), bicubic) + CenterCrop(S).

Differences from a plain ``ImageFolder``, and why:

* Randomness comes from a ``torch.Generator`` seeded from ``(seed, epoch, index)``, not from the global RNG,
  so a sample is the same whatever the number of processes or DataLoader workers. The epoch lives in a
  shared-memory tensor, so persistent DataLoader workers (fairseq reuses its DataLoader across epochs by
  default) see ``set_epoch`` too.
* Real-world files are messy. Every mode PIL decodes is turned into 8-bit RGB correctly (16-bit scaled, not
  clipped; transparency composited on white); EXIF orientation is applied. A file that cannot be decoded is
  replaced by the next readable image, counted, and logged once with its path; too many of them stop
  training with an ``ImageDataError`` that says what to do.
* Huge images are shrunk before augmentation: JPEGs are decoded at 1/2, 1/4 or 1/8 scale with
  ``Image.draft`` (fast, and a 10,000 x 10,000 JPEG never needs 300 MB), then any image is box-reduced by an
  integer factor. The shrink keeps the shorter side at least ``SHRINK_GAP`` (2) times the size at which
  every possible crop still has >= S pixels per side (eval: 2 x the resize target), the margin Pillow's
  own ``thumbnail(reducing_gap=2)`` uses, so the final bicubic resize still does most of the filtering.
  For S = 224 that is a shorter side of 1158 px (train) or 512 px (eval): typical ImageNet photos are not
  touched, the augmentation distribution is unchanged (crop boxes are relative), and on large images the
  eval output moves by ~0.2 grey levels on average (measured on a smooth 2000 x 1500 image).
* PIL's global switches are left as the user set them. Truncated files stay errors
  (``ImageFile.LOAD_TRUNCATED_IMAGES`` is not touched: a truncated JPEG is bad data and is counted as such).
  PIL's decompression-bomb limit is replaced by our own ``max_pixels`` check on the pixels that will
  actually be decoded (after ``draft``), so a 100 MP JPEG loads without a warning; PIL's global is
  switched off only for the duration of ``Image.open``'s header parse, under a lock.

Nothing here imports fairseq; the task wraps ``ImageListDataset`` in a ``FairseqDataset``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .common import BadFiles, SharedEpoch, sample_seed
from .transforms import (
    EVAL_CROP_FRACTION,
    _pil_pixel_limit_off,
    min_short_side_for_crop,
    random_resized_crop_box,
    to_normalized_tensor,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# PIL's own error threshold (2 * its default MAX_IMAGE_PIXELS, ~179 MP), but measured on the pixels actually
# decoded: a 10k x 10k JPEG decodes at 1/8 scale and passes; a 20k x 20k PNG (1.2 GB of RGB) does not.
DEFAULT_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)
# Keep images this many times larger than the final resize needs before shrinking them (see module doc).
SHRINK_GAP = 2.0

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDataError(ValueError):
    """The image data cannot be used for training; the message names the path and the fix."""


class UnreadableImageError(Exception):
    """One image file could not be decoded (the dataset replaces it and counts it)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --------------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------------

def find_images(data: str) -> list[str]:
    """Absolute paths of the training images named by ``data``.

    Runs before training so that a wrong path fails at once, with a message saying what to change.

    Args:
        data: either a folder, searched recursively (ImageFolder layout ``root/class/x.jpg``, class labels
            ignored; images directly in ``root`` count too; extensions ``IMAGE_EXTENSIONS``, any case;
            hidden files and folders such as macOS ``._x.jpg`` are skipped; symlinked folders are followed
            once), or a text file with one image path per line (relative paths are resolved against the
            list file's folder; blank lines and lines starting with ``#`` are skipped; anything after a tab
            is ignored, so ``path<TAB>label`` lists work).

    Returns:
        For a folder, the paths sorted; for a list file, the paths in the file's order. Files are not
        opened here: unreadable ones are counted when loaded.

    Raises:
        ImageDataError: the path is missing, the folder holds no images, or the list file is empty or is
            not a text file.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(data)))
    if not os.path.exists(path):
        what = "is a broken symbolic link" if os.path.islink(path) else "does not exist"
        raise ImageDataError(
            f"image data path {path!r} {what}; set the data path to a folder of images (ImageFolder layout, "
            f"root/<class>/<image>) or to a text file listing one image path per line")
    if os.path.isdir(path):
        return _scan_folder(path)
    return _read_list_file(path)


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_files(root: str, visited: set[str]) -> Iterator[str]:
    """Non-hidden non-folder entries under ``root``, following symlinked folders but never in a cycle."""
    visited.add(os.path.realpath(root))
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        logger.warning("cannot list image folder %s (%s); its images are not used", root, e.strerror or e)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if not is_dir:
            yield entry.path
        elif os.path.realpath(entry.path) not in visited:
            yield from _walk_files(entry.path, visited)


def _scan_folder(root: str) -> list[str]:
    images, others = [], []
    for file_path in _walk_files(root, set()):
        (images if _has_image_extension(file_path) else others).append(file_path)
    if not images:
        found = (f"it holds {len(others)} other file(s), e.g. {others[0]!r}" if others
                 else "it holds no files")
        raise ImageDataError(
            f"no images found under {root!r}: {found}. Looked recursively for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case; hidden files skipped). Point the data path at a folder "
            f"of images (root/<class>/<image>) or at a text file listing one image path per line")
    return sorted(images)


def _read_list_file(list_path: str) -> list[str]:
    if _has_image_extension(list_path):
        raise ImageDataError(
            f"image data path {list_path!r} is a single image; pass the folder that contains the images, or a "
            f"text file listing one image path per line")
    try:
        with open(list_path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except OSError as e:
        raise ImageDataError(f"cannot read image list file {list_path!r} ({e.strerror or e}); check that it "
                             f"exists and is readable") from None
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise ImageDataError(
            f"image data path {list_path!r} is neither a folder nor a UTF-8 text file; pass a folder of images "
            f"or a text file listing one image path per line")
    base = os.path.dirname(list_path)
    paths = []
    for line in text.splitlines():
        entry = line.split("\t", 1)[0].strip()
        if entry and not entry.startswith("#"):
            paths.append(os.path.normpath(os.path.join(base, os.path.expanduser(entry))))
    if not paths:
        raise ImageDataError(
            f"image list file {list_path!r} names no images (it has only blank lines or # comments); write one "
            f"image path per line (relative paths are resolved against {base!r})")
    return paths


# --------------------------------------------------------------------------------------------------------
# Decoding one file
# --------------------------------------------------------------------------------------------------------





def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any decoded PIL image to 8-bit RGB, keeping what the pixels mean.

    * Transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is composited on white, as
      viewers show it; a plain ``convert("RGB")`` would expose whatever colour hides under alpha = 0 (often
      black or garbage). Fully opaque images are unaffected.
    * 16-bit images (``I;16*``, and ``I`` holding values in 0..65535, which is how PIL opens 16-bit PNG,
      TIFF and PGM) are scaled by 255/65535 with rounding; ``convert`` would clip them to 255. ``I`` values
      outside that range and float (``F``) images are scaled from their min..max (``F`` already within
      0..1 is scaled by 255).
    * Everything else (L, 1, P, CMYK, YCbCr, ...) goes through PIL's own ``convert("RGB")``.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):
            return rgba.convert("RGB")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=alpha)
        return background
    return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(arr * 255.0).astype(np.uint8)
        return _min_max_to_uint8(arr, lo, hi)
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 65535:
        return ((arr + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535): 65535 -> 255, 257 * k -> k
    return _min_max_to_uint8(arr, lo, hi)


def _min_max_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_rgb(path: str, min_short_side: Optional[int] = None,
             max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file into an upright, 8-bit RGB PIL image, shrunk if it is much larger than needed.

    The format is read from the content, not the extension (a PNG named ``.jpg`` is fine). Animated images
    give their first frame. The file is closed on return.

    Args:
        path: the image file.
        min_short_side: if given, the shorter side may be shrunk down to (not below) this many pixels:
            JPEGs are decoded at a reduced DCT scale (``Image.draft``), then any image is box-reduced by an
            integer factor. ``None`` keeps the full resolution.
        max_pixels: refuse images that would decode to more pixels than this (after ``draft``), to bound
            memory; ``None`` disables the check.

    Raises:
        UnreadableImageError: the file is missing, unreadable, empty, truncated, not an image, too large,
            or otherwise fails to decode.
    """
    try:
        with open(path, "rb") as f:
            with _pil_pixel_limit_off():
                img = Image.open(f)
            if min_short_side:
                img.draft(None, (min_short_side, min_short_side))  # a no-op for non-JPEG formats
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise UnreadableImageError(
                    path, f"{width}x{height} = {width * height} pixels to decode exceeds max_pixels={max_pixels}")
            img.load()
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception as e:  # a broken EXIF block does not make the pixels bad
                logger.debug("ignoring unreadable EXIF orientation of %s (%s)", path, e)
        img = to_rgb8(img)
    except (UnreadableImageError, MemoryError):
        raise
    except Exception as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UnreadableImageError(path, f"{type(e).__name__}: {reason}") from e
    if min_short_side:
        factor = min(img.size) // min_short_side
        if factor >= 2:
            img = img.reduce(factor)
    return img


# --------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------





def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` uint8 pixels of an RGB image (what device decoding normalises on the device)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def crop_resize_flip(img: Image.Image, box: Sequence[int], input_size: int, flip: bool) -> Image.Image:
    """Crop ``box = (top, left, height, width)``, resize to ``input_size`` (PIL bicubic), flip if asked."""
    top, left, h, w = box
    img = img.crop((left, top, left + w, top + h)).resize((input_size, input_size), Image.Resampling.BICUBIC)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def train_crop(img: Image.Image, input_size: int, generator: torch.Generator,
               scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Image.Image:
    """RandomResizedCrop (bicubic) and horizontal flip p=0.5 of ``train_transform``, before normalisation."""
    box = random_resized_crop_box(img.width, img.height, scale, ratio, generator)
    return crop_resize_flip(img, box, input_size, torch.rand(1, generator=generator).item() < 0.5)


def train_transform(img: Image.Image, input_size: int, generator: torch.Generator,
                    scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """data2vec 2.0 pretraining augmentation: RandomResizedCrop (bicubic), horizontal flip p=0.5, normalise.

    Crop and resize run in PIL on uint8 pixels; the tensor is made once, at ``input_size``.
    """
    return to_normalized_tensor(train_crop(img, input_size, generator, scale, ratio))


def eval_transform(img: Image.Image, input_size: int) -> torch.Tensor:
    """Resize the shorter side to ``int(input_size / 0.875)`` (bicubic), centre-crop ``input_size``, normalise."""
    return to_normalized_tensor(eval_crop(img, input_size))


def eval_crop(img: Image.Image, input_size: int) -> Image.Image:
    """The eval transform's pixels: shorter side resized to ``int(input_size / 0.875)`` (bicubic), centre crop."""
    resize_to = int(input_size / EVAL_CROP_FRACTION)
    w, h = img.size
    if w <= h:
        new_w, new_h = resize_to, int(resize_to * h / w)
    else:
        new_w, new_h = int(resize_to * w / h), resize_to
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - input_size) / 2.0))
    left = int(round((new_w - input_size) / 2.0))
    return img.crop((left, top, left + input_size, top + input_size))


def load_eval_crops(paths: Sequence[str], input_size: int, workers: Optional[int] = None) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]``: each image as the eval transform crops it (before normalisation), decoded by a thread
    per core (PIL decodes outside the GIL); an unreadable file is an ``ImageDataError`` naming it."""
    from concurrent.futures import ThreadPoolExecutor

    shorter = int(input_size / EVAL_CROP_FRACTION)

    def load(path):
        try:
            return to_uint8_tensor(eval_crop(load_rgb(path, shorter), input_size))
        except UnreadableImageError as e:
            raise ImageDataError(f"validation image {path} cannot be read ({e.reason}); fix or remove its pairs")

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(16, workers or cores))) as pool:
        return torch.stack(list(pool.map(load, paths)))


# --------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------

class _PathTable:
    """Paths packed into two numpy arrays.

    A Python list of a million ``str`` is copied page by page into every forked DataLoader worker as
    reference counts are touched (the "copy-on-read" growth fairseq's audio datasets avoid the same way);
    numpy buffers are never written, so workers keep sharing them.
    """

    def __init__(self, paths: Sequence[str]):
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._bytes[self._offsets[i]:self._offsets[i + 1]].tobytes())


def collate(samples: Sequence[dict]) -> dict:
    """Batch samples of ``ImageListDataset``.

    Returns:
        ``{"id": LongTensor[B], "net_input": {"source": FloatTensor[B, 3, S, S]}, "nsamples": B,
        "num_replaced": number of unreadable files skipped to build the batch}`` (the task logs the last as
        a metric, since the per-file counters live in the DataLoader workers); ``{}`` for no samples.
    """
    if len(samples) == 0:
        return {}
    return {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "net_input": {"source": torch.stack([s["source"] for s in samples])},
        "nsamples": len(samples),
        "num_replaced": int(sum(s.get("num_replaced", 0) for s in samples)),
    }


class ImageListDataset(torch.utils.data.Dataset):
    """Images from a list of paths, augmented as data2vec 2.0 pretraining, robust to bad files.

    ``dataset[i]`` is ``{"id": i, "source": FloatTensor[3, S, S], "num_replaced": k}``: if image ``i`` cannot
    be decoded, the next readable image (``i + 1``, ``i + 2``, ... wrapping around) is used instead, ``k``
    counts the files skipped, and each bad path is logged once (a ``logging`` warning). The augmentation
    draws from a generator seeded by ``(seed, epoch, i)``, so the sample does not depend on which process
    computes it.

    Counters (``num_bad``, ``num_attempts``, ``bad_paths``; ``data.common.BadFiles``) are per process; with
    DataLoader workers they live in the workers, which is why each sample carries ``num_replaced``. Too many
    unreadable files (more than ``max_bad_fraction``, see ``BadFiles``) raise ``ImageDataError``.

    Args:
        paths: image files, e.g. from ``find_images``.
        input_size: side ``S`` of the square output.
        train: data2vec 2.0 pretraining augmentation if true, else resize + centre crop.
        scale: RandomResizedCrop area range (fraction of the image).
        ratio: RandomResizedCrop aspect-ratio range.
        max_bad_fraction: largest tolerated fraction of unreadable images (0 stops at the first one).
        seed: base seed of the augmentation.
        max_pixels: images that would decode to more pixels are treated as unreadable (memory guard).
        device_decode: training samples of JPEGs the device can decode carry the file's bytes, crop box
            and flip instead of pixels, and the collater returns an ``EncodedBatch`` in
            ``net_input["source"]`` that ``image_device.decode_batch`` turns into the batch on the GPU
            (see that module); other files are decoded here as usual. Eval samples are unaffected.
    """

    def __init__(self, paths: Sequence[str], input_size: int = 224, train: bool = True,
                 scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 max_bad_fraction: float = 0.01, seed: int = 1, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 device_decode: bool = False):
        if len(paths) == 0:
            raise ImageDataError("ImageListDataset needs at least one image path; check the data path")
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.bad = BadFiles(len(paths), max_bad_fraction, "image", ImageDataError, "max_bad_fraction")
        self._paths = paths if isinstance(paths, _PathTable) else _PathTable(paths)  # a table is shared as is
        self.input_size = int(input_size)
        self.train = bool(train)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.max_bad_fraction = float(max_bad_fraction)
        self.seed = int(seed)
        self.max_pixels = max_pixels
        self.device_decode = bool(device_decode) and self.train
        needed = (min_short_side_for_crop(self.input_size, self.scale, self.ratio) if self.train
                  else int(self.input_size / EVAL_CROP_FRACTION))
        self.min_short_side = math.ceil(SHRINK_GAP * needed)  # decode / shrink no further than this
        self._epoch = SharedEpoch()

    @property
    def bad_paths(self) -> set:
        return self.bad.paths

    @property
    def num_bad(self) -> int:
        return self.bad.num_bad

    @property
    def num_attempts(self) -> int:
        return self.bad.num_attempts

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """The file behind ``index`` (before any replacement)."""
        return self._paths[index]

    @property
    def epoch(self) -> int:
        return self._epoch.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``; seen by DataLoader workers, persistent ones too."""
        self._epoch.set_epoch(epoch)

    def sample_seed(self, index: int, epoch: Optional[int] = None) -> int:
        """The generator seed of sample ``index`` in ``epoch`` (default: the current epoch)."""
        return sample_seed(self.seed, self.epoch if epoch is None else int(epoch), int(index))

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return self._load(index, first=0, pixels_only=self.device_decode, encode=self.device_decode)

    def _load(self, index: int, first: int, pixels_only: bool, encode: bool) -> dict:
        """Sample ``index`` from the first readable file at ``index + first``, ``index + first + 1``, ...;
        ``encode``: a device-decodable JPEG as its bytes; ``pixels_only``: other files as uint8 pixels."""
        n = len(self)
        for skipped in range(first, n):
            path_index = (index + skipped) % n
            path = self._paths[path_index]
            if path in self.bad_paths:
                self.bad.failed(path, None)
                continue
            if encode:
                encoded = self._encoded_jpeg(path, index)
                if encoded is not None:
                    self.bad.ok()
                    return {"id": index, "num_replaced": skipped, "path_index": path_index, **encoded}
            try:
                img = load_rgb(path, self.min_short_side, self.max_pixels)
            except UnreadableImageError as e:
                self.bad.failed(path, e.reason)
                continue
            self.bad.ok()
            if self.train:
                generator = torch.Generator().manual_seed(self.sample_seed(index))
                crop = train_crop(img, self.input_size, generator, self.scale, self.ratio)
                if pixels_only:
                    return {"id": index, "pixels": to_uint8_tensor(crop), "num_replaced": skipped}
                source = to_normalized_tensor(crop)
            else:
                source = eval_transform(img, self.input_size)
            return {"id": index, "source": source, "num_replaced": skipped}
        raise ImageDataError(
            f"none of the {n} images could be decoded, e.g. {sorted(self.bad_paths)[:3]}; check the data path "
            f"and that the files are images")

    def _encoded_jpeg(self, path: str, index: int) -> Optional[dict]:
        """The file's bytes with its crop box and flip when the device can decode it, else ``None``."""
        from .image_device import device_decodable_header, draw_augmentation

        try:
            with open(path, "rb") as f:
                if f.read(3) != b"\xff\xd8\xff":
                    return None
                data = b"\xff\xd8\xff" + f.read()
        except OSError:
            return None  # the CPU path reports it
        header = device_decodable_header(data, self.min_short_side, self.max_pixels)
        if header is None:
            return None
        width, height, orientation = header
        generator = torch.Generator().manual_seed(self.sample_seed(index))
        box, flip = draw_augmentation(width, height, self.scale, self.ratio, generator)
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "box": box, "flip": flip,
                "orientation": orientation}

    def fallback_crop(self, path_index: int, sample_index: int, box: Sequence[int], flip: bool) -> tuple:
        """For a JPEG the device decoder rejected: decode it with PIL here and apply the same box and flip, or,
        if it is unreadable, count it and use the next readable image as ``dataset[sample_index]`` would.

        Returns:
            ``(uint8 [3, S, S], number of files replaced beyond those the worker already counted)``.
        """
        n = len(self)
        path = self._paths[path_index]
        try:
            img = load_rgb(path, self.min_short_side, self.max_pixels)
            top, left, h, w = box
            if top + h <= img.height and left + w <= img.width:
                return to_uint8_tensor(crop_resize_flip(img, box, self.input_size, flip)), 0
            raise UnreadableImageError(path, f"decoded size {img.size} differs from its header's")
        except UnreadableImageError as e:
            self.bad.failed(path, e.reason)
        already = (path_index - sample_index) % n
        item = self._load(sample_index, first=already + 1, pixels_only=True, encode=False)
        return item["pixels"], item["num_replaced"] - already

    def record_device_decodes(self, count: int) -> None:
        """Count images decoded on the device as load attempts, so that the unreadable fraction measured in
        the training process (``fallback_crop``) has the right denominator."""
        self.bad.num_attempts += int(count)

    def collater(self, samples: Sequence[dict]) -> dict:
        if not self.device_decode or len(samples) == 0:
            return collate(samples)
        from .image_device import EncodedBatch

        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "net_input": {"source": EncodedBatch.collate(samples, self.input_size)},
            "nsamples": len(samples),
            "num_replaced": int(sum(s.get("num_replaced", 0) for s in samples)),
        }


def probe_images(paths: Sequence[str], n: int = 8, max_failed_fraction: float = 0.5,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> list[tuple[str, str]]:
    """Decode a few images spread over ``paths`` (the first included) before training starts.

    Catches a data path full of non-images in a second instead of after DataLoader start-up. Decoding is at
    reduced scale, so it is cheap even for large JPEGs; truncation is still detected.

    Args:
        paths: image files, e.g. from ``find_images``.
        n: how many to decode.
        max_failed_fraction: raise if more than this fraction of the probed files fail.
        max_pixels: as in ``load_rgb``.

    Returns:
        ``(path, reason)`` of each probed file that failed (also logged as warnings).

    Raises:
        ImageDataError: too many probed files failed; the message lists them.
    """
    if len(paths) == 0:
        raise ImageDataError("no image paths to probe; check the data path")
    picks = sorted({int(round(i)) for i in np.linspace(0, len(paths) - 1, min(n, len(paths)))})
    failures = []
    for i in picks:
        try:
            load_rgb(paths[i], min_short_side=32, max_pixels=max_pixels)
        except UnreadableImageError as e:
            failures.append((paths[i], e.reason))
    for path, reason in failures:
        logger.warning("probe: cannot decode image %s (%s)", path, reason)
    if len(failures) > max_failed_fraction * len(picks):
        listed = "; ".join(f"{p} ({r})" for p, r in failures[:5])
        raise ImageDataError(
            f"{len(failures)} of {len(picks)} probed images cannot be decoded: {listed}. Check that the data path "
            f"points at real image files (not placeholders, Git LFS pointers or partial downloads)")
    return failures
