"""Labelled sets of variable-length inputs (text, audio) for retrieval evaluation, and their model-ready batches.

A split is one flat buffer with a start and a length per item (no per-item tensors: a few hundred thousand
sentences or clips cost their data plus 16 bytes each), and int64 labels. Batches are right-padded with a
padding mask that is True at padding, as data2vec 2.0 takes them: text pads with ``<pad>`` (id 1), audio with
0.0 behind a sample-level mask. ``order`` sorts a split by length, longest first, so a batch of neighbours in
that order wastes little compute on padding (and, for audio, lets little padding leak into the valid frames:
fairseq's conv stacks see the padded samples); ``evaluate.embed_sequences`` puts the embeddings back into the
original order.

What depends on the teacher (text: its vocabulary and position count; audio: its receptive field, the longest
crop and whether it was trained on normalised clips) is applied by ``fit_teacher`` after loading, so a set can be
read before the teacher (data errors first) and fitted once the model is known.

Nothing here imports fairseq; the folder readers are ``text_folder.py`` and ``audio_folder.py``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .base import RetrievalDataError

logger = logging.getLogger(__name__)

AUDIO_NORM_EPS = 1e-5  # F.layer_norm's default eps, which fairseq's per-clip normalisation uses


@dataclass
class SequenceSplit:
    """One split: items stored back to back in ``data``.

    Args:
        data: 1-D buffer (text: int32 token ids; audio: int16 or float32 samples).
        starts: int64 ``[N]`` offset of each item in ``data``.
        lengths: int64 ``[N]`` stored length of each item.
        labels: int64 ``[N]`` class indices.
        full_lengths: int64 ``[N]`` length before any truncation at load time (for the protocol record).
        stats: audio only: float64 ``[N, 2]`` mean and (biased) variance of each whole clip, what fairseq's
            per-clip ``layer_norm`` uses, kept so that normalisation can be switched on after loading and is
            computed over the whole clip even when it is stored truncated.
    """

    data: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    full_lengths: Optional[torch.Tensor] = None
    stats: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.full_lengths is None:
            self.full_lengths = self.lengths.clone()
        n = len(self.labels)
        for name in ("starts", "lengths", "full_lengths"):
            if len(getattr(self, name)) != n:
                raise RetrievalDataError(f"{name} has {len(getattr(self, name))} entries for {n} labels")
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise RetrievalDataError(f"labels must be an int64 tensor [N], got {self.labels.dtype} "
                                     f"{list(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: torch.Tensor) -> "SequenceSplit":
        """The items at ``keep`` (indices or a bool mask); the buffer is shared, not copied."""
        return SequenceSplit(self.data, self.starts[keep], self.lengths[keep], self.labels[keep],
                             self.full_lengths[keep], None if self.stats is None else self.stats[keep])


def flat_split(items, labels, stats=None, full_lengths=None, dtype=None) -> SequenceSplit:
    """A ``SequenceSplit`` of a list of 1-D arrays or tensors (copied into one buffer)."""
    tensors = [torch.as_tensor(x) for x in items]
    lengths = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
    starts = torch.zeros(len(tensors), dtype=torch.int64)
    if len(tensors) > 1:
        starts[1:] = lengths.cumsum(0)[:-1]
    data = torch.cat(tensors) if tensors else torch.empty(0)
    if dtype is not None:
        data = data.to(dtype)
    return SequenceSplit(data, starts, lengths, torch.as_tensor(labels, dtype=torch.int64),
                         None if full_lengths is None else torch.as_tensor(full_lengths, dtype=torch.int64),
                         None if stats is None else torch.as_tensor(stats, dtype=torch.float64))


def evenly_spaced(count: int, limit: Optional[int]) -> Optional[torch.Tensor]:
    """Indices of ``limit`` items evenly spaced over ``count`` (None: keep all). Evenly spaced rather than the first
    ``limit``, which in a file sorted by class would be the first classes only."""
    if limit is None or limit >= count:
        return None
    if limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    return torch.linspace(0, count - 1, limit).round().long().unique()


class SequenceRetrievalSet:
    """Train (memory bank) and test (query) split of a labelled set of variable-length inputs.

    Subclasses say how a batch is padded (``pad_value``, ``_values``) and what the protocol record holds.

    Args:
        train: the memory-bank split.
        test: the query split (its labels in the same class numbering).
        source: where the data came from and what was done to it on loading (for the protocol record).
        max_length: items longer than this are cut to their first ``max_length`` positions when batched
            (None: no limit).
        classes: class names in class-index order, if known.
    """

    modality = ""
    unit = "positions"  # what a length counts
    leading_token: Optional[str] = None  # what the first position holds when the encoder has no extra tokens
    default_pooling = "mean"
    pad_value: float = 0

    def __init__(self, train: SequenceSplit, test: SequenceSplit, source: str = "",
                 max_length: Optional[int] = None, classes: Optional[list] = None):
        for name, split in (("train", train), ("test", test)):
            if len(split) == 0:
                raise RetrievalDataError(f"{name}: no items")
        self.train, self.test = train, test
        self.source = source
        self.classes = list(classes) if classes is not None else None
        self.max_length = None
        self.set_max_length(max_length)
        self.skipped: dict = {}  # what fit_teacher left out, per split (recorded in the protocol)

    # --- the interface evaluate_retrieval reads (as RetrievalSet's) ---
    @property
    def train_labels(self) -> torch.Tensor:
        return self.train.labels

    @property
    def test_labels(self) -> torch.Tensor:
        return self.test.labels

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1

    def split(self, name: str) -> SequenceSplit:
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return getattr(self, name)

    # --- lengths, order, batches ---
    def set_max_length(self, max_length: Optional[int]) -> None:
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be a positive number of {self.unit}, got {max_length}")
        self.max_length = None if max_length is None else int(max_length)

    def lengths(self, split: str) -> torch.Tensor:
        """int64 ``[N]``: the length each item is batched with (after truncation)."""
        lengths = self.split(split).lengths
        return lengths if self.max_length is None else lengths.clamp(max=self.max_length)

    def order(self, split: str) -> torch.Tensor:
        """Item indices sorted by batched length, longest first (equal lengths in index order)."""
        lengths = self.lengths(split)
        return torch.sort(-lengths, stable=True).indices

    def _convert(self, raw: torch.Tensor, split: SequenceSplit, index: torch.Tensor) -> torch.Tensor:
        """Stored values ``[B, L]`` of items ``index`` -> what the encoder takes (padding is overwritten after)."""
        return raw

    def batch(self, split: str, index) -> tuple:
        """Items ``index`` of ``split`` as ``(source [B, L], padding_mask [B, L])`` on the CPU, right-padded to the
        longest of them, the mask True at padding."""
        part = self.split(split)
        index = torch.as_tensor(index, dtype=torch.int64)
        lengths = self.lengths(split)[index]
        width = int(lengths.max())
        raw = part.data.new_zeros((len(index), width))
        for row, (start, length) in enumerate(zip(part.starts[index].tolist(), lengths.tolist())):
            raw[row, :length] = part.data[start:start + length]
        padding_mask = torch.arange(width)[None, :] >= lengths[:, None]
        source = self._convert(raw, part, index).masked_fill(padding_mask, self.pad_value)
        return source, padding_mask

    # --- teacher facts ---
    def fit_teacher(self, **facts) -> "SequenceRetrievalSet":
        """Apply what comes from the teacher (see the subclasses); unknown facts are ignored. Returns ``self``."""
        return self

    def _drop_short(self, min_length: int) -> None:
        """Leave out items shorter than ``min_length`` (counted per split); an emptied split is an error."""
        for name in ("train", "test"):
            part = self.split(name)
            keep = part.lengths >= min_length
            dropped = int((~keep).sum())
            if dropped == len(part):
                raise RetrievalDataError(f"{self.source}: all {len(part)} {name} items are shorter than {min_length} "
                                         f"{self.unit}, the teacher's shortest input")
            if dropped:
                logger.warning("%s: leaving out %d of %d %s items shorter than %d %s (the teacher's shortest input)",
                               self.source, dropped, len(part), name, min_length, self.unit)
                setattr(self, name, part.select(keep))
            self.skipped[name] = self.skipped.get(name, 0) + dropped

    # --- protocol ---
    def _truncated(self, split: str) -> int:
        part = self.split(split)
        cut = part.full_lengths > part.lengths
        if self.max_length is not None:
            cut |= part.lengths > self.max_length
        return int(cut.sum())

    def modality_protocol(self) -> dict:
        return {}

    def protocol(self, input_size=None) -> dict:
        """The data side of an evaluation protocol record (JSON-ready): splits and sizes, source, lengths,
        truncation, padding, and the modality's own facts. ``input_size`` is accepted for the image sets'
        signature and ignored."""
        record = {"modality": self.modality, "source": self.source,
                  "memory_split": "train", "memory_size": self.num_train,
                  "query_split": "test", "query_size": self.num_test, "num_classes": self.num_classes}
        for split in ("train", "test"):
            lengths = self.lengths(split)
            record[f"{split}_length_{self.unit}"] = {"min": int(lengths.min()), "max": int(lengths.max()),
                                                     "mean": round(float(lengths.double().mean()), 2)}
        record.update({
            "max_length": self.max_length,
            "length_unit": self.unit,
            "truncation": (f"items longer than max_length keep their first max_length {self.unit}"
                           if self.max_length is not None else "none"),
            "truncated_items": {s: self._truncated(s) for s in ("train", "test")},
            "left_out_items": {s: self.skipped.get(s, 0) for s in ("train", "test")},
            "batching": "sorted by length (longest first), right-padded, padding masked in the encoder and in "
                        "mean pooling; embeddings returned in the original order",
            "pad_value": self.pad_value,
        })
        record.update(self.modality_protocol())
        return record


class TextRetrievalSet(SequenceRetrievalSet):
    """Token-id sequences (``<s>`` first), padded with ``<pad>``. ``cls`` pooling reads the ``<s>`` position,
    the token RoBERTa-style classification heads read, although text encoders have no extra tokens.

    Extra Args:
        pad_idx: the dictionary's ``<pad>`` id (fairseq: 1).
        dictionary_size: embedding rows the dictionary needs (symbols + ``<mask>``), checked by ``fit_teacher``.
        details: modality facts for the protocol record (dictionary, label mapping, separator).
    """

    modality = "text"
    unit = "tokens"
    leading_token = "<s>"

    def __init__(self, train, test, source="", max_length=None, classes=None, pad_idx: int = 1,
                 dictionary_size: Optional[int] = None, details: Optional[dict] = None):
        self.pad_value = int(pad_idx)
        self.dictionary_size = dictionary_size
        self.details = dict(details or {})
        super().__init__(train, test, source, max_length, classes)

    def _convert(self, raw, split, index):
        return raw.long()

    def fit_teacher(self, vocab_size: Optional[int] = None, max_length: Optional[int] = None,
                    pad_idx: Optional[int] = None, **unused) -> "TextRetrievalSet":
        """Check the dictionary against the teacher's embedding rows (``vocab_size``) and its ``<pad>``, and cut
        sequences to the teacher's position count (``max_length``)."""
        if vocab_size is not None and self.dictionary_size is not None and int(vocab_size) != self.dictionary_size:
            raise RetrievalDataError(
                f"{self.source}: its dictionary makes {self.dictionary_size} embedding rows (symbols + <mask>), but "
                f"the teacher's token embedding has {vocab_size} rows: binarize the set with the teacher's dict.txt "
                "(fairseq-preprocess --srcdict dict.txt)")
        if pad_idx is not None and int(pad_idx) != self.pad_value:
            raise RetrievalDataError(f"{self.source}: <pad> is id {self.pad_value} in its dictionary but {pad_idx} in "
                                     "the teacher's")
        if max_length is not None:
            self.set_max_length(max_length if self.max_length is None else min(self.max_length, int(max_length)))
        return self

    def modality_protocol(self) -> dict:
        return {"tokens": "<s> + sentence + </s> as fairseq's sentence_prediction task builds them (init_token 0)",
                "pad_idx": self.pad_value, "dictionary_size": self.dictionary_size, **self.details}


class AudioRetrievalSet(SequenceRetrievalSet):
    """16 kHz mono clips, padded with 0.0 behind a sample-level mask (the encoder turns it into a frame mask).

    Storage: int16 when every file holds mono PCM of at most 16 bits (exact: libsndfile's float reading of such
    files is the int16 value / 32768), else float32. ``normalize`` (per clip zero mean and unit variance over the
    whole clip, fairseq's ``F.layer_norm(wav, wav.shape)``, as data2vec 2.0 audio models were trained with
    ``task.normalize``) is an attribute that can change after loading: the statistics of each whole clip are
    stored with it.

    Extra Args:
        normalize: normalise each clip (default off until the teacher says).
        details: modality facts for the protocol record (sample rate, storage, labels).
    """

    modality = "audio"
    unit = "samples"
    pad_value = 0.0

    def __init__(self, train, test, source="", max_length=None, classes=None, normalize: bool = False,
                 details: Optional[dict] = None):
        self.normalize = bool(normalize)
        self.details = dict(details or {})
        super().__init__(train, test, source, max_length, classes)

    def _convert(self, raw, split, index):
        x = raw.float() / 32768.0 if raw.dtype == torch.int16 else raw.float()
        if self.normalize:
            mean, var = split.stats[index].T
            x = (x - mean[:, None].float()) * (var[:, None] + AUDIO_NORM_EPS).rsqrt().float()
        return x

    def fit_teacher(self, min_length: Optional[int] = None, max_length: Optional[int] = None,
                    normalize: Optional[bool] = None, **unused) -> "AudioRetrievalSet":
        """Leave out clips shorter than the teacher's receptive field (``min_length``; counted and logged), cut
        longer ones to ``max_length`` samples, and set per-clip normalisation as the teacher was trained."""
        if max_length is not None:
            if min_length is not None and int(max_length) < int(min_length):
                raise RetrievalDataError(f"max_length={max_length} samples is below the teacher's receptive field "
                                         f"({min_length} samples); raise it")
            self.set_max_length(max_length if self.max_length is None else min(self.max_length, int(max_length)))
        if min_length is not None:
            self._drop_short(int(min_length))
        if normalize is not None:
            self.normalize = bool(normalize)
        return self

    def modality_protocol(self) -> dict:
        return {"normalize": self.normalize,
                "normalization": ("per clip: zero mean and unit variance over the whole clip before truncation "
                                  f"(fairseq's F.layer_norm(wav, wav.shape), eps {AUDIO_NORM_EPS})"
                                  if self.normalize else "none (raw samples in [-1, 1])"),
                "storage_dtype": str(self.train.data.dtype).replace("torch.", ""),
                "padding_mask": "per sample, True at padding; the encoder derives the frame mask from the valid "
                                "length (fairseq's convert_padding_mask)",
                **self.details}
