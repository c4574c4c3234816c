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
import torch
from fairseq.data import FairseqDataset

from ..data import audio as audio_data
from ..data import image as image_data
from ..data import image_device
from ..data import text as text_data

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


def training_data(cfg) -> "TrainingData":
    """The training data behind ``task.data``, recognised and checked (cheaply) before the teacher is loaded."""
    if not cfg.data:
        raise ValueError("task.data is not set; pass the training data: " + "; ".join(
            f"{kind}: {what}" for kind, what in KINDS.items()))
    return {"image": ImageData, "text": TextData, "audio": AudioData}[data_kind(cfg.data)](cfg)


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


class ImageDataset(FairseqDataset):
    """fairseq view of an image dataset: every image counts as one "token", shuffled each epoch."""

    def __init__(self, images):
        self.images = images

    def __getitem__(self, index):
        return self.images[index]

    def __len__(self):
        return len(self.images)

    def collater(self, samples):
        return self.images.collater(samples)

    def num_tokens(self, index):
        return 1

    def size(self, index):
        return 1

    def ordered_indices(self):
        return np.random.permutation(len(self))  # fairseq seeds numpy with (seed + epoch) around this call

    def set_epoch(self, epoch):
        self.images.set_epoch(epoch)


def gpu_decode_mode(value) -> str:
    """``task.gpu_decode`` as ``auto``, ``true`` or ``false`` (Hydra may pass true/false as booleans)."""
    mode = str(value).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"task.gpu_decode={value!r} must be auto (decode on the GPU when training on one), true or "
                         "false")
    return mode


class TrainingData:
    """What the task asks of a modality's training data (the defaults fit text and audio)."""

    modality = ""
    counts_samples = True  # batches are sized by dataset.batch_size or dataset.max_tokens alike

    def prepare_batch(self, sample, model, train_dataset):
        """Last step before the forward pass, in the training process (images: decoding on the device)."""
        return sample

    @property
    def input_size(self):
        return None


class ImageData(TrainingData):
    """Images (ImageFolder tree or list file), augmented as data2vec2 image pretraining; JPEGs optionally
    decoded on the training device (``task.gpu_decode``)."""

    modality = "image"
    counts_samples = False  # every image is one "token": dataset.batch_size must be set

    def __init__(self, cfg):
        self.cfg = cfg
        if cfg.crop_scale_min <= 0 or cfg.crop_scale_min > 1:
            raise ValueError(f"task.crop_scale_min={cfg.crop_scale_min} must be in (0, 1]")
        gpu_decode_mode(cfg.gpu_decode)
        paths = image_data.find_images(os.path.expanduser(cfg.data))
        image_data.probe_images(paths)  # a folder of non-images fails here, in a second
        # one compact table of the paths, shared by the datasets of every epoch (ImageNet: 67 MB, not a list)
        self.paths = image_data._PathTable(paths)
        self._input_size = cfg.input_size
        self._device_decode = None

    @property
    def input_size(self):
        return self._input_size

    def configure(self, model) -> None:
        teacher_size = model.input_size
        if self.cfg.input_size is not None and self.cfg.input_size != teacher_size:
            raise ValueError(f"task.input_size={self.cfg.input_size} differs from the teacher's input size "
                             f"{teacher_size}; data2vec2 models have a fixed position table, so leave "
                             "task.input_size unset (or null)")
        self._input_size = teacher_size

    def images(self, train: bool):
        if self._input_size is None:
            raise RuntimeError("build the model before loading datasets: the crop size comes from the teacher")
        return image_data.ImageListDataset(self.paths, self._input_size, train=train,
                                           scale=(self.cfg.crop_scale_min, 1.0),
                                           max_bad_fraction=self.cfg.max_bad_image_fraction, seed=self.cfg.seed,
                                           device_decode=train and self.use_device_decode())

    def train(self, epoch: int):
        return ImageDataset(self.images(train=True))

    def valid(self, count: int):
        images = self.images(train=False)
        return ValidRound(images, count, images.collater)

    def prepare_batch(self, sample, model, train_dataset):
        """Turn an ``EncodedBatch`` source into the normalised batch on the model's device and dtype."""
        source = sample.get("net_input", {}).get("source") if sample else None
        if not isinstance(source, image_device.EncodedBatch):
            return sample
        param = next(model.parameters())
        images = train_dataset.images
        x, replaced = image_device.decode_batch(source, param.device, images.fallback_crop, dtype=param.dtype)
        images.record_device_decodes(source.num_encoded)
        return {**sample, "net_input": {**sample["net_input"], "source": x},
                "num_replaced": sample.get("num_replaced", 0) + replaced}

    def use_device_decode(self) -> bool:
        """Whether training JPEGs are decoded on the training device (``task.gpu_decode``); decided once."""
        if self._device_decode is None:
            self._device_decode = self._decide_device_decode()
        return self._device_decode

    def _decide_device_decode(self) -> bool:
        mode = gpu_decode_mode(self.cfg.gpu_decode)
        on_gpu = torch.cuda.is_available() and not self.cfg.cpu
        if mode == "false" or (mode == "auto" and not on_gpu):
            return False
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        problem = image_device.device_decode_works(device)
        if problem is None:
            logger.info(f"decoding training JPEGs on {device} (task.gpu_decode={mode}); data workers only read files")
            return True
        if mode == "true":
            raise RuntimeError(f"task.gpu_decode=true but torchvision cannot decode JPEGs on {device} ({problem}); "
                               "install a torchvision build with image support matching your torch, or set "
                               "task.gpu_decode=false to decode in the data workers")
        logger.warning(f"torchvision cannot decode JPEGs on {device} ({problem}): decoding in the data workers "
                       "(task.gpu_decode=auto)")
        return False


class TextData(TrainingData):
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


class AudioData(TrainingData):
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


# ----------------------------------------------------------------------------------------------------------
# several modalities in one training step (the multimodal task)


class ModalityStream:
    """One modality's sequence of training batches across its own epochs, as a pure function of the step.

    Its epoch ``e`` is exactly what fairseq would train on alone: the modality's dataset for epoch ``e``
    (``data.train(e)``, augmentation seeded by ``(seed, e, sample)``), ordered under fairseq's numpy seed
    ``seed + e`` and cut by ``batch_by_size``. Step ``g`` (counted over the whole run) takes the next batch
    of this sequence, so a resumed run, any DataLoader worker and any rank find the same batch for the
    same step without any state.
    """

    def __init__(self, data, max_tokens, max_sentences, seed: int):
        self.data, self.max_tokens, self.max_sentences, self.seed = data, max_tokens, max_sentences, int(seed)
        self._datasets, self._batches, self._ends = {}, {}, [0]

    def dataset(self, epoch: int):
        """This process's dataset object for ``epoch`` (set to that epoch; workers build their own)."""
        if epoch not in self._datasets:
            if len(self._datasets) > 1:  # an image or audio dataset holds every path: keep two epochs at most
                self._datasets.pop(min(self._datasets))
            dataset = self.data.train(epoch)
            dataset.set_epoch(epoch)
            self._datasets[epoch] = dataset
        return self._datasets[epoch]

    def batches(self, epoch: int) -> list:
        """fairseq's frozen batches of ``epoch`` (before its per-epoch shuffle of the batch order)."""
        if epoch not in self._batches:
            from fairseq.data import data_utils

            if len(self._batches) > 4:
                self._batches.pop(min(self._batches))
            dataset = self.dataset(epoch)
            with data_utils.numpy_seed(self.seed + epoch):
                indices = dataset.ordered_indices()
            self._batches[epoch] = [list(b) for b in dataset.batch_by_size(
                indices, max_tokens=self.max_tokens, max_sentences=self.max_sentences)]
        return self._batches[epoch]

    def locate(self, step: int) -> tuple:
        """``(epoch, batch index)`` of the run's ``step``-th batch (0-based)."""
        while self._ends[-1] <= step:
            self._ends.append(self._ends[-1] + len(self.batches(len(self._ends))))
        epoch = next(e for e in range(1, len(self._ends)) if step < self._ends[e])
        return epoch, step - self._ends[epoch - 1]

    def batch(self, step: int) -> dict:
        epoch, index = self.locate(step)
        dataset = self.dataset(epoch)
        return dataset.collater([dataset[i] for i in self.batches(epoch)[index]])


class StepDataset(FairseqDataset):
    """The multimodal training set fairseq iterates: item ``s`` of epoch ``E`` is one training step, whose
    batch holds one batch of every modality (``{"modalities": {m: batch}}``).

    An epoch has as many steps as the modality with the most batches per epoch (the primary one) has batches in
    its epoch ``E``; with ``dataset.batch_size=1`` fairseq shuffles, shards and checkpoints the steps as it
    would that modality's batches alone. With a single modality a run therefore sees exactly the batches, in
    the order, of the single-modality task.
    """

    def __init__(self, streams: dict, epoch: int):
        self.streams = streams
        self.epoch = int(epoch)
        self.primary = max(streams, key=lambda m: len(streams[m].batches(1)))
        primary = streams[self.primary]
        self.offset = sum(len(primary.batches(e)) for e in range(1, self.epoch))  # the run's earlier steps
        self.length = len(primary.batches(self.epoch))

    def __getitem__(self, index):
        return int(index)

    def __len__(self):
        return self.length

    def num_tokens(self, index):
        return 1

    def size(self, index):
        return 1

    def ordered_indices(self):
        return np.arange(self.length)

    def collater(self, samples):
        if not samples:
            return {}
        step = self.offset + samples[0]
        modalities = {m: stream.batch(step) for m, stream in self.streams.items()}
        return {"modalities": modalities, "id": torch.tensor([step]),
                "nsamples": sum(b["nsamples"] for b in modalities.values())}


class MultiValidRound(ValidRound):
    """One validation batch holding every modality's fixed validation batch (see ``ValidRound``)."""

    def __init__(self, rounds: dict):
        self.rounds = rounds

    def collater(self, samples):
        if not samples:
            return {}
        modalities = {m: r.collater([0]) for m, r in self.rounds.items()}
        return {"modalities": modalities, "nsamples": sum(b["nsamples"] for b in modalities.values())}
