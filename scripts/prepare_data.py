#!/usr/bin/env python
"""Download CIFAR-10 and CIFAR-100 (python versions) for retrieval validation and print how to use them.

    python scripts/prepare_data.py --cifar ~/data/cifar

torchvision downloads each archive once, checks its MD5 and extracts it, giving
``DIR/cifar-10-batches-py/`` and ``DIR/cifar-100-python/``, the layout ``fairseq_mmkd.retrieval.load_cifar``
reads. Running it again only re-checks the files. Needs internet access (www.cs.toronto.edu).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Download CIFAR-10/100 (python layout) for zero-shot retrieval "
                                            "validation, then print the training overrides and evaluator command.")
    p.add_argument("--cifar", metavar="DIR", required=True,
                   help="directory to put cifar-10-batches-py/ and cifar-100-python/ in (created if missing)")
    p.add_argument("--remove-archives", action="store_true",
                   help="delete the downloaded .tar.gz files after extraction (~340 MB); a later run then "
                        "downloads them again")
    return p.parse_args(argv)


def download(root: Path, remove_archives: bool) -> None:
    # Imported here so that --help works without torchvision's import time.
    from torchvision.datasets import CIFAR10, CIFAR100

    for dataset in (CIFAR10, CIFAR100):
        print(f"[prepare] {dataset.__name__}: {dataset.url} -> {root / dataset.base_folder}", flush=True)
        # download=True fetches and extracts the archive unless the extracted files pass their MD5 checks;
        # the constructor then verifies every split file (train and test) again.
        dataset(root=str(root), train=True, download=True)
        if remove_archives:
            (root / dataset.filename).unlink(missing_ok=True)


def verify(root: Path) -> None:
    """Read the first images back through the loader that training and the evaluator use."""
    from fairseq_mmkd.retrieval.sets.cifar import load_cifar

    for name in ("cifar10", "cifar100"):
        data = load_cifar(root, name, limit=8)
        print(f"[prepare] {name}: readable ({data.num_train} + {data.num_test} images checked)")


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.cifar).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        download(root, args.remove_archives)
    except Exception as e:  # no network, disk full, a failed checksum: one line, not a traceback
        print(f"error: downloading CIFAR into {root} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    verify(root)
    print(f"\nCIFAR-10 and CIFAR-100 are ready in {root}\n"
          f"Training (task overrides):\n  task.cifar10_root={root} task.cifar100_root={root}\n"
          f"Standalone evaluation:\n  python -m fairseq_mmkd.retrieval --checkpoint CKPT [--teacher] "
          f"--cifar10 {root} --cifar100 {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
