"""Image-caption pairs in the two formats image-text research code reads.

* The ALBEF/BLIP JSON list: ``[{"image": "path/relative/to/image_root.jpg", "caption": "a dog" | ["a dog", ...],
  ...}, ...]``. An image may appear in several entries (ALBEF's COCO training file has one entry per caption);
  its captions are gathered. The file is one split.
* Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``{"images": [{"filepath": "val2014",
  "filename": "COCO_val2014_000000391895.jpg", "split": "train" | "restval" | "val" | "test",
  "sentences": [{"raw": "A man with a red helmet ..."}, ...]}, ...]}``; ``filepath`` is absent in Flickr30k's.
  Training reads ``train`` and ``restval`` (the usual 113k COCO images), validation one named split.

Image paths are relative to ``image_root``, by default the folder holding the file. Every problem the user can fix
(a missing file or folder, an unknown format, an empty split, missing images, an empty caption) is one
``PairsError`` naming it, raised before any training starts. Nothing here imports fairseq.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

TRAIN_SPLITS = ("train", "restval")  # Karpathy's: restval is the rest of COCO's val2014, trained on by convention


class PairsError(ValueError):
    """Pairs that cannot be used; the message names the file and the fix."""


@dataclass
class Pairs:
    """Images with their captions: caption ``j`` belongs to image ``caption_image[j]``."""

    images: list
    captions: list
    caption_image: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def captions_of(self, i: int) -> list:
        return [int(j) for j in np.flatnonzero(self.caption_image == i)]

    @property
    def name(self) -> str:
        """The set's name in metric names: the file's stem (``coco_karpathy_test.json`` -> ``coco_karpathy_test``)."""
        return os.path.splitext(os.path.basename(self.source))[0] or "pairs"


def _read_json(path: str):
    if not os.path.isfile(path):
        raise PairsError(f"image-caption file {path} does not exist; pass a JSON list of pairs (ALBEF/BLIP) or "
                         "Karpathy's dataset_coco.json / dataset_flickr30k.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PairsError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None


def _captions(value, where: str) -> list:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(c, str) for c in values):
        raise PairsError(f"{where}: the caption must be a string or a non-empty list of strings, got {value!r}")
    for c in values:
        if not c.strip():
            raise PairsError(f"{where}: an empty caption; remove it or write its text")
    return [c.strip() for c in values]


def _from_list(data: list, path: str) -> dict:
    grouped: dict = {}
    for i, item in enumerate(data):
        where = f"{path}, entry {i}"
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise PairsError(f"{where}: expected {{\"image\": path, \"caption\": text or [texts]}}, got "
                             f"{str(item)[:120]}")
        grouped.setdefault(str(item["image"]), []).extend(_captions(item["caption"], where))
    return grouped


def _from_karpathy(data: dict, path: str, splits: Sequence[str]) -> dict:
    images = data.get("images")
    if not isinstance(images, list):
        raise PairsError(f"{path}: a Karpathy file has a list under \"images\"")
    found = sorted({str(im.get("split")) for im in images if isinstance(im, dict)})
    grouped: dict = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or im.get("split") not in splits:
            continue
        where = f"{path}, image {i}"
        if "filename" not in im or not isinstance(im.get("sentences"), list):
            raise PairsError(f"{where}: expected \"filename\" and a list of \"sentences\" with \"raw\" texts")
        rel = os.path.join(str(im.get("filepath") or ""), str(im["filename"]))
        raws = [s.get("raw") if isinstance(s, dict) else None for s in im["sentences"]]
        grouped.setdefault(rel, []).extend(_captions(raws, where))
    if not grouped:
        raise PairsError(f"{path} has no images in split {'/'.join(splits)}; its splits are {', '.join(found)} "
                         "(task.valid_split names the validation split)")
    return grouped


def read_pairs(path, image_root: Optional[str] = None, splits: Optional[Sequence[str]] = None,
               check_files: bool = True) -> Pairs:
    """The pairs of ``path`` (either format), with image paths under ``image_root`` (default: the file's folder).

    Args:
        splits: Karpathy splits to read (training: ``TRAIN_SPLITS``); ignored for the JSON list, which is one split.
        check_files: every image file must exist (all are checked with one ``stat`` each; the error names the first
            missing ones and how many there are).
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    data = _read_json(path)
    if isinstance(data, list):
        grouped = _from_list(data, path)
    elif isinstance(data, dict) and "images" in data:
        grouped = _from_karpathy(data, path, tuple(splits or TRAIN_SPLITS))
    else:
        raise PairsError(f"{path} is neither a JSON list of {{\"image\", \"caption\"}} pairs (ALBEF/BLIP) nor a "
                         "Karpathy file ({\"images\": [...]})")
    if not grouped:
        raise PairsError(f"{path} holds no pairs")
    root = os.path.abspath(os.path.expanduser(image_root)) if image_root else os.path.dirname(path)
    if not os.path.isdir(root):
        raise PairsError(f"image root {root} is not a folder; set task.image_root to the folder the image paths of "
                         f"{os.path.basename(path)} are relative to")
    images, captions, owner = [], [], []
    for i, (rel, caps) in enumerate(grouped.items()):
        images.append(os.path.join(root, rel))
        captions.extend(caps)
        owner.extend([i] * len(caps))
    if check_files:
        missing = [p for p in images if not os.path.isfile(p)]
        if missing:
            raise PairsError(f"{len(missing)} of the {len(images)} images of {path} are missing under {root}, e.g. "
                             f"{', '.join(missing[:3])}; check task.image_root")
    return Pairs(images, captions, np.asarray(owner, dtype=np.int64), path)
