"""Atomic file writes, the one helper every writer of the package uses (checkpoints, exports, JSON records, feature
archives): a reader, or a run killed halfway, only ever sees the old file or the complete new one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yields ``<path>.tmp`` (same folder) to be written; then fsyncs it and renames it over ``path``, durable before
    it replaces the old file (power loss included). On any error, or an interrupt, the ``.tmp`` is removed and the
    exception propagates; ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """``atomic_path`` for writers of an open file: yields ``<path>.tmp`` opened with ``mode``."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path, obj) -> Path:
    """``obj`` as indented JSON in ``path``, atomically."""
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    return Path(path)


def atomic_copy(src, dst) -> None:
    """Copy ``src`` onto ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
