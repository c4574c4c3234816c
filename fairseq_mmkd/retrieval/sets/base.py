"""A labelled image set for retrieval evaluation: a memory-bank split and a query split, held in memory.

Images are kept as one uint8 tensor per split (``[N, 3, H, W]``, 150 MB for CIFAR's 50,000 training images)
so that evaluation never decodes or transforms single images in Python: every batch goes to the device as
one slice and is resized and normalised there (``evaluate.preprocess``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .image_preprocess import preprocess_protocol


class RetrievalDataError(ValueError):
    """An evaluation data set that is missing or malformed, with a message saying what was expected."""


@dataclass
class RetrievalSet:
    """Train and test split of a labelled image set.

    The train split is the memory bank and the test split the queries; the inverse direction swaps them.

    Args:
        train_images: uint8 ``[N, 3, H, W]``.
        train_labels: int64 ``[N]`` class indices.
        test_images: uint8 ``[M, 3, H, W]`` (same ``H, W`` as the train split is not required).
        test_labels: int64 ``[M]`` class indices, in the same class numbering as ``train_labels``.
        source: where the images came from and what was done to them before they were stored here (for the
            evaluation protocol record).
    """

    modality = "image"  # what ``protocol`` describes; a text or audio set brings its own class
    default_pooling = "cls"  # what the standalone evaluator embeds unless told otherwise

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str = ""

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                    or images.shape[1] != 3:
                desc = (f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor)
                        else type(images).__name__)
                raise RetrievalDataError(f"{split}_images must be a uint8 tensor [N, 3, H, W], got {desc}")
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
                desc = (f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, torch.Tensor)
                        else type(labels).__name__)
                raise RetrievalDataError(f"{split}_labels must be an int64 tensor [N], got {desc}")
            if len(images) != len(labels):
                raise RetrievalDataError(f"{split}: {len(images)} images but {len(labels)} labels")
            if len(images) == 0:
                raise RetrievalDataError(f"{split}: no images")

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1

    def protocol(self, input_size: int) -> dict:
        """The data side of an evaluation protocol record: splits, sizes, source and how images reach an
        encoder of ``input_size`` (resize, normalisation). JSON-ready."""
        train_hw, test_hw = tuple(self.train_images.shape[-2:]), tuple(self.test_images.shape[-2:])
        record = {"modality": self.modality, "source": self.source,
                  "memory_split": "train", "memory_size": self.num_train,
                  "query_split": "test", "query_size": self.num_test, "num_classes": self.num_classes}
        record.update(preprocess_protocol(train_hw, input_size))
        if test_hw != train_hw:
            record["test_resize_from"] = list(test_hw)
        return record
