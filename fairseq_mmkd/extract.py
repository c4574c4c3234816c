"""Dump what a data2vec 2.0 teacher computes for a set of images: ``python -m fairseq_mmkd.extract``.

Distillation is only as good as its targets, and the plugin computes them with its own re-implementation
of fairseq's ``Data2VecMultiModel``. This tool writes every intermediate distillation uses to one ``.npz``
so it can be checked against fairseq's own outputs (the parity tests do exactly that), inspected, or
cached::

    python -m fairseq_mmkd.extract --checkpoint base_imagenet.pt --input images.npy --output feats.npz \\
        [--weights model|ema] [--device cpu|cuda] [--batch-size 64] [--trust-checkpoint]

``images.npy``: float32 ``[B, 3, H, W]``, already normalised (ImageNet mean/std), ``H = W`` = the
checkpoint's input size. The ``.npz`` holds ``encoder_out`` (the sequence entering the first shared
block), ``layer_results_<i>`` (block i's target: FFN output, or block output with
``end_of_block_targets``) and ``block_out_<i>`` (residual stream after block i), all ``[B, T, D]`` with
the extra (CLS) tokens first, and ``targets`` ``[B, T - extra, D]``, built with the checkpoint's own
target settings. Everything is float32.

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

import numpy as np
import torch

from .checkpoint import CheckpointError, load_d2v_image

EXIT_BAD_COMMAND = 2


class UsageError(Exception):
    """A problem with the command line or its input files, reported without a traceback."""


def load_images(path, model) -> np.ndarray:
    """Memory-map ``path`` and check it is what ``model`` takes: float32 ``[B, C, S, S]``, ``B >= 1``."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: input file not found")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; pass a .npy file of images")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path}: not a readable .npy array ({e}); save the images with numpy.save") from None
    if not isinstance(images, np.ndarray):  # np.load opens .npz archives as a mapping
        raise UsageError(f"{path}: is an .npz archive; pass a single array saved with numpy.save (.npy)")
    if images.dtype != np.float32:
        raise UsageError(f"{path}: images must be float32 (normalised pixels), got {images.dtype}; "
                         "convert with images.astype(numpy.float32)")
    try:
        model.encoder.check_input(torch.empty(images.shape, device="meta"))
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
    if images.shape[0] == 0:
        raise UsageError(f"{path}: contains no images (batch dimension is 0)")
    return images


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
        partial = Path(self._tmp.name) / "out.npz"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in self._arrays.items():
                arr.flush()
                zf.write(arr.filename, arcname=f"{name}.npy")
        self._arrays.clear()
        os.replace(partial, self.path)
        self._tmp.cleanup()

    def abort(self) -> None:
        self._arrays.clear()
        self._tmp.cleanup()


def extract(checkpoint, images_path, output, weights: str = "model", device: str = "cpu",
            batch_size: int = 64, trust_checkpoint: bool = False) -> Path:
    """Write the teacher outputs for the images in ``images_path`` to ``output`` (see module docstring).

    Raises:
        CheckpointError: the checkpoint cannot be used as a data2vec 2.0 image teacher.
        UsageError: missing or malformed input, unwritable output, unavailable device.
    """
    images_path, output = Path(images_path), Path(output)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available; use --device cpu")
    if not images_path.exists():  # cheap checks first: loading a large checkpoint takes a while
        raise UsageError(f"{images_path}: input file not found")
    if not output.parent.is_dir():
        raise UsageError(f"{output}: its directory {output.parent} does not exist")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; pass the path of the .npz file to write")

    model = load_d2v_image(checkpoint, weights=weights, device=device, trust_checkpoint=trust_checkpoint)
    images = load_images(images_path, model)
    try:
        writer = NpzWriter(output, len(images))
    except OSError as e:
        raise UsageError(f"{output}: cannot write there ({e.strerror})") from None
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
                out = model(batch)
                arrays = {"encoder_out": out["encoder_out"]}
                arrays.update({f"layer_results_{i}": t for i, t in enumerate(out["layer_results"])})
                arrays.update({f"block_out_{i}": t for i, t in enumerate(out["block_out"])})
                arrays["targets"] = model.make_targets(out["layer_results"])
                for name, t in arrays.items():
                    writer.write(name, start, t.float().cpu().numpy())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return output


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fairseq_mmkd.extract",
                                description="Write a data2vec 2.0 image teacher's features and targets to an .npz.")
    p.add_argument("--checkpoint", required=True, help="fairseq data2vec 2.0 image checkpoint (.pt)")
    p.add_argument("--input", required=True, help="float32 [B, 3, H, W] normalised images (.npy)")
    p.add_argument("--output", required=True, help="where to write the .npz")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="online weights (what fine-tuning uses) or the EMA teacher's (default: model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = extract(args.checkpoint, args.input, args.output, weights=args.weights, device=args.device,
                      batch_size=args.batch_size, trust_checkpoint=args.trust_checkpoint)
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
