"""fairseq glue for the training data of each modality: which kind ``task.data`` is, and the ``FairseqDataset``
views fairseq's trainer batches and shuffles.

``training_data(cfg)`` recognises the data (fairseq-preprocess output: text; a wav2vec manifest: audio;
anything else: images) and checks it before the teacher is loaded; ``configure(model)`` then checks it
against the teacher (the modality, the text dictionary) and takes what comes from the teacher (image size,
audio normalisation); ``train(epoch)`` and ``valid(count)`` build the datasets fairseq iterates.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from fairseq.data import FairseqDataset

from .data import audio as audio_data
from .data import text as text_data

logger = logging.getLogger(__name__)

KINDS = {
    "image": "images (a folder in ImageFolder layout or a text file of image paths)",
    "text": "text (fairseq-preprocess output: a folder with dict.txt and train.bin/.idx)",
    "audio": "audio (a wav2vec manifest: a folder with train.tsv)",
}


class DataModalityError(ValueError):
    """``task.data`` holds another modality than the teacher's."""


def data_kind(data: str) -> str:
    """``"text"``, ``"audio"`` or ``"image"``: what ``task.data`` holds, recognised from its files."""
    if text_data.is_text_data(data):
        return "text"
    if audio_data.is_audio_data(data):
        return "audio"
    return "image"


def check_modality(kind: str, data: str, teacher_modality: str, teacher_path: str) -> None:
    if kind != teacher_modality:
        raise DataModalityError(
            f"task.data={data} holds {KINDS[kind]}, but the teacher {teacher_path} is a data2vec 2.0 "
            f"{teacher_modality} model; point task.data at {KINDS[teacher_modality]}, or use a "
            f"{kind} teacher")


class ValidRound(FairseqDataset):
    """One item whose batch is a fixed validation batch: fairseq then calls ``valid_step`` exactly once per
    validation round, which runs the whole retrieval evaluation. The batch is a real model input, since
    fairseq may reuse it as a dummy batch for workers without data."""

    def __init__(self, items, count: int, collater):
        self.items = items
        self.count = min(count, len(items))
        self._collate = collater

    def __getitem__(self, index):
        return index

    def __len__(self):
        return 1

    def collater(self, samples):
        if not samples:
            return {}
        return self._collate([self.items[i] for i in range(self.count)])

    def num_tokens(self, index):
        return 1

    def size(self, index):
        return 1


class SizedDataset(FairseqDataset):
    """A dataset of variable-length samples for fairseq's batching: ``num_tokens`` is a sample's length, so
    ``dataset.max_tokens`` bounds a batch's tokens (text) or samples (audio)."""

    def __init__(self, items, sizes: np.ndarray, collater, sort_by_size: bool = False):
        self.items = items
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._collate = collater
        self.sort_by_size = sort_by_size

    def __getitem__(self, index):
        return self.items[index]

    def __len__(self):
        return len(self.sizes)

    def collater(self, samples):
        return self._collate(samples)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def num_tokens_vec(self, indices):
        return self.sizes[indices]

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        """A fresh shuffle (fairseq seeds numpy with seed + epoch around this call); audio sorts it by length,
        longest first, as fairseq's ``RawAudioDataset`` does, so batches hold clips of similar length."""
        order = np.random.permutation(len(self))
        if self.sort_by_size:
            return np.lexsort([order, self.sizes])[::-1]
        return order

    def set_epoch(self, epoch):
        if hasattr(self.items, "set_epoch"):
            self.items.set_epoch(epoch)


class _Indexed:
    """``items[i]`` -> ``{"id": i, "source": blocks[i]}`` (text blocks as the collater expects them)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __getitem__(self, index):
        return {"id": int(index), "source": self.blocks[index]}

    def __len__(self):
        return len(self.blocks)


class TextData:
    """fairseq-preprocess output (``DIR`` or ``DIR1:DIR2`` shards, one per epoch as in fairseq) cut into blocks of
    ``task.tokens_per_sample`` tokens with ``<s>`` prepended."""

    modality = "text"

    def __init__(self, cfg):
        self.cfg = cfg
        self.shards = text_data.text_shards(cfg.data)
        for shard in self.shards:
            if not os.path.isdir(shard):
                raise text_data.TextDataError(f"task.data shard {shard} does not exist; {text_data.PREPROCESS_HINT}")
        self.dictionary = text_data.load_dictionary(self.shards[0])
        self._blocks = {}
        self.blocks(self.shards[0])  # an empty or unreadable first shard fails now

    def blocks(self, shard: str):
        if shard not in self._blocks:
            self._blocks = {shard: text_data.token_blocks(shard, "train", self.dictionary, self.cfg.tokens_per_sample)}
        return self._blocks[shard]

    def configure(self, model) -> None:
        enc = model.distiller.cfg.encoder
        text_data.check_vocabulary(self.dictionary, enc.vocab_size, self.shards[0])
        if self.cfg.tokens_per_sample > enc.max_source_positions:
            raise text_data.TextDataError(
                f"task.tokens_per_sample={self.cfg.tokens_per_sample} exceeds the teacher's "
                f"{enc.max_source_positions} positions; lower it (data2vec 2.0 text: 512)")

    def _dataset(self, shard):
        blocks = self.blocks(shard)
        return _Indexed(blocks), blocks.sizes

    def collate(self, samples):
        return text_data.collate_tokens(samples, self.dictionary.pad())

    def train(self, epoch: int):
        shard = self.shards[(epoch - 1) % len(self.shards)]
        items, sizes = self._dataset(shard)
        logger.info("text: %d blocks of at most %d tokens from %s", len(items), self.cfg.tokens_per_sample, shard)
        return SizedDataset(items, sizes, self.collate)

    def valid(self, count: int):
        items, _ = self._dataset(self.shards[0])
        return ValidRound(items, count, self.collate)


class AudioData:
    """A wav2vec manifest of 16 kHz clips; normalised when the teacher was trained with ``normalize``."""

    modality = "audio"

    def __init__(self, cfg):
        self.cfg = cfg
        self.path = audio_data.manifest_file(cfg.data)
        self.root, self.entries = audio_data.read_manifest(self.path)
        self.normalize = None

    def configure(self, model) -> None:
        teacher_task = getattr(model, "teacher_task_cfg", None) or {}
        self.normalize = (bool(teacher_task.get("normalize", False)) if self.cfg.normalize is None
                          else bool(self.cfg.normalize))
        enc = model.distiller.cfg.encoder
        if self.cfg.min_sample_size and self.cfg.min_sample_size < enc.receptive_field:
            raise audio_data.AudioDataError(
                f"task.min_sample_size={self.cfg.min_sample_size} is below the teacher's receptive field "
                f"({enc.receptive_field} samples): such clips give no frame; raise it (data2vec 2.0: 32000)")
        probe = self.clips(train=False)
        audio_data.probe_audio(probe, receptive_field=enc.receptive_field)
        logger.info("audio: %d clips from %s (%d shorter than %d samples skipped), normalise per clip: %s",
                    len(probe), self.path, probe.num_skipped_short, self.cfg.min_sample_size, self.normalize)

    def clips(self, train: bool):
        if self.normalize is None:
            raise RuntimeError("build the model before loading audio: normalisation comes from the teacher")
        return audio_data.AudioClips(self.root, self.entries, self.normalize, max_sample_size=self.cfg.max_sample_size,
                                     min_sample_size=self.cfg.min_sample_size, train=train, seed=self.cfg.seed,
                                     max_bad_fraction=self.cfg.max_bad_audio_fraction, source=self.path)

    def train(self, epoch: int):
        clips = self.clips(train=True)
        return SizedDataset(clips, np.minimum(clips.sizes, clips.max_sample_size), clips.collater, sort_by_size=True)

    def valid(self, count: int):
        clips = self.clips(train=False)
        return ValidRound(clips, count, clips.collater)
