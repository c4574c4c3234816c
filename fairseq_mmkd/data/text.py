"""Training text for distillation: ``fairseq-preprocess --only-source`` output, cut into blocks as data2vec 2.0
text pretraining does (fairseq's ``masked_lm`` task with ``d2v2_multi``).

* Data: a folder with ``dict.txt`` and ``train.bin``/``train.idx`` (any of fairseq's indexed formats), or
  several such folders joined by ``:`` (``DIR1:DIR2``): as in fairseq, epoch ``e`` reads shard
  ``(e - 1) % n``, so very large corpora are binarized and read in parts.
* Blocks: the token stream is cut into blocks of ``tokens_per_sample - 1`` tokens that cross sentence and
  document boundaries (``sample_break_mode: none``), and ``<s>`` is prepended: 512 tokens for data2vec2.
* The dictionary must be the teacher's: its embedding has one row per symbol (fairseq's 4 special symbols +
  ``dict.txt``) plus ``<mask>``; anything else is an error saying both sizes.
* A batch is right-padded with ``<pad>`` and carries its padding mask (only the corpus' last block is short).

This module reads fairseq's binary formats with fairseq's own readers.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

PREPROCESS_HINT = ("binarize the text with the teacher's dictionary: fairseq-preprocess --only-source --srcdict "
                   "dict.txt --trainpref train.bpe --destdir DIR --workers 8")


class TextDataError(ValueError):
    """The text data cannot be used; the message names the path and the fix."""


def text_shards(data: str) -> list[str]:
    """The folders of ``data`` (``DIR`` or ``DIR1:DIR2:...``), as absolute paths."""
    return [os.path.abspath(os.path.expanduser(p)) for p in os.fspath(data).split(os.pathsep) if p]


def is_text_data(data: str) -> bool:
    """Does ``data`` look like fairseq-preprocess output (a folder with ``dict.txt``)?"""
    shards = text_shards(data)
    return bool(shards) and os.path.isfile(os.path.join(shards[0], "dict.txt"))


def load_dictionary(folder: str):
    """fairseq's ``Dictionary`` of ``folder/dict.txt`` with ``<mask>`` appended, as ``masked_lm`` builds it."""
    from fairseq.data import Dictionary

    path = os.path.join(folder, "dict.txt")
    if not os.path.isfile(path):
        raise TextDataError(f"{folder} has no dict.txt, so it is not fairseq-preprocess output; {PREPROCESS_HINT}")
    try:
        dictionary = Dictionary.load(path)
    except Exception as e:
        raise TextDataError(f"{path} is not a fairseq dictionary ({type(e).__name__}: {e}); {PREPROCESS_HINT}") from None
    dictionary.add_symbol("<mask>")
    return dictionary


def check_vocabulary(dictionary, vocab_size: int, folder: str) -> None:
    """The teacher's token embedding must have one row per dictionary symbol plus ``<mask>``."""
    if len(dictionary) != vocab_size:
        raise TextDataError(
            f"{folder}/dict.txt makes {len(dictionary) - 1} symbols (+ <mask> = {len(dictionary)} embedding rows), "
            f"but the teacher's token embedding has {vocab_size} rows: the text was binarized with another "
            f"dictionary; {PREPROCESS_HINT} (the teacher's dict.txt, e.g. the one released with nlp_base.pt)")


def token_blocks(folder: str, split: str, dictionary, tokens_per_sample: int):
    """The blocks of ``folder/split``: ``<s>`` + ``tokens_per_sample - 1`` tokens (fairseq datasets)."""
    from fairseq.data import PrependTokenDataset, TokenBlockDataset, data_utils

    if tokens_per_sample < 2:
        raise TextDataError(f"task.tokens_per_sample={tokens_per_sample} must be at least 2 (<s> and one token)")
    path = os.path.join(folder, split)
    if os.path.isfile(path + ".bin") and os.path.getsize(path + ".bin") == 0:
        raise TextDataError(f"{path}.bin holds no tokens: the text given to fairseq-preprocess was empty")
    try:
        data = data_utils.load_indexed_dataset(path, dictionary, combine=False)
    except Exception as e:
        raise TextDataError(f"{path}.bin / {split}.idx cannot be read ({type(e).__name__}: {e}); "
                            f"{PREPROCESS_HINT}") from None
    if data is None:
        raise TextDataError(f"{folder} has no {split}.bin/{split}.idx; {PREPROCESS_HINT}")
    if len(data) == 0 or int(np.sum(data.sizes)) == 0:
        raise TextDataError(f"{path}.bin holds no tokens: the text given to fairseq-preprocess was empty")
    blocks = TokenBlockDataset(data, data.sizes, tokens_per_sample - 1, pad=dictionary.pad(), eos=dictionary.eos(),
                               break_mode="none")
    return PrependTokenDataset(blocks, dictionary.bos())


def collate_tokens(samples: Sequence[dict], pad_idx: int) -> dict:
    """Right-pad a batch: ``{"id", "net_input": {"source": LongTensor[B, T], "padding_mask": BoolTensor[B, T]},
    "nsamples": B, "ntokens": real tokens}``; ``{}`` for no samples."""
    if not samples:
        return {}
    lengths = [len(s["source"]) for s in samples]
    tokens = torch.full((len(samples), max(lengths)), pad_idx, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, :lengths[i]] = s["source"]
    padding_mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "net_input": {"source": tokens, "padding_mask": padding_mask},
        "nsamples": len(samples),
        "ntokens": int(sum(lengths)),
    }
