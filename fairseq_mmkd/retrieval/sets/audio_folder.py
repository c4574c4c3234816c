"""A labelled audio set: wav2vec manifests with one label per clip.

Layout::

    <root>/train.tsv, valid.tsv       wav2vec manifests: the audio root folder on the first line, then
                                      'relative/path<TAB>num_samples' per clip (wav2vec_manifest.py writes them)
    <root>/train.label, valid.label   one label per line, in manifest order (any string: "dog", "yes", "3")

The train split is the memory bank and valid the queries. Class indices come from the sorted union of the label
strings of both splits, so one string is one class in either direction.

Every file is checked (exists, 16 kHz: another rate is an error naming the file) and decoded once, at load time,
so bad data fails before any evaluation starts, and nothing is read again at each validation. Clips are held as
int16 when every file is mono PCM of at most 16 bits (exact; 32 KB per second of audio), else float32; a
``max_length`` given at load time also bounds what is kept. Clips shorter than the teacher's receptive field
give no frame: ``fit_teacher`` leaves them out and counts them (the count is in the protocol record), the
same rule as the training data's ``min_sample_size``; an evaluation set is not silently changed otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .sequences import AudioRetrievalSet, evenly_spaced, flat_split
from .base import RetrievalDataError

SPLITS = (("train", "train"), ("test", "valid"))  # (role, file prefix): memory bank, queries
LAYOUT = "<root>/train.tsv, valid.tsv (wav2vec manifests) and <root>/train.label, valid.label (one label per line)"
INT16_SUBTYPES = ("PCM_16", "PCM_S8", "PCM_U8")  # read as int16 without loss


def is_audio_folder(root) -> bool:
    return (Path(root) / "train.tsv").is_file()


def _labels(path: Path, count: int, manifest: str) -> list:
    if not path.is_file():
        raise RetrievalDataError(f"{path} not found: a retrieval set needs one label per clip of {manifest}, one per "
                                 f"line in manifest order; expected {LAYOUT}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != count:
        raise RetrievalDataError(f"{path} has {len(lines)} labels but {manifest} lists {count} clips; write one label "
                                 "per clip, in manifest order")
    labels = [line.strip() for line in lines]
    empty = [i + 1 for i, label in enumerate(labels) if not label]
    if empty:
        raise RetrievalDataError(f"{path}, line {empty[0]}: empty label ({len(empty)} such lines)")
    return labels


def _info(path: str):
    import soundfile

    from ...data.audio import SAMPLE_RATE, wrong_rate

    if not os.path.isfile(path):
        raise RetrievalDataError(f"{path}: file not found (listed in the manifest); fix the manifest or its root "
                                 "folder on the first line")
    try:
        info = soundfile.info(path)
    except Exception as e:
        raise RetrievalDataError(f"{path}: cannot be read as audio ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); re-encode or remove it") from None
    if info.samplerate != SAMPLE_RATE:
        raise RetrievalDataError(wrong_rate(path, info.samplerate))
    if info.frames == 0:
        raise RetrievalDataError(f"{path}: holds no samples; remove it from the manifest")
    return info


def _decode(path: str, as_int16: bool, max_length: Optional[int]):
    """(stored samples, full length, mean and variance of the whole clip as fairseq normalises it)."""
    import soundfile

    try:
        wav, _ = soundfile.read(path, dtype="int16" if as_int16 else "float32", always_2d=True)
    except Exception as e:
        raise RetrievalDataError(f"{path}: cannot be decoded ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); re-encode or remove it") from None
    wav = wav[:, 0] if as_int16 else (wav.mean(1) if wav.shape[1] > 1 else wav[:, 0])  # stereo averaged
    full = np.asarray(wav, dtype=np.float64) / (32768.0 if as_int16 else 1.0)
    stats = (full.mean(), full.var())
    kept = wav if max_length is None else wav[:max_length]
    return np.ascontiguousarray(kept), len(wav), stats


def load_audio_folder(root, limit: Optional[int] = None, max_length: Optional[int] = None,
                      min_length: Optional[int] = None, normalize: Optional[bool] = None) -> AudioRetrievalSet:
    """Read a labelled audio folder (see the module docstring).

    Args:
        root: the folder holding ``train.tsv``/``valid.tsv`` and ``train.label``/``valid.label``.
        limit: keep at most ``limit`` clips per split, evenly spaced over the manifest.
        max_length: clips longer than this keep their first ``max_length`` samples (None: whole clips).
        min_length: the teacher's receptive field: shorter clips are left out and counted (None: decided later,
            by ``fit_teacher``).
        normalize: per-clip normalisation as the teacher was trained (``task.normalize``); None leaves it off
            until ``fit_teacher`` sets it.
    """
    from ...data.audio import AudioDataError, read_manifest

    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise RetrievalDataError(f"{root}: directory not found; expected {LAYOUT}")
    if max_length is not None and int(max_length) < 1:
        raise ValueError(f"max_length must be a positive number of samples, got {max_length}")
    entries = {}
    for role, split in SPLITS:
        manifest = root / f"{split}.tsv"
        if not manifest.is_file():
            raise RetrievalDataError(f"{manifest} not found; expected {LAYOUT}")
        try:
            audio_root, clips = read_manifest(str(manifest))
        except AudioDataError as e:
            raise RetrievalDataError(str(e)) from None
        labels = _labels(root / f"{split}.label", len(clips), str(manifest))
        keep = evenly_spaced(len(clips), limit)
        if keep is not None:
            clips, labels = [clips[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]
        entries[role] = ([os.path.join(audio_root, rel) for rel, _ in clips], labels)

    # Headers first (fast): a missing file or a wrong sample rate fails before anything is decoded.
    infos = {role: [_info(p) for p in paths] for role, (paths, _) in entries.items()}
    as_int16 = all(i.channels == 1 and i.subtype in INT16_SUBTYPES for part in infos.values() for i in part)
    classes = sorted({label for _, labels in entries.values() for label in labels})
    class_index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for role, (paths, labels) in entries.items():
        decoded = [_decode(p, as_int16, max_length) for p in paths]
        splits[role] = flat_split([torch.from_numpy(d[0]) for d in decoded], [class_index[x] for x in labels],
                                  stats=[d[2] for d in decoded], full_lengths=[d[1] for d in decoded],
                                  dtype=torch.int16 if as_int16 else torch.float32)
    source = (f"audio folder {root} (train.tsv/valid.tsv manifests with train.label/valid.label), decoded with "
              "soundfile (libsndfile), stereo averaged"
              + (f", {limit} clips per split, evenly spaced" if limit is not None else ""))
    details = {"sample_rate": 16000, "classes": classes, "class_order": "sorted label strings of both splits",
               "memory_file_split": "train", "query_file_split": "valid",
               "stored_from_start": "clips are cut from their first sample (no random crops)"}
    data = AudioRetrievalSet(splits["train"], splits["test"], source=source, classes=classes,
                             max_length=max_length, details=details)
    return data.fit_teacher(min_length=min_length, normalize=normalize)
