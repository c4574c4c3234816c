"""A user-supplied labelled image set: ``<root>/train/<class>/*.jpg`` and ``<root>/test/<class>/*.jpg``.

Images are decoded once, at load time, and stored at one fixed square size (resize the short side, centre
crop) so each split is a single uint8 tensor like CIFAR's; evaluation then resizes on the device to the
model's input size. Class indices come from the sorted union of the class folder names of both splits, so
the same folder name means the same class in either direction of retrieval.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import RetrievalDataError, RetrievalSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LAYOUT = "<root>/train/<class>/<image>, <root>/test/<class>/<image>"


def _class_dirs(split_dir: Path) -> List[Path]:
    if not split_dir.is_dir():
        raise RetrievalDataError(f"{split_dir}: directory not found; expected the labelled image-folder layout "
                                 f"{LAYOUT}")
    dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise RetrievalDataError(f"{split_dir}: has no class folders; expected {LAYOUT}")
    return dirs


def _files(class_dirs: List[Path], class_index: dict, limit: Optional[int]) -> List[Tuple[Path, int]]:
    files = [(p, class_index[d.name]) for d in class_dirs for p in sorted(d.rglob("*"))
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise RetrievalDataError(f"{class_dirs[0].parent}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                                 f"folders; expected {LAYOUT}")
    if limit is not None and limit < len(files):
        # Evenly spaced rather than the first `limit`, which would be the first few classes only.
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


def _decode(path: Path, image_size: int) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            img = ImageOps.fit(img.convert("RGB"), (image_size, image_size), method=Image.Resampling.BICUBIC)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise RetrievalDataError(f"{path}: cannot be decoded as an image ({e})") from None


def folder_set_name(root) -> str:
    """The metric prefix of a labelled folder: its name with anything but letters, digits and '_' as '_'."""
    name = os.path.basename(os.path.normpath(os.path.expanduser(str(root))))
    return re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "custom"


def load_image_folder_pair(root, image_size: int = 224, limit: Optional[int] = None) -> RetrievalSet:
    """Load ``root/train`` (memory bank) and ``root/test`` (queries), one class per subfolder.

    Args:
        root: directory with ``train/`` and ``test/``, each holding one folder per class.
        image_size: every image is resized (short side) and centre-cropped to ``image_size`` squared;
            the model's input size avoids a second resize (memory: 150 KB per image at 224).
        limit: keep at most ``limit`` images per split, evenly spaced over the sorted file list.

    Returns:
        A ``RetrievalSet`` with uint8 ``[N, 3, image_size, image_size]`` images.
    """
    root = Path(root)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    train_dirs, test_dirs = _class_dirs(root / "train"), _class_dirs(root / "test")
    classes = sorted({d.name for d in train_dirs} | {d.name for d in test_dirs})
    class_index = {name: i for i, name in enumerate(classes)}
    splits = []
    for dirs in (train_dirs, test_dirs):
        files = _files(dirs, class_index, limit)
        images = torch.stack([_decode(path, image_size) for path, _ in files])
        labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        splits += [images, labels]
    source = (f"image folders {root.resolve()}/train and /test, decoded with PIL and fitted to "
              f"{image_size}x{image_size} (ImageOps.fit: centre crop to a square, bicubic resize)"
              + (f", {limit} images per split, evenly spaced" if limit is not None else ""))
    return RetrievalSet(*splits, source=source)
