"""A labelled text set as RoBERTa's GLUE preprocessing writes it, read as fairseq's ``sentence_prediction`` reads it.

Layout (``fairseq-preprocess --only-source`` run once for the sentences and once for the labels)::

    <root>/input0/dict.txt, train.bin/.idx, valid.bin/.idx   sentences (binarized with the teacher's dict.txt)
    <root>/input1/...                                         optional second sentence of a pair task
    <root>/label/dict.txt, train.bin/.idx, valid.bin/.idx    one label per line (each binarized with a </s>)

The train split is the memory bank and valid the queries. Each item is ``<s>`` + sentence (+ ``</s>`` + second
sentence) with the ``</s>`` fairseq-preprocess ends every line with, as ``sentence_prediction`` builds it with
RoBERTa's GLUE settings (``init_token 0``, ``separator_token 2``); ``fit_teacher`` cuts it to the teacher's
position count (``TruncateDataset``: the first positions are kept). Class ``i`` is the ``i``-th symbol of
``label/dict.txt``, the same numbering in both splits, as fairseq's ``OffsetTokensDataset`` gives. Regression
sets (STS-B: ``label/<split>.label`` text files of floats) have no classes and are refused.

fairseq's binary readers are imported inside the loader, so importing this module does not import fairseq.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .sequences import TextRetrievalSet, evenly_spaced, flat_split
from .base import RetrievalDataError

SPLITS = (("train", "train"), ("test", "valid"))  # (role, file prefix): memory bank, queries
LAYOUT = "<root>/input0/{dict.txt, train.bin/.idx, valid.bin/.idx} and <root>/label/{dict.txt, train.*, valid.*}"
HINT = ("binarize with RoBERTa's GLUE recipe: fairseq-preprocess --only-source --trainpref train.input0 --validpref "
        "valid.input0 --destdir DIR/input0 --srcdict dict.txt, and the same for the labels into DIR/label without "
        "--srcdict")
INTEGER = re.compile(r"[+-]?\d+")
PADDING_SYMBOL = re.compile(r"madeupword\d{4}")  # fairseq-preprocess pads dictionaries to a multiple of 8


def is_text_folder(root) -> bool:
    return (Path(root) / "input0" / "dict.txt").is_file()


def _load_dictionary(folder: Path, what: str):
    from ...data.text import TextDataError, load_dictionary

    try:
        return load_dictionary(str(folder))
    except TextDataError as e:
        raise RetrievalDataError(f"{what}: {e}") from None


def _read(folder: Path, split: str, dictionary, what: str):
    """fairseq's indexed dataset ``folder/split`` (``.bin``/``.idx``)."""
    from fairseq.data import data_utils

    path = folder / split
    if not Path(f"{path}.idx").is_file():
        raise RetrievalDataError(f"{folder} has no {split}.bin/{split}.idx ({what}); expected {LAYOUT}; {HINT}")
    try:
        data = data_utils.load_indexed_dataset(str(path), dictionary, combine=False)
    except Exception as e:
        raise RetrievalDataError(f"{path}.bin/.idx cannot be read ({type(e).__name__}: {e}); {HINT}") from None
    if data is None:
        raise RetrievalDataError(f"{folder} has no {split}.bin/{split}.idx ({what}); {HINT}")
    return data


def _label_dictionary(root: Path):
    from fairseq.data import Dictionary

    label = root / "label"
    if not label.is_dir():
        raise RetrievalDataError(f"{root} has no label/ folder; a retrieval set needs a class label per sentence "
                                 f"({LAYOUT}); {HINT}")
    if not (label / "dict.txt").is_file():
        if any(label.glob("*.label")):
            raise RetrievalDataError(f"{label} holds regression targets (<split>.label text files, no dict.txt), e.g. "
                                     "STS-B; retrieval and k-NN need class labels: use a classification set")
        raise RetrievalDataError(f"{label} has no dict.txt; expected {LAYOUT}; {HINT}")
    try:
        dictionary = Dictionary.load(str(label / "dict.txt"))
    except Exception as e:
        raise RetrievalDataError(f"{label}/dict.txt is not a fairseq dictionary ({type(e).__name__}: {e})") from None
    names = [s for s in dictionary.symbols[dictionary.nspecial:] if not PADDING_SYMBOL.fullmatch(s)]
    if not names:
        raise RetrievalDataError(f"{label}/dict.txt lists no labels; {HINT}")
    if all(_is_number(s) for s in names) and not all(INTEGER.fullmatch(s) for s in names):
        example = next(s for s in names if not INTEGER.fullmatch(s))
        raise RetrievalDataError(f"{label}/dict.txt lists numbers such as {example!r}: "
                                 "these are regression targets, not classes; retrieval and k-NN need class labels")
    return dictionary, dictionary.symbols[dictionary.nspecial:dictionary.nspecial + len(names)]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _labels(root: Path, split: str, dictionary, count: int) -> torch.Tensor:
    data = _read(root / "label", split, dictionary, "labels")
    if len(data) != count:
        raise RetrievalDataError(f"{root}/label/{split} has {len(data)} labels but input0/{split} has {count} "
                                 "sentences; binarize both from files with one line per example")
    labels = np.empty(count, dtype=np.int64)
    eos, nspecial = dictionary.eos(), dictionary.nspecial
    for i in range(count):
        item = data[i]
        if len(item) != 2 or int(item[1]) != eos or int(item[0]) < nspecial:
            shown = dictionary.string(item) if len(item) else "an empty line"
            raise RetrievalDataError(f"{root}/label/{split}, example {i}: label {shown!r} is not one symbol of "
                                     f"label/dict.txt; each label line must be one class name (a valid label unseen "
                                     "in train becomes <unk>)")
        labels[i] = int(item[0]) - nspecial
    return torch.from_numpy(labels)


def load_text_folder(root, limit: Optional[int] = None, max_length: Optional[int] = None,
                     vocab_size: Optional[int] = None, pad_idx: Optional[int] = None) -> TextRetrievalSet:
    """Read a GLUE-style sentence-classification folder (see the module docstring).

    Args:
        root: the folder holding ``input0/`` and ``label/``.
        limit: keep at most ``limit`` examples per split, evenly spaced.
        max_length: the teacher's position count (``max_source_positions``): longer items keep their first
            ``max_length`` tokens. None: decided later (``fit_teacher``).
        vocab_size: the teacher's token embedding rows; the dictionary must make exactly as many (checked here
            when given, else by ``fit_teacher``).
        pad_idx: the teacher's ``<pad>`` id (checked when given).
    """
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise RetrievalDataError(f"{root}: directory not found; expected {LAYOUT}")
    if not is_text_folder(root):
        raise RetrievalDataError(f"{root} has no input0/dict.txt; expected the GLUE layout {LAYOUT}; {HINT}")
    dictionary = _load_dictionary(root / "input0", f"{root}/input0")
    label_dict, class_names = _label_dictionary(root)
    pair = (root / "input1").is_dir()
    splits = {}
    for role, split in SPLITS:
        first = _read(root / "input0", split, dictionary, "sentences")
        second = _read(root / "input1", split, dictionary, "second sentences") if pair else None
        if second is not None and len(second) != len(first):
            raise RetrievalDataError(f"{root}: input0/{split} has {len(first)} sentences but input1/{split} has "
                                     f"{len(second)}")
        if len(first) == 0:
            raise RetrievalDataError(f"{root}/input0/{split} holds no sentences; {HINT}")
        labels = _labels(root, split, label_dict, len(first))
        keep = evenly_spaced(len(first), limit)
        indices = keep.tolist() if keep is not None else range(len(first))
        bos, sep = torch.tensor([dictionary.bos()]), torch.tensor([dictionary.eos()])
        items = []
        for i in indices:
            parts = [bos, first[i]] + ([sep, second[i]] if second is not None else [])
            items.append(torch.cat(parts).to(torch.int32))
        splits[role] = flat_split(items, labels if keep is None else labels[keep], dtype=torch.int32)
    source = (f"GLUE-style folder {root} (input0{'+input1' if pair else ''}, label): sentences binarized by "
              "fairseq-preprocess, read with fairseq's indexed datasets"
              + (f", {limit} examples per split, evenly spaced" if limit is not None else ""))
    details = {"label_dictionary": f"{root}/label/dict.txt", "classes": list(class_names),
               "memory_file_split": "train", "query_file_split": "valid",
               "sentence_pair": bool(pair)}
    if pair:
        details["separator"] = "</s> (separator_token 2) between the two sentences"
    data = TextRetrievalSet(splits["train"], splits["test"], source=source, classes=class_names,
                            pad_idx=dictionary.pad(), dictionary_size=len(dictionary), details=details)
    return data.fit_teacher(vocab_size=vocab_size, max_length=max_length, pad_idx=pad_idx)
