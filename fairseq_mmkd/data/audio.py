"""Training audio for distillation: a wav2vec manifest of 16 kHz files, read, normalised and cropped as
data2vec 2.0 audio pretraining does (fairseq's ``audio_pretraining`` task and ``FileAudioDataset``).

* Data: a folder with ``train.tsv`` (or the ``.tsv`` itself): the root folder on the first line, then
  ``relative/path<TAB>num_samples`` per clip, as ``examples/wav2vec/wav2vec_manifest.py`` writes it. Clips
  shorter than ``min_sample_size`` are skipped and counted (data2vec2: 32,000 samples, 2 s).
* Each file is read with soundfile (libsndfile: wav, flac, ogg, mp3), must be 16 kHz (another rate is an
  error naming the file: resample the data), stereo is averaged, and, when the teacher was trained with
  ``normalize``, the whole clip is scaled to zero mean and unit variance before any crop.
* A batch is cropped to its shortest clip (at most ``max_sample_size``, data2vec2: 320,000 samples, 20 s),
  each clip at a random offset drawn from a generator seeded by ``(seed, epoch, clip)``: no padding, as in
  data2vec2's pretraining, and the same crops in any process and after a resume. Validation crops start at 0.
* Unreadable or missing files are replaced by the next readable clip, logged once and counted; more than
  ``max_bad_fraction`` of them stops the run.

Nothing here imports fairseq; the task wraps ``AudioClips`` in a ``FairseqDataset`` batched by
``dataset.max_tokens`` (samples).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import BadFiles, SharedEpoch, sample_seed

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MANIFEST_HINT = ("a wav2vec manifest folder holds train.tsv: the audio root folder on the first line, then "
                 "'relative/path<TAB>num_samples' per clip (fairseq: python examples/wav2vec/wav2vec_manifest.py "
                 "AUDIO_DIR --dest MANIFEST_DIR --ext flac --valid-percent 0)")


class AudioDataError(ValueError):
    """The audio data cannot be used; the message names the file and the fix."""


class UnreadableAudioError(Exception):
    """One audio file could not be read (the dataset replaces it and counts it)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason


def manifest_file(data: str, split: str = "train") -> str:
    """The manifest behind ``data``: ``data/<split>.tsv`` for a folder, ``data`` itself for a ``.tsv`` file."""
    path = os.path.abspath(os.path.expanduser(os.fspath(data)))
    return os.path.join(path, f"{split}.tsv") if os.path.isdir(path) else path


def is_audio_data(data: str) -> bool:
    """Does ``data`` look like a wav2vec manifest (folder with ``train.tsv``, or a ``.tsv`` file)?"""
    path = os.path.abspath(os.path.expanduser(os.fspath(data)))
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "train.tsv"))) or \
        (os.path.isfile(path) and path.endswith(".tsv"))


def read_manifest(path: str) -> tuple[str, list[tuple[str, int]]]:
    """``(root, [(relative path, num_samples), ...])`` of a wav2vec manifest; one-line errors for bad ones."""
    if not os.path.isfile(path):
        raise AudioDataError(f"audio manifest {path} does not exist; {MANIFEST_HINT}")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip("\n") for line in f]
    if not lines or not lines[0].strip():
        raise AudioDataError(f"audio manifest {path} is empty; {MANIFEST_HINT}")
    root = os.path.expanduser(lines[0].strip())
    if not os.path.isdir(root):
        raise AudioDataError(f"the audio root folder {root!r} on the first line of {path} does not exist; fix that "
                             "line (or regenerate the manifest on this machine)")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            entries.append((parts[0], int(parts[1])))
        except (IndexError, ValueError):
            raise AudioDataError(f"{path}, line {number}: expected 'relative/path<TAB>num_samples', got "
                                 f"{line[:80]!r}; {MANIFEST_HINT}") from None
    if not entries:
        raise AudioDataError(f"audio manifest {path} lists no clips; {MANIFEST_HINT}")
    return root, entries


def wrong_rate(path: str, rate: int) -> str:
    """The message for a file of another sample rate than the models take (training and retrieval data)."""
    return (f"{path}: sample rate {rate} Hz, but data2vec 2.0 audio models take {SAMPLE_RATE} Hz; resample the "
            f"data (e.g. sox in.flac -r {SAMPLE_RATE} out.flac)")


def read_audio(path: str) -> torch.Tensor:
    """A mono float32 clip of a 16 kHz file (stereo averaged).

    Raises:
        UnreadableAudioError: missing, unreadable or empty file (the dataset skips it).
        AudioDataError: a sample rate other than 16 kHz (the data must be resampled; skipping would hide it).
    """
    import soundfile

    if not os.path.isfile(path):
        raise UnreadableAudioError(path, "file not found")
    try:
        wav, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, OSError, ... for bad files
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else ""
        raise UnreadableAudioError(path, f"{type(e).__name__}: {reason}") from None
    if rate != SAMPLE_RATE:
        raise AudioDataError(wrong_rate(path, rate))
    if wav.shape[0] == 0:
        raise UnreadableAudioError(path, "no samples")
    return torch.from_numpy(wav.mean(1) if wav.shape[1] > 1 else wav[:, 0].copy())


class AudioClips(torch.utils.data.Dataset):
    """Clips of a wav2vec manifest, robust to bad files; see the module docstring.

    ``dataset[i]`` is ``{"id": i, "source": FloatTensor[L], "num_replaced": k}`` (the whole clip, normalised);
    the collater crops a batch to its shortest clip.

    Args:
        root: the manifest's root folder.
        entries: ``(relative path, num_samples)`` per clip.
        normalize: per-clip zero mean / unit variance (the teacher's ``task.normalize``).
        max_sample_size: crop clips longer than this (samples).
        min_sample_size: skip clips shorter than this (samples).
        train: random crop offsets if true, else crops from the start.
        seed: base seed of the crop offsets.
        max_bad_fraction: largest tolerated fraction of unreadable files.
        source: where the manifest came from (named in messages).
    """

    def __init__(self, root: str, entries: Sequence[tuple[str, int]], normalize: bool, max_sample_size: int = 320000,
                 min_sample_size: int = 0, train: bool = True, seed: int = 1, max_bad_fraction: float = 0.01,
                 source: str = "the manifest"):
        if max_sample_size < 1 or min_sample_size < 0:
            raise ValueError(f"max_sample_size ({max_sample_size}) must be >= 1 and min_sample_size "
                             f"({min_sample_size}) >= 0")
        kept = [(p, n) for p, n in entries if n >= min_sample_size]
        self.num_skipped_short = len(entries) - len(kept)
        if not kept:
            raise AudioDataError(f"all {len(entries)} clips of {source} are shorter than min_sample_size="
                                 f"{min_sample_size} samples; lower task.min_sample_size")
        if self.num_skipped_short:
            logger.info("skipping %d of %d clips of %s shorter than min_sample_size=%d samples",
                        self.num_skipped_short, len(entries), source, min_sample_size)
        self.root = root
        self.files = [p for p, _ in kept]
        self.sizes = np.array([n for _, n in kept], dtype=np.int64)
        self.normalize, self.train, self.seed = bool(normalize), bool(train), int(seed)
        self.max_sample_size, self.min_sample_size = int(max_sample_size), int(min_sample_size)
        self._epoch = SharedEpoch()
        self.bad = BadFiles(len(self.files), max_bad_fraction, "audio file", AudioDataError,
                            "task.max_bad_audio_fraction")

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    @property
    def epoch(self) -> int:
        return self._epoch.epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        index, n = int(index), len(self)
        for skipped in range(n):
            path = self.path((index + skipped) % n)
            if path in self.bad.paths:
                self.bad.failed(path, None)
                continue
            try:
                wav = read_audio(path)
            except UnreadableAudioError as e:
                self.bad.failed(path, e.reason)
                continue
            self.bad.ok()
            if self.normalize:
                wav = F.layer_norm(wav, wav.shape)
            return {"id": index, "source": wav, "num_replaced": skipped}
        raise AudioDataError(f"none of the {n} audio files could be read, e.g. {sorted(self.bad.paths)[:3]}; "
                             "check the manifest's root folder and files")

    def crop_start(self, clip_id: int, length: int, target: int) -> int:
        if length <= target or not self.train:
            return 0
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, clip_id))
        return int(torch.randint(0, length - target + 1, (1,), generator=generator))

    def collater(self, samples: Sequence[dict]) -> dict:
        """Crop every clip to the batch's shortest (at most ``max_sample_size``): ``{"id", "net_input":
        {"source": FloatTensor[B, L]}, "nsamples": B, "ntokens": B * L, "bad_files": {...}}``."""
        if not samples:
            return {}
        target = min(min(len(s["source"]) for s in samples), self.max_sample_size)
        clips = []
        for s in samples:
            start = self.crop_start(s["id"], len(s["source"]), target)
            clips.append(s["source"][start:start + target])
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "net_input": {"source": torch.stack(clips)},
            "nsamples": len(samples),
            "ntokens": len(samples) * target,
            "bad_files": {"bad_audio_files": int(sum(s["num_replaced"] for s in samples))},
        }


def load_audio_clips(data: str, normalize: bool, split: str = "train", **kwargs) -> AudioClips:
    """``AudioClips`` of the manifest behind ``data`` (a folder with ``<split>.tsv``, or the file)."""
    path = manifest_file(data, split)
    root, entries = read_manifest(path)
    return AudioClips(root, entries, normalize, source=path, **kwargs)


def probe_audio(clips: AudioClips, n: int = 4, receptive_field: Optional[int] = None) -> None:
    """Read a few clips spread over the manifest before training starts: a wrong root, missing files or a wrong
    sample rate fail in a second instead of after DataLoader start-up."""
    picks = sorted({int(round(i)) for i in np.linspace(0, len(clips) - 1, min(n, len(clips)))})
    failures = []
    for i in picks:
        try:
            wav = read_audio(clips.path(i))
            if receptive_field and len(wav) < receptive_field:
                failures.append((clips.path(i), f"{len(wav)} samples, fewer than the teacher's receptive field"))
        except UnreadableAudioError as e:
            failures.append((e.path, e.reason))
    if len(failures) > len(picks) // 2:
        listed = "; ".join(f"{p} ({r})" for p, r in failures[:4])
        raise AudioDataError(f"{len(failures)} of {len(picks)} probed audio files cannot be used: {listed}; check "
                             "the manifest's root folder and files")
