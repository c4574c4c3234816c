"""Captions as token ids of the text teacher, made the way its pretraining text was.

``nlp_base.pt`` (data2vec 2.0 text) was pretrained on RoBERTa's data: raw text encoded with fairseq's GPT-2
byte-level BPE (``multiprocessing_bpe_encoder`` with ``encoder.json`` / ``vocab.bpe``), binarized with RoBERTa's
``dict.txt``. A caption goes the same way: GPT-2 BPE (fairseq's own ``gpt2_bpe_utils``, from the two local files:
nothing is downloaded), the dictionary, then ``<s> ... </s>`` as fairseq's ``sentence_prediction`` reads a
sentence. Like that data, captions are used as written: no lower-casing (the BPE is case-sensitive) and
punctuation kept (the BPE has byte-level tokens for it). Without BPE files the caption is split into words and
punctuation marks (``"a dog."`` -> ``a dog .``), each looked up in the dictionary (for a teacher whose dictionary
holds words). ``max_tokens`` caps the length,
``<s>`` and ``</s>`` included (the tokens after the cap are dropped, ``</s>`` kept).

fairseq's ``Dictionary`` and BPE are imported inside the functions, so importing this module does not import it.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch

from .text import TextDataError, check_vocabulary, load_dictionary


WORDS = re.compile(r"\w+|[^\w\s]")


def split_words(caption: str) -> list:
    """The whitespace-words mode: words and punctuation marks (``"a dog."`` -> ``["a", "dog", "."]``)."""
    return WORDS.findall(caption)


class CaptionTokenizer:
    """Args:
        dictionary: folder holding the teacher's ``dict.txt`` (or the file itself).
        encoder_json, vocab_bpe: GPT-2 BPE files (both or neither).
        max_tokens: the longest caption, ``<s>`` and ``</s>`` included.
    """

    def __init__(self, dictionary: str, encoder_json: Optional[str] = None, vocab_bpe: Optional[str] = None,
                 max_tokens: int = 64):
        path = os.path.expanduser(dictionary)
        folder = os.path.dirname(path) if os.path.basename(path) == "dict.txt" else path
        if not os.path.isdir(folder):
            raise TextDataError(f"task.text_dict={dictionary} is not a folder with the text teacher's dict.txt")
        self.dictionary = load_dictionary(folder)
        self.folder = folder
        if bool(encoder_json) != bool(vocab_bpe):
            raise TextDataError("give both GPT-2 BPE files (task.bpe_encoder_json and task.bpe_vocab), or neither "
                                "for whitespace words")
        self.bpe = None
        if encoder_json:
            for name, p in (("task.bpe_encoder_json", encoder_json), ("task.bpe_vocab", vocab_bpe)):
                if not os.path.isfile(os.path.expanduser(p)):
                    raise TextDataError(f"{name}={p} does not exist; use the encoder.json / vocab.bpe that fairseq's "
                                        "RoBERTa and data2vec text models were encoded with")
            from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

            self.bpe = get_encoder(os.path.expanduser(encoder_json), os.path.expanduser(vocab_bpe))
        if max_tokens < 3:
            raise TextDataError(f"task.max_caption_tokens={max_tokens} must be at least 3 (<s>, a token, </s>)")
        self.max_tokens = max_tokens

    @property
    def pad(self) -> int:
        return self.dictionary.pad()

    def describe(self) -> dict:
        """How captions become tokens, for the evaluation protocol record."""
        return {"dictionary": os.path.join(self.folder, "dict.txt"),
                "bpe": "GPT-2 byte-level BPE (fairseq gpt2_bpe_utils)" if self.bpe else "words and punctuation marks",
                "case": "as written (no lower-casing)", "format": "<s> tokens </s>", "max_tokens": self.max_tokens}

    def check_teacher(self, vocab_size: int) -> None:
        """The dictionary must be the text teacher's (its embedding rows: the symbols plus ``<mask>``)."""
        check_vocabulary(self.dictionary, vocab_size, self.folder)

    def words(self, caption: str) -> str:
        """What the dictionary looks up: BPE ids as text (``"31414 232"``) or the caption's words."""
        if self.bpe is None:
            return " ".join(split_words(caption))
        return " ".join(map(str, self.bpe.encode(caption)))

    def encode(self, caption: str, where: str = "") -> torch.Tensor:
        """``<s>`` + the caption's tokens + ``</s>``, at most ``max_tokens`` long; a caption of which the dictionary
        knows no token is an error (it would be only ``<unk>``)."""
        d = self.dictionary
        ids = d.encode_line(self.words(caption), add_if_not_exist=False, append_eos=False).long()
        if len(ids) == 0 or bool((ids == d.unk()).all()):
            hint = "" if self.bpe else "; set the GPT-2 BPE files if the teacher was trained on BPE"
            raise TextDataError(f"{where or 'a caption'}: {caption!r} has no token the text teacher's dictionary knows "
                                f"({self.folder}/dict.txt){hint}")
        ids = ids[:self.max_tokens - 2]
        return torch.cat([torch.tensor([d.bos()]), ids, torch.tensor([d.eos()])])

    def cut(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (``<s> ... </s>``) cut to ``max_tokens``, ``</s>`` kept."""
        if len(ids) <= self.max_tokens:
            return ids
        return torch.cat([ids[:self.max_tokens - 1], ids[-1:]])

    def encode_all(self, captions: Sequence[str], source: str = "") -> list:
        return [self.encode(c, f"{source}, caption {i}" if source else f"caption {i}") for i, c in enumerate(captions)]


def pad_captions(tokens: Sequence[torch.Tensor], pad: int) -> tuple:
    """Right-pad token lists: ``(ids [B, T], padding_mask [B, T], True at padding)``."""
    lengths = torch.tensor([len(t) for t in tokens])
    out = torch.full((len(tokens), int(lengths.max())), pad, dtype=torch.long)
    for i, t in enumerate(tokens):
        out[i, :len(t)] = t
    return out, torch.arange(out.shape[1])[None, :] >= lengths[:, None]
