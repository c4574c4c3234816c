"""CIFAR-10 and CIFAR-100 read straight from their python pickles into uint8 tensors.

The files are the "python version" archives (what ``torchvision.datasets.CIFAR10/100(download=True)``
extracts). torchvision's dataset classes are not used for reading: they checksum every file on each
construction and hand out one PIL image per ``__getitem__``, while evaluation wants all images as one tensor
it can slice into device batches. The pickles are opened with an unpickler that only rebuilds numpy arrays,
so a tampered data file cannot run code.

``write_cifar`` writes the same layout from arrays; tests use it to build tiny data sets in the real format.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .base import RetrievalDataError, RetrievalSet

PREPARE_HINT = "download it with `python scripts/prepare_data.py --cifar DIR` and pass that DIR"


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its splits, relative to the root directory."""

    title: str
    folder: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    meta_file: str
    label_key: str
    num_classes: int

    def describe(self) -> str:
        train = (f"{self.train_files[0][:-1]}1..{len(self.train_files)}" if len(self.train_files) > 1
                 else self.train_files[0])
        return f"<root>/{self.folder}/{train}, {', '.join(self.test_files)}"


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           ("test_batch",), "batches.meta", "labels", 10),
    "cifar100": CifarLayout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", 100),
}

_IMAGE_BYTES = 3 * 32 * 32


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and plain values only; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not part of a CIFAR file)")
        if module == "numpy.core.multiarray":  # files from numpy 1.x; numpy 2 keeps these in numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _layout(name: str) -> CifarLayout:
    try:
        return CIFAR_LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_LAYOUTS)}") from None


def _data_dir(root, layout: CifarLayout) -> Path:
    """``root/<folder>``; the folder itself is accepted too, since users often pass it."""
    root = Path(root)
    if not (root / layout.folder).is_dir() and root.name == layout.folder and root.is_dir():
        return root
    return root / layout.folder


def _read_batch(path: Path, layout: CifarLayout) -> Tuple[np.ndarray, np.ndarray]:
    """One pickle file -> (uint8 ``[n, 3072]`` rows, int64 ``[n]`` labels), validated."""
    where = f"expected the {layout.title} python layout {layout.describe()}; {PREPARE_HINT}"
    if not path.is_file():
        raise RetrievalDataError(f"{path}: file not found; {where}")
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # truncated, not a pickle, refused global, ...
        raise RetrievalDataError(f"{path}: not a readable {layout.title} pickle ({type(e).__name__}: {e}); "
                                 f"{where}") from None
    if not isinstance(entry, dict):
        raise RetrievalDataError(f"{path}: expected a pickled dict, found {type(entry).__name__}; {where}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or layout.label_key not in entry:
        raise RetrievalDataError(f"{path}: expected keys 'data' and {layout.label_key!r}, found "
                                 f"{sorted(map(str, entry))}; {where}")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _IMAGE_BYTES:
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise RetrievalDataError(f"{path}: 'data' must be uint8 [N, {_IMAGE_BYTES}], found {desc}; {where}")
    try:
        labels = np.asarray(entry[layout.label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise RetrievalDataError(f"{path}: {layout.label_key!r} is not a list of integers; {where}") from None
    if len(labels) != len(data):
        raise RetrievalDataError(f"{path}: {len(data)} images but {len(labels)} labels; {where}")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise RetrievalDataError(f"{path}: labels outside 0..{layout.num_classes - 1} "
                                 f"(found {labels.min()}..{labels.max()}); is this the right CIFAR variant?")
    return data, labels


def _read_split(data_dir: Path, files: Sequence[str], layout: CifarLayout,
                limit: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    datas, labels, count = [], [], 0
    for name in files:
        if limit is not None and count >= limit:
            break  # the later batches are not needed (nor checked) for a capped split
        data, lab = _read_batch(data_dir / name, layout)
        datas.append(data)
        labels.append(lab)
        count += len(data)
    data, lab = np.concatenate(datas)[:limit], np.concatenate(labels)[:limit]
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(lab.copy())


def load_cifar(root, name: str, limit: Optional[int] = None) -> RetrievalSet:
    """Load CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) into memory.

    Args:
        root: directory holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (the folder itself is
            accepted too).
        name: ``"cifar10"`` or ``"cifar100"``.
        limit: keep only the first ``limit`` images of each split (quick runs, tests).

    Returns:
        A ``RetrievalSet`` with uint8 ``[N, 3, 32, 32]`` images and int64 labels.

    Raises:
        RetrievalDataError: a file is missing or malformed; the message names the expected layout.
    """
    layout = _layout(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    data_dir = _data_dir(root, layout)
    if not data_dir.is_dir():
        raise RetrievalDataError(f"{data_dir}: directory not found; expected the {layout.title} python layout "
                                 f"{layout.describe()} under {root}; {PREPARE_HINT}")
    train = _read_split(data_dir, layout.train_files, layout, limit)
    test = _read_split(data_dir, layout.test_files, layout, limit)
    source = (f"{layout.title} python pickles in {data_dir.resolve()}, 32x32 as stored"
              + (f", first {limit} images of each split" if limit is not None else ""))
    return RetrievalSet(*train, *test, source=source)


def _rows(images, labels, split: str) -> Tuple[np.ndarray, list]:
    images = np.asarray(images.numpy() if isinstance(images, torch.Tensor) else images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{split} images must be uint8 [N, 32, 32, 3] (NHWC), got {images.dtype} "
                         f"{list(images.shape)}")
    labels = [int(x) for x in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    if len(labels) != len(images):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), _IMAGE_BYTES)), labels


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the published files (pickled by Python 2)


def cifar_class_names(root, name: str) -> list:
    """The class names of a CIFAR folder's meta file (``batches.meta`` ``label_names``; ``meta``
    ``fine_label_names``), underscores as spaces ("aquarium_fish" -> "aquarium fish", as CLIP's prompts write them)."""
    layout = _layout(name)
    path = Path(root) / layout.folder / layout.meta_file
    key = "label_names" if name == "cifar10" else "fine_label_names"
    try:
        with open(path, "rb") as f:
            meta = _ArrayUnpickler(f, encoding="latin1").load()
        meta = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in meta.items()}
        names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[key]]
    except (OSError, KeyError, AttributeError, pickle.UnpicklingError, EOFError) as e:
        raise RetrievalDataError(f"{path}: cannot read the class names ({type(e).__name__}: {e}); zero-shot "
                                 f"classification reads them from {layout.title}'s meta file") from None
    if len(names) != layout.num_classes:
        raise RetrievalDataError(f"{path}: {len(names)} class names, {layout.title} has {layout.num_classes}")
    return [n.replace("_", " ") for n in names]


def write_cifar(root, name: str, train_images, train_labels, test_images, test_labels,
                class_names=None) -> Path:
    """Write images in the CIFAR python layout that ``load_cifar`` and torchvision read.

    CIFAR-10 gets ``cifar-10-batches-py/data_batch_1..5`` (the train split cut into five parts),
    ``test_batch`` and ``batches.meta``; CIFAR-100 gets ``cifar-100-python/train``, ``test`` and ``meta``.
    Each file is a protocol-2 pickle of a dict: ``data`` (uint8 ``[n, 3072]``, each row the red, green,
    then blue 32x32 plane), ``labels`` (CIFAR-10) or ``fine_labels`` and ``coarse_labels`` (CIFAR-100), and
    ``batch_label``/``filenames`` like the originals. Keys are ``str``: the published files were pickled by
    Python 2, whose ``str`` keys load as ``str`` with ``encoding="latin1"`` (how torchvision reads them).

    Args:
        root: directory to create the variant's folder in.
        name: ``"cifar10"`` or ``"cifar100"``.
        train_images: uint8 ``[N, 32, 32, 3]`` (NHWC, numpy or torch).
        train_labels: ``N`` integer classes.
        test_images: uint8 ``[M, 32, 32, 3]``.
        test_labels: ``M`` integer classes.
        class_names: the meta file's class names (default ``class_0``, ...).

    Returns:
        The folder written (``root/cifar-10-batches-py`` or ``root/cifar-100-python``).
    """
    layout = _layout(name)
    train_rows, train_lab = _rows(train_images, train_labels, "train")
    test_rows, test_lab = _rows(test_images, test_labels, "test")
    out = Path(root) / layout.folder
    out.mkdir(parents=True, exist_ok=True)

    def entry(rows, labels, batch_label):
        files = [f"image_{batch_label.replace(' ', '_')}_{i}.png" for i in range(len(rows))]
        if name == "cifar10":
            return {"batch_label": batch_label, "labels": labels, "data": rows, "filenames": files}
        # Placeholder superclasses: nothing here reads them (real CIFAR-100 groups are not label // 5).
        return {"filenames": files, "batch_label": batch_label, "fine_labels": labels,
                "coarse_labels": [x // 5 for x in labels], "data": rows}

    if name == "cifar10":
        bounds = np.linspace(0, len(train_rows), len(layout.train_files) + 1).astype(int)
        for i, file in enumerate(layout.train_files):
            lo, hi = bounds[i], bounds[i + 1]
            _dump(out / file, entry(train_rows[lo:hi], train_lab[lo:hi], f"training batch {i + 1} of 5"))
        _dump(out / "test_batch", entry(test_rows, test_lab, "testing batch 1 of 1"))
        _dump(out / layout.meta_file, {"num_cases_per_batch": int(bounds[1]), "num_vis": _IMAGE_BYTES,
                                       "label_names": list(class_names or [f"class_{i}" for i in range(10)])})
    else:
        _dump(out / "train", entry(train_rows, train_lab, "training batch 1 of 1"))
        _dump(out / "test", entry(test_rows, test_lab, "testing batch 1 of 1"))
        _dump(out / layout.meta_file, {"fine_label_names": list(class_names or [f"class_{i}" for i in range(100)]),
                                       "coarse_label_names": [f"superclass_{i}" for i in range(20)]})
    return out
