"""What keeps a long distillation run alive, or stops it with a message that says why.

Crash safety of checkpoint files. fairseq-fixed 0.12.3.1 writes each checkpoint once, atomically
(``torch_persistent_save``: ``<name>.tmp``, then ``os.rename``), but produces ``checkpoint_last.pt`` and
``checkpoint_best.pt`` after an interval save by *copying* ``checkpoint_E_U.pt`` over them in place
(``PathManager.copy`` -> ``shutil.copyfile``). A run killed during that copy (preemption, OOM killer,
Ctrl-C twice) leaves a truncated ``checkpoint_last.pt``, and every restart then fails to load it.
:func:`install_checkpoint_file_guards` (called when the plugin is imported) makes that copy atomic too
(copy to ``<dst>.tmp``, fsync, ``os.replace``) and names the setting when the save dir cannot be created.
Partial ``checkpoint*.pt.tmp`` files of a killed run are removed by :mod:`fairseq_mmkd.save_dir` once the
run holds the folder's lock.

A full disk. When writing a checkpoint fails (no space left, quota exceeded, I/O error, a file-size limit),
stock fairseq retries the same half-written file handle three times, leaves ``<name>.pt.tmp`` behind and
ends with a traceback from inside ``torch.save``. The plugin's ``torch_persistent_save`` and copy remove the
partial file, leave the previous ``checkpoint_last.pt``/``checkpoint_best.pt`` as they were (they are only
ever replaced by a complete, fsynced file), and stop the run with one line saying what failed, how large the
checkpoint is and how much space is free (:class:`CheckpointWriteError`, exit status 1). There is no
"train on without saving" mode: a run that cannot save loses everything at its next preemption; a run
that should not save at all is ``checkpoint.no_save=true``.

Numerical guards. :class:`TrainingGuard` is consulted by the task after every backward pass. A NaN/inf
loss or gradient (on any worker: the decision is all-reduced, so all workers skip together) makes the
update a no-op: gradients zeroed, ``optimizer.step()`` not called (parameters and optimizer state stay
as they were; fairseq still advances the update counter and learning-rate schedule), a warning naming the
likely cause, and ``nonfinite_skipped`` in the training log. After ``max_consecutive_nonfinite`` skipped
updates in a row the run stops with :class:`NonFiniteTrainingError`. A prediction variance below
``min_pred_var`` (representation collapse, as data2vec monitors it) is a warning, not a stop.

With a dynamic loss scaler (``common.fp16``, ``common.amp``) overflowing steps are fairseq's business (it
skips them and lowers the scale), so the guard stands aside there; fp32 and bf16 have no scaler.
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
from typing import Callable, Optional

import torch

from .. import files

logger = logging.getLogger(__name__)

LIKELY_CAUSES = {
    "targets": "the teacher's targets are NaN/inf: a corrupt teacher checkpoint (model.teacher_checkpoint) or "
               "corrupt input images",
    "loss": "the student's prediction is NaN/inf: the learning rate is too high (optimization.lr; a longer "
            "lr_scheduler.warmup_updates helps) or activations overflow in bf16 (common.bf16=true; rerun in fp32 "
            "to check)",
    "grads": "the gradients are NaN/inf although the loss is finite: overflow in the backward pass (bf16) or a "
             "learning rate that is too high",
}


class NonFiniteTrainingError(RuntimeError):
    """The loss or gradients stayed NaN/inf for too many updates in a row."""


class SaveDirError(OSError):
    """``checkpoint.save_dir`` cannot be written."""


class EndRun(SystemExit):
    """Ends the training process with exit status ``code`` once the reason has been logged as one line.

    A ``SystemExit``, so that neither fairseq nor Hydra adds a traceback to a line that already says what
    happened and what to do (a finished run, a folder in use, a full disk); ``str()`` is that line.
    """

    def __init__(self, message: str, code: int = 1):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointWriteError(EndRun):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous ones are intact."""


# ----------------------------------------------------------------------------------------------------------
# checkpoint files


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e``: ``torch.save`` reports a failed ``write`` as a RuntimeError from its zip
    writer, with the OSError as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


class _CountingSink:
    """A write-only file that only counts bytes: the size of a checkpoint without writing it anywhere."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def write_failed(path: str, error: OSError, size: int) -> CheckpointWriteError:
    """The one line for a checkpoint that could not be written, logged; returns the exception to raise."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = "free space unknown"
    hint = {errno.EFBIG: " (a file-size limit: see ulimit -f)", errno.EDQUOT: " (your disk quota)"}.get(error.errno, "")
    msg = (f"stopping: could not write checkpoint {os.path.abspath(path)}: {error.strerror or error}{hint}. "
           f"It needs {_size(size)}, twice that while checkpoint_last.pt/checkpoint_best.pt are replaced ({free}). "
           "The partial file was removed and the previous checkpoints are unchanged: free space (or pass a "
           "checkpoint.save_dir with room) and rerun the same command to resume from checkpoint_last.pt")
    logger.error(msg)
    return CheckpointWriteError(msg)


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is, at every moment, either its old or its new content; a failed copy
    stops the run with :func:`write_failed`'s line."""
    try:
        files.atomic_copy(src, dst)
    except OSError as e:
        raise write_failed(dst, e, os.path.getsize(src)) from None


def save_checkpoint_file(obj, filename: str) -> None:
    """``torch.save`` through ``<filename>.tmp`` (``files.atomic_write``): ``filename`` is never partial, and a failed
    write leaves no ``.tmp`` behind and stops the run with :func:`write_failed`'s line."""
    try:
        with files.atomic_write(filename) as f:
            torch.save(obj, f)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        sink = _CountingSink()
        torch.save(obj, sink)
        raise write_failed(filename, cause, sink.size) from None


def remove_partial_checkpoints(save_dir: str) -> list:
    """Delete ``checkpoint*.pt.tmp`` files: half-written checkpoints of a run that was killed."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(save_dir), "checkpoint*.pt.tmp"))):
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    if removed:
        logger.info(f"removed {len(removed)} partial checkpoint file(s) left by an interrupted run: "
                    f"{', '.join(os.path.basename(p) for p in removed)}")
    return removed


def install_checkpoint_file_guards() -> None:
    """Patch fairseq (once per process): atomic ``PathManager.copy`` for local files, a
    ``torch_persistent_save`` that survives a full disk, and a save-dir check that names the setting."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if not getattr(PathManager.copy, "_mmkd_atomic", False):
        stock_copy = PathManager.copy

        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            remote = PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path)
            if remote or (not overwrite and os.path.exists(dst_path)):
                return stock_copy(src_path, dst_path, overwrite=overwrite)
            atomic_copy(src_path, dst_path)
            return True

        copy._mmkd_atomic = True
        copy.stock = stock_copy
        PathManager.copy = staticmethod(copy)

    if not getattr(checkpoint_utils.torch_persistent_save, "_mmkd_guard", False):
        stock_save = checkpoint_utils.torch_persistent_save

        def torch_persistent_save(obj, filename, async_write: bool = False):
            if async_write or not isinstance(filename, str) or PathManager.path_requires_pathmanager(filename):
                return stock_save(obj, filename, async_write=async_write)
            save_checkpoint_file(obj, filename)

        torch_persistent_save._mmkd_guard = True
        torch_persistent_save.stock = stock_save
        checkpoint_utils.torch_persistent_save = torch_persistent_save

    if not getattr(checkpoint_utils.verify_checkpoint_directory, "_mmkd_guard", False):
        stock_verify = checkpoint_utils.verify_checkpoint_directory

        def verify_checkpoint_directory(save_dir: str) -> None:
            # fairseq's version writes and deletes a file named "dummy" as a write test, which races with a
            # second run starting on the same folder; the write test is taking the folder's lock instead
            # (save_dir.take_lock, in the task's setup_task, right after this).
            try:
                os.makedirs(save_dir, exist_ok=True)
            except OSError as e:
                raise SaveDirError(f"checkpoint.save_dir={save_dir} is not a writable folder "
                                   f"({type(e).__name__}: {e.strerror or e}); pass a folder you can write to") from None

        verify_checkpoint_directory._mmkd_guard = True
        verify_checkpoint_directory.stock = stock_verify
        checkpoint_utils.verify_checkpoint_directory = verify_checkpoint_directory


# ----------------------------------------------------------------------------------------------------------
# numerical guards


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over fairseq's data-parallel workers (identity when training on one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    from fairseq.distributed import utils as dist_utils

    group = dist_utils.get_data_parallel_group()
    if dist_utils.get_world_size(group) <= 1:
        return t
    return dist_utils.all_reduce(t, group, op="max")


def uses_loss_scaler(optimizer) -> bool:
    """fp16 / amp: fairseq's loss scaler already skips overflowing steps (bf16 and fp32 have none)."""
    return getattr(optimizer, "scaler", None) is not None


class TrainingGuard:
    """Skips non-finite updates, stops after too many in a row, warns about collapse.

    Args:
        max_consecutive_nonfinite: stop after this many skipped updates in a row (>= 1; 1 stops at the first).
        min_pred_var: warn when the student's prediction variance falls below this (0: never).
        reduce_max: element-wise max over workers (default: fairseq's data-parallel group).
        collapse_warning_interval: repeat the collapse warning at most once per this many updates.
    """

    def __init__(self, max_consecutive_nonfinite: int = 10, min_pred_var: float = 0.01,
                 reduce_max: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 collapse_warning_interval: int = 1000):
        if int(max_consecutive_nonfinite) < 1:
            raise ValueError(f"criterion.max_consecutive_nonfinite={max_consecutive_nonfinite} must be >= 1 "
                             "(1 stops at the first NaN/inf update)")
        if not min_pred_var >= 0:
            raise ValueError(f"criterion.min_pred_var={min_pred_var} must be >= 0 (0 turns the collapse warning off)")
        self.max_consecutive = int(max_consecutive_nonfinite)
        self.min_pred_var = float(min_pred_var)
        self.reduce_max = reduce_max or all_reduce_max
        self.collapse_warning_interval = collapse_warning_interval
        self.pending_cause: Optional[str] = None  # set by check() for the update being accumulated...
        self.pending_update: Optional[int] = None  # ...which is this one (a stale mark, e.g. after an OOM, is dropped)
        self.consecutive = 0
        self.skipped_total = 0
        self.last_finite_update: Optional[int] = None
        self.last_collapse_warning: Optional[int] = None

    @classmethod
    def from_config(cls, cfg) -> "TrainingGuard":
        return cls(max_consecutive_nonfinite=getattr(cfg, "max_consecutive_nonfinite", 10),
                   min_pred_var=getattr(cfg, "min_pred_var", 0.01))

    def check(self, loss: torch.Tensor, logging_output: dict, model: torch.nn.Module, update_num: int) -> bool:
        """After one micro-batch's backward: True when this update must be skipped (on every worker).

        One small all-reduce and one device sync per micro-batch; the trainer syncs per step anyway.
        """
        def as_tensor(x):
            return x.detach().float().reshape(()) if torch.is_tensor(x) else torch.tensor(float(x))

        device = loss.device if torch.is_tensor(loss) else torch.device("cpu")
        zero = torch.zeros((), device=device)
        loss_bad = (~torch.isfinite(as_tensor(loss).to(device))).float()
        target_var = logging_output.get("target_var")
        targets_bad = (~torch.isfinite(as_tensor(target_var).to(device))).float() if target_var is not None else zero
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads).float().to(device) if grads else zero
        grads_bad = (~torch.isfinite(grad_norm)).float()
        nsamples = float(logging_output.get("nsentences", 0) or 0)
        pred_var = logging_output.get("pred_var")
        pred_var = (as_tensor(pred_var).to(device) / nsamples) if pred_var is not None and nsamples else zero - 1
        # max over workers: any worker's NaN skips everywhere; collapse only when every worker's batch is low
        stats = self.reduce_max(torch.stack([targets_bad, loss_bad, grads_bad, pred_var.nan_to_num(-1.0)]))
        targets_bad, loss_bad, grads_bad, pred_var = stats.tolist()
        cause = "targets" if targets_bad else "loss" if loss_bad else "grads" if grads_bad else None
        if self.pending_update != update_num:
            self.pending_cause, self.pending_update = None, update_num
        if cause:
            self.pending_cause = self.pending_cause or cause
            return True
        if self.min_pred_var > 0 and 0 <= pred_var < self.min_pred_var:
            self._warn_collapse(pred_var, update_num + 1)
        return False

    def end_update(self, update_num: int) -> bool:
        """At the optimizer step of update ``update_num + 1``: True when it is skipped; raises after too many."""
        cause = self.pending_cause if self.pending_update == update_num else None
        self.pending_cause = self.pending_update = None
        if cause is None:
            self.consecutive = 0
            self.last_finite_update = update_num + 1
            return False
        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive >= self.max_consecutive:
            others = [LIKELY_CAUSES[c] for c in LIKELY_CAUSES if c != cause]
            last = (f"the last finite update was {self.last_finite_update}" if self.last_finite_update is not None
                    else "no update of this run was finite")
            msg = (f"stopping: the loss or gradients were NaN/inf in {self.consecutive} consecutive updates "
                   f"(criterion.max_consecutive_nonfinite={self.max_consecutive}; {last}). Most likely cause: "
                   f"{LIKELY_CAUSES[cause]}. Other possible causes: {'; '.join(others)}. The skipped updates changed "
                   "no weights, but the weights may have diverged before them: fix the cause and resume from a "
                   "checkpoint saved before the problem began.")
            logger.error(msg)
            raise NonFiniteTrainingError(msg)
        logger.warning(f"update {update_num + 1} skipped ({self.consecutive} in a row; the run stops at "
                       f"{self.max_consecutive}): {LIKELY_CAUSES[cause]}")
        return True

    def _warn_collapse(self, pred_var: float, update: int) -> None:
        last = self.last_collapse_warning
        if last is not None and update - last < self.collapse_warning_interval:
            return
        self.last_collapse_warning = update
        logger.warning(f"update {update}: prediction variance pred_var={pred_var:.4g} is below "
                       f"criterion.min_pred_var={self.min_pred_var:g}: the student may be collapsing to a constant "
                       "output (check pred_var against target_var in the log; a lower learning rate or teacher "
                       "initialisation, model.student_init=teacher_first, usually helps)")


def skipped_logging_output(logging_output: dict) -> dict:
    """What a non-finite micro-batch reports: nothing to the averages (its unreadable files still count)."""
    return {k: (v if k.startswith("bad_") else 0) for k, v in logging_output.items()}
