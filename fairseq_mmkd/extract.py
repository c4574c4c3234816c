"""Dump what a data2vec 2.0 teacher computes for a batch of inputs: ``python -m fairseq_mmkd.extract``.

Distillation is only as good as its targets, and the plugin computes them with its own re-implementation
of fairseq's ``Data2VecMultiModel``. This tool writes every intermediate distillation uses to one ``.npz``
so it can be checked against fairseq's own outputs (the parity tests do exactly that), inspected, or
cached. It serves image, text and audio checkpoints alike; the modality comes from the checkpoint (a multimodal
file, such as an exported multimodal student, needs ``--modality``). A student training checkpoint (``d2v_kd``,
``d2v_kd_multimodal``) is read as the file ``python -m fairseq_mmkd.export`` would write of it (``targets`` with
its teacher's settings)::

    python -m fairseq_mmkd.extract --checkpoint CKPT --input X.npy [--padding-mask M.npy] --output OUT.npz \\
        [--weights model|ema] [--device cpu|cuda] [--batch-size 64] [--modality M] [--trust-checkpoint]
    python -m fairseq_mmkd.extract --checkpoint base_libri.pt --input a.wav b.flac --output OUT.npz

Inputs (``X.npy``, memory-mapped):
    image: float32 ``[B, 3, H, W]``, already normalised (ImageNet mean/std), ``H = W`` = the input size.
    text: int64 ``[B, T]`` token ids of the teacher's dictionary (``<s>`` first, ``<pad>`` = 1 after the end).
    audio: float32 ``[B, L]`` 16 kHz samples as the model receives them (already normalised when the
        checkpoint was trained with ``normalize``); or audio files (``--input a.wav b.flac``: 16 kHz, stereo
        averaged, normalised per file when the checkpoint says so, right-padded with zeros to the longest).
``M.npy``: bool ``[B, T]`` (text) or ``[B, L]`` (audio), True at padding. Text without it is padded where the
token is ``<pad>``.

The ``.npz`` holds ``encoder_out`` (the sequence entering the first shared block), ``layer_results_<i>``
(block i's target: FFN output, or block output with ``end_of_block_targets``) and ``block_out_<i>``
(residual stream after block i), all ``[B, T, D]`` with the extra (CLS) tokens first, ``targets``
``[B, T - extra, D]`` built with the checkpoint's own target settings, and, when the input had padding,
``padding_mask`` (bool ``[B, T]`` at sequence resolution: tokens, or audio frames). With padding, targets
are normalised over valid positions only and are 0 at padding (``fairseq_mmkd.targets``); outputs at padded
positions are computed but meaningless. Everything else is float32.

The input is memory-mapped and run in batches of ``--batch-size`` under ``torch.inference_mode``, and
each batch's outputs go straight to ``.npy`` memmaps on disk that are zipped into the ``.npz`` at the end,
so memory use does not grow with ``B``. Checkpoints with ``batch_norm_target_layer`` normalise over
each batch, as fairseq does over a training batch, so their targets depend on ``--batch-size``.

A bad command (unusable checkpoint, missing or malformed input, unavailable device) prints one
``error: ...`` line to stderr and exits with status 2, like argparse's usage errors: the fix is to change
the command, and a traceback would only bury the message.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .d2v.loading import CheckpointError, WrongModelError, load_d2v
from .files import atomic_write

EXIT_BAD_COMMAND = 2
SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class UsageError(Exception):
    """A problem with the command line or its input files, reported without a traceback."""


def _load_npy(path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: input file not found")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; pass a .npy file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path}: not a readable .npy array ({e}); save it with numpy.save") from None
    if not isinstance(array, np.ndarray):  # np.load opens .npz archives as a mapping
        raise UsageError(f"{path}: is an .npz archive; pass a single array saved with numpy.save (.npy)")
    return array


def load_inputs(path, model) -> np.ndarray:
    """Memory-map ``path`` and check it is what ``model`` takes (dtype and shape; token ids in the vocabulary)."""
    array = _load_npy(path)
    modality = model.cfg.modality
    expected = {"image": ("float32 (normalised pixels)", array.dtype == np.float32),
                "text": ("int64 token ids", array.dtype.kind in "iu"),
                "audio": ("float32 samples", array.dtype == np.float32)}[modality]
    if not expected[1]:
        raise UsageError(f"{path}: a {modality} teacher takes {expected[0]}, got {array.dtype}"
                         + ("; convert with .astype(numpy.int64)" if modality == "text" else
                            "; convert with .astype(numpy.float32)"))
    probe = torch.empty(array.shape, device="meta", dtype=torch.int64 if modality == "text" else torch.float32)
    try:
        model.encoder.check_input(probe)
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
    if array.shape[0] == 0:
        what = {"image": "images", "text": "sequences", "audio": "clips"}[modality]
        raise UsageError(f"{path}: contains no {what} (batch dimension is 0)")
    if modality == "text":
        try:
            model.encoder.check_values(torch.from_numpy(np.array(array, dtype=np.int64)))
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
    return array


def load_padding_mask(path, inputs: np.ndarray, model) -> np.ndarray:
    mask = _load_npy(path)
    if model.cfg.modality == "image":
        raise UsageError(f"{path}: images take no padding mask")
    if mask.dtype != np.bool_:
        raise UsageError(f"{path}: the padding mask must be bool (True at padding), got {mask.dtype}")
    if mask.shape != inputs.shape:
        raise UsageError(f"{path}: the padding mask must have the input's shape {list(inputs.shape)}, "
                         f"got {list(mask.shape)}")
    if model.cfg.modality == "audio":
        shortest = int((~mask).sum(1).min())
        need = model.cfg.encoder.receptive_field
        if shortest < need:
            raise UsageError(f"{path}: a clip has only {shortest} unpadded samples, fewer than the conv feature "
                             f"extractor's receptive field ({need}); drop it or use longer clips")
    return mask


def read_audio_files(paths: Sequence, normalize: bool, receptive_field: int) -> tuple:
    """16 kHz audio files -> float32 ``[B, L]`` right-padded with zeros, and the bool sample mask ``[B, L]``.

    Stereo is averaged; with ``normalize`` each file is scaled to zero mean and unit variance over its own
    samples before padding, as fairseq's ``RawAudioDataset`` does.
    """
    import soundfile

    clips = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UsageError(f"{p}: audio file not found")
        try:
            wav, rate = soundfile.read(str(p), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError, OSError) as e:
            raise UsageError(f"{p}: not a readable audio file ({e})") from None
        if rate != SAMPLE_RATE:
            raise UsageError(f"{p}: sample rate {rate} Hz, but data2vec 2.0 audio models take {SAMPLE_RATE} Hz; "
                             f"resample it first (e.g. sox {p.name} -r 16000 out.wav)")
        wav = torch.from_numpy(wav.mean(1) if wav.shape[1] > 1 else wav[:, 0])
        if len(wav) < receptive_field:
            raise UsageError(f"{p}: {len(wav)} samples is shorter than the conv feature extractor's receptive "
                             f"field ({receptive_field} samples)")
        if normalize:
            wav = torch.nn.functional.layer_norm(wav, wav.shape)
        clips.append(wav)
    length = max(len(c) for c in clips)
    audio = torch.zeros(len(clips), length)
    mask = torch.ones(len(clips), length, dtype=torch.bool)
    for i, c in enumerate(clips):
        audio[i, :len(c)] = c
        mask[i, :len(c)] = False
    return audio.numpy(), mask.numpy()


class NpzWriter:
    """Fills named arrays batch by batch in ``.npy`` memmaps, then zips them into an ``.npz``.

    ``np.savez`` needs every array in memory at once; this keeps only one batch in memory. The archive is
    uncompressed like ``np.savez``'s and is moved into place only when complete.
    """

    def __init__(self, path, num_rows: int):
        self.path = Path(path)
        self.num_rows = num_rows
        self._tmp = tempfile.TemporaryDirectory(dir=self.path.parent, prefix=f".{self.path.name}.")
        self._arrays: dict = {}

    def write(self, name: str, start: int, batch: np.ndarray) -> None:
        if name not in self._arrays:
            self._arrays[name] = np.lib.format.open_memmap(
                Path(self._tmp.name) / f"{name}.npy", mode="w+", dtype=batch.dtype,
                shape=(self.num_rows,) + batch.shape[1:])
        self._arrays[name][start:start + len(batch)] = batch

    def close(self) -> None:
        with atomic_write(self.path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in self._arrays.items():
                arr.flush()
                zf.write(arr.filename, arcname=f"{name}.npy")
        self._arrays.clear()
        self._tmp.cleanup()

    def abort(self) -> None:
        self._arrays.clear()
        self._tmp.cleanup()


def _has_padding(model, inputs: np.ndarray, mask: Optional[np.ndarray]) -> bool:
    if mask is not None:
        return bool(mask.any())
    if model.cfg.modality == "text":
        return bool((np.asarray(inputs) == model.encoder.pad_idx).any())
    return False


def load_model(checkpoint, weights: str = "model", device: str = "cpu", trust_checkpoint: bool = False,
               modality: Optional[str] = None):
    """A data2vec 2.0 file (``load_d2v``), or a student training checkpoint (``d2v_kd``, ``d2v_kd_multimodal``) as
    the model its export would be: the modality's frozen encoder in front of the student blocks."""
    try:
        return load_d2v(checkpoint, weights=weights, device=device, trust_checkpoint=trust_checkpoint,
                        modality=modality)
    except WrongModelError as e:
        from .models._student import STUDENT_MODELS

        if e.model_name not in STUDENT_MODELS:
            raise
    if weights == "ema":
        raise UsageError(f"{checkpoint}: is a student training checkpoint, which has no EMA weights; drop "
                         "--weights ema")
    from .export import pick_modality, student_as_d2v, teacher_settings
    from .models._student import load_student

    student = load_student(checkpoint, trust_checkpoint=trust_checkpoint)
    modality = pick_modality(student, modality, checkpoint)
    model = student_as_d2v(student, modality).to(device)
    model.fairseq_task_cfg = teacher_settings(student, modality)
    return model


def extract(checkpoint, inputs, output, weights: str = "model", device: str = "cpu", batch_size: int = 64,
            trust_checkpoint: bool = False, padding_mask=None, modality: Optional[str] = None) -> Path:
    """Write the teacher outputs for ``inputs`` to ``output`` (see module docstring).

    Args:
        inputs: a ``.npy`` path, or a list of audio file paths (audio checkpoints only).
        padding_mask: optional ``.npy`` path of the padding mask (not with audio files).

    Raises:
        CheckpointError: the checkpoint cannot be used as a data2vec 2.0 teacher.
        UsageError: missing or malformed input, unwritable output, unavailable device.
    """
    files = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    output = Path(output)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available; use --device cpu")
    audio_files = all(f.suffix.lower() in AUDIO_EXTENSIONS for f in files)
    if not audio_files and len(files) > 1:
        raise UsageError(f"--input takes one .npy array or audio files ({', '.join(AUDIO_EXTENSIONS)}), got "
                         f"{' '.join(map(str, files))}")
    if audio_files and padding_mask is not None:
        raise UsageError("--padding-mask goes with a .npy input; audio files are padded (and masked) by the tool")
    for f in files:  # cheap checks first: loading a large checkpoint takes a while
        if not f.exists():
            raise UsageError(f"{f}: input file not found")
    if not output.parent.is_dir():
        raise UsageError(f"{output}: its directory {output.parent} does not exist")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; pass the path of the .npz file to write")

    model = load_model(checkpoint, weights=weights, device=device, trust_checkpoint=trust_checkpoint,
                       modality=modality)
    if audio_files:
        if model.cfg.modality != "audio":
            raise UsageError(f"audio files given, but {checkpoint} is a {model.cfg.modality} model; pass a .npy input")
        normalize = bool(model.fairseq_task_cfg.get("normalize", False))
        array, mask = read_audio_files(files, normalize, model.cfg.encoder.receptive_field)
        if not mask.any():
            mask = None
    else:
        array = load_inputs(files[0], model)
        mask = load_padding_mask(padding_mask, array, model) if padding_mask is not None else None
    padded = _has_padding(model, array, mask)
    try:
        writer = NpzWriter(output, len(array))
    except OSError as e:
        raise UsageError(f"{output}: cannot write there ({e.strerror})") from None
    try:
        with torch.inference_mode():
            for start in range(0, len(array), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(array[start:start + batch_size])).to(device)
                if model.cfg.modality == "text":
                    batch = batch.long()
                pm = (torch.from_numpy(np.ascontiguousarray(mask[start:start + batch_size])).to(device)
                      if mask is not None else None)
                out = model(batch, pm)
                seq_mask = out["padding_mask"]
                arrays = {"encoder_out": out["encoder_out"]}
                arrays.update({f"layer_results_{i}": t for i, t in enumerate(out["layer_results"])})
                arrays.update({f"block_out_{i}": t for i, t in enumerate(out["block_out"])})
                arrays["targets"] = model.make_targets(out["layer_results"], padding_mask=seq_mask)
                for name, t in arrays.items():
                    writer.write(name, start, t.float().cpu().numpy())
                if padded:
                    if seq_mask is None:
                        seq_mask = torch.zeros(out["encoder_out"].shape[:2], dtype=torch.bool)
                    writer.write("padding_mask", start, seq_mask.cpu().numpy())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return output


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fairseq_mmkd.extract",
                                description="Write a data2vec 2.0 teacher's features and targets to an .npz "
                                            "(image, text or audio checkpoints).")
    p.add_argument("--checkpoint", required=True, help="fairseq data2vec 2.0 checkpoint (.pt)")
    p.add_argument("--input", required=True, nargs="+",
                   help="one .npy: float32 [B, 3, H, W] normalised images, int64 [B, T] token ids, or float32 "
                        "[B, L] 16 kHz samples; or audio files (.wav/.flac/...) for an audio checkpoint")
    p.add_argument("--padding-mask", help="bool .npy [B, T] (text) or [B, L] (audio), True at padding")
    p.add_argument("--output", required=True, help="where to write the .npz")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="online weights (what fine-tuning uses) or the EMA teacher's (default: model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default: 64)")
    p.add_argument("--modality", choices=("image", "text", "audio"),
                   help="which modality of a multimodal checkpoint (an exported multimodal student or a "
                        "d2v_kd_multimodal training checkpoint; default: the checkpoint's own)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = extract(args.checkpoint, args.input, args.output, weights=args.weights, device=args.device,
                      batch_size=args.batch_size, trust_checkpoint=args.trust_checkpoint,
                      padding_mask=args.padding_mask, modality=args.modality)
    except (CheckpointError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_COMMAND
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory with --batch-size {args.batch_size}; lower it", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
