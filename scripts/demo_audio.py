"""Built-in data of the audio demo: labelled clips synthesised on the spot, in the formats fairseq users have.

Eight kinds of sound (rising and falling chirps, low and high harmonic tones, a two-tone trill, an
amplitude-modulated tone, noise bursts, a click train), each clip with its own duration, pitch, loudness and
background noise, written as 16 kHz FLAC. Training data: a wav2vec manifest folder (``train.tsv``) of
unlabelled clips. Retrieval set: a folder with ``train.tsv``/``valid.tsv`` manifests and ``train.label``/
``valid.label`` (one label per line, in manifest order): memory bank and queries.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

RATE = 16000
KINDS = ["rising_chirp", "falling_chirp", "low_tone", "high_tone", "trill", "am_tone", "noise_bursts", "clicks"]


def synthesise(kind: str, rng: np.random.Generator) -> np.ndarray:
    seconds = rng.uniform(0.8, 1.6)
    t = np.arange(int(seconds * RATE)) / RATE
    jitter = rng.uniform(0.85, 1.15)
    if kind in ("rising_chirp", "falling_chirp"):
        f0, f1 = (250 * jitter, 1000 * jitter)
        if kind == "falling_chirp":
            f0, f1 = f1, f0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds))
        wav = np.sin(phase)
    elif kind in ("low_tone", "high_tone"):
        f = (180 if kind == "low_tone" else 900) * jitter
        wav = sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3))
    elif kind == "trill":
        rate = 7 * jitter
        f = np.where(np.sin(2 * np.pi * rate * t) > 0, 500, 700) * jitter
        wav = np.sin(2 * np.pi * np.cumsum(f) / RATE)
    elif kind == "am_tone":
        wav = np.sin(2 * np.pi * 440 * jitter * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * jitter * t))
    elif kind == "noise_bursts":
        gate = (np.sin(2 * np.pi * 3 * jitter * t) > 0.3).astype(float)
        wav = rng.standard_normal(len(t)) * gate
    else:  # clicks
        wav = np.zeros(len(t))
        wav[(np.arange(0, seconds, 1 / (25 * jitter)) * RATE).astype(int)] = 1.0
        wav = np.convolve(wav, np.hanning(40), mode="same")
    wav = wav / (np.abs(wav).max() + 1e-8) * rng.uniform(0.2, 0.8)
    return (wav + rng.uniform(0.005, 0.05) * rng.standard_normal(len(t))).astype(np.float32)


def write_split(folder: Path, split: str, clips: list, labels=None) -> None:
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    rows = [str(folder.resolve())]
    for i, wav in enumerate(clips):
        name = f"{split}_{i:04d}.flac"
        soundfile.write(folder / name, wav, RATE)
        rows.append(f"{name}\t{len(wav)}")
    (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    if labels is not None:
        (folder / f"{split}.label").write_text("\n".join(labels) + "\n")


def prepare_audio(out: Path, train_clips: int = 480, per_class_train: int = 16, per_class_valid: int = 8,
                  seed: int = 0) -> dict:
    """Write ``out/data/audio`` (training manifest) and ``out/data/sounds`` (retrieval folder)."""
    rng = np.random.default_rng(seed)
    data = out / "data"
    train, folder = data / "audio", data / "sounds"
    if not (train / "train.tsv").exists():
        write_split(train, "train", [synthesise(KINDS[i % len(KINDS)], rng) for i in range(train_clips)])
        for split, n in (("train", per_class_train), ("valid", per_class_valid)):
            kinds = [k for k in KINDS for _ in range(n)]
            write_split(folder, split, [synthesise(k, rng) for k in kinds], kinds)
    return {"DATA": str(train), "RETRIEVAL": str(folder)}
