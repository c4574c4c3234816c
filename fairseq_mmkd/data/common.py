"""What every training data pipeline shares: per-sample seeds that survive workers and resumes, an epoch
that persistent DataLoader workers see, and the bookkeeping that skips, counts and limits bad files."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, *indices: int) -> int:
    """A 62-bit generator seed for ``(seed, epoch, indices)``: the same in any process and after a resume."""
    words = [int(w) & 0xFFFFFFFFFFFFFFFF for w in (seed, epoch, *indices)]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SharedEpoch:
    """The current epoch in shared memory: ``set_epoch`` in the trainer is seen by DataLoader workers, also by
    persistent ones (which fairseq keeps across epochs)."""

    def __init__(self):
        self._epoch = torch.ones(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)


class BadFiles:
    """Counts unreadable files, logs each once, and stops when there are too many.

    Counters are per process (with DataLoader workers they live in the workers, which is why samples also
    carry how many files they skipped). Once at least ``min_attempts`` reads were tried and ``min_bad`` of
    them failed, a failure rate above ``max_fraction`` raises ``error_cls``; so does a number of distinct bad
    files above ``max_fraction * total`` (certain regardless of sampling, which catches small datasets). The
    two thresholds keep a rare bad file early in an epoch from stopping training.

    Args:
        total: files in the data set.
        max_fraction: largest tolerated fraction of unreadable files (0 stops at the first one).
        what: the noun used in messages ("audio file").
        error_cls: the exception raised when there are too many.
        setting: the configuration setting that sets ``max_fraction`` (named in the message).
    """

    min_attempts = 50
    min_bad = 10

    def __init__(self, total: int, max_fraction: float, what: str, error_cls: type, setting: str):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"{setting}={max_fraction} must be within [0, 1]")
        self.total, self.max_fraction, self.what = int(total), float(max_fraction), what
        self.error_cls, self.setting = error_cls, setting
        self.num_bad = 0
        self.num_attempts = 0
        self.paths: set[str] = set()

    def ok(self) -> None:
        self.num_attempts += 1

    def failed(self, path: str, reason: Optional[str]) -> None:
        """A read of ``path`` failed (``reason`` None: it is a known bad file, skipped without reading)."""
        self.num_bad += 1
        self.num_attempts += 1
        if reason is not None and path not in self.paths:
            self.paths.add(path)
            logger.warning("skipping unreadable %s %s (%s); using the next one instead", self.what, path, reason)
        limit = self.max_fraction
        too_many_files = len(self.paths) > limit * self.total
        too_high_rate = (self.num_attempts >= min(self.min_attempts, self.total)
                         and self.num_bad >= min(self.min_bad, self.total)
                         and self.num_bad > limit * self.num_attempts)
        if too_many_files or too_high_rate:
            examples = ", ".join(repr(p) for p in sorted(self.paths)[:5])
            raise self.error_cls(
                f"too many unreadable {self.what}s: {self.num_bad} of {self.num_attempts} reads failed "
                f"({len(self.paths)} distinct files of {self.total}), more than {self.setting}={limit}; e.g. "
                f"{examples}. Remove or re-encode the bad files (or fix the list), or raise {self.setting} if "
                "losing them is acceptable")
