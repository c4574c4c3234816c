"""The checkpoint folder: one training run at a time, and a finished run left alone when it is rerun.

Schedulers rerun commands that had already finished and sometimes start a second copy while the first still
runs. Stock fairseq-fixed 0.12.3.1, rerun on a finished run, loads ``checkpoint_last.pt``, trains one more
update and overwrites ``checkpoint_last.pt`` and ``checkpoint_best.pt`` (every further rerun adds another);
two runs on one folder overwrite each other's checkpoints. :func:`claim` runs first thing in the task's
``setup_task``, on every worker, before the teacher or any data is loaded, and decides on rank 0 (the
decision is broadcast so all workers act alike):

1. **Finished**: ``checkpoint_last.pt`` is at or past ``optimization.max_update``, past
   ``optimization.max_epoch`` or over ``optimization.stop_time_hours``: one log line says the run is
   complete and where its checkpoints are, and the process exits with status 0 (:class:`RunComplete`)
   without taking the lock, training, validating or writing anything. Raising the limit on the command line
   continues the run as before. Only the counters are read (``torch.load(mmap=True)``), not the weights.
2. **In use**: rank 0 takes an exclusive ``flock`` on ``SAVE_DIR/run.lock`` and keeps it for the life of
   the process. The operating system releases it when the process ends, however it ends (SIGKILL and the
   OOM killer included), so a stale lock cannot exist. If another process holds it, this one stops with one
   line naming the folder and the holder (pid, host, start time, which the holder writes into the file) and
   exit status 1 (:class:`SaveDirInUse`). Filesystems without ``flock`` support get a warning, not a refusal.
3. Only then, holding the lock, partial ``checkpoint*.pt.tmp`` files of a killed run are deleted (never
   while another run might be writing them).

Hydra writes ``hydra.run.dir`` (``SAVE_DIR/hydra`` in ``config/kd_image.yaml``) before fairseq or this
plugin runs: it rewrites ``SAVE_DIR/hydra/.hydra/*.yaml`` with the launch's configuration and appends the
launch's log lines, this decision included, to ``SAVE_DIR/hydra/hydra_train.log``. Everything else in the
folder is untouched by a finished or refused launch.

Ending the process is a ``SystemExit`` (:class:`~fairseq_mmkd.runtime.guards.EndRun`): neither fairseq nor Hydra
catches it, so the launch ends with its one line and no traceback. In a Hydra multirun (``-m``) sweep, which
runs its jobs in one process, that also ends the jobs after it (not tested; sweeps are not a documented use).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Optional

import torch

from .guards import EndRun, SaveDirError, remove_partial_checkpoints

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_held: dict = {}  # absolute lock path -> open file descriptor, for the life of the process


class RunComplete(EndRun):
    """The run in ``checkpoint.save_dir`` already reached its limits: nothing to do (exit status 0)."""

    def __init__(self, message: str):
        super().__init__(message, code=0)


class SaveDirInUse(EndRun):
    """Another live process trains in the same ``checkpoint.save_dir`` (exit status 1)."""

    def __init__(self, message: str):
        super().__init__(message, code=1)


# ----------------------------------------------------------------------------------------------------------
# a finished run


def read_progress(path: str) -> Optional[dict]:
    """Counters of a fairseq training checkpoint without reading its weights (memory-mapped), or ``None``
    when the file is missing or unreadable (then fairseq's own loading reports the problem)."""
    from ..d2v.loading import _allowed_globals

    if not os.path.isfile(path):
        return None
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        extra = state.get("extra_state") or {}
        return {"num_updates": int(state["optimizer_history"][-1]["num_updates"]),
                "next_epoch": int(extra["train_iterator"]["epoch"]),
                "training_time": float(extra.get("previous_training_time") or 0.0)}
    except Exception as e:  # noqa: BLE001  (any problem: leave the decision to fairseq's loader)
        logger.warning(f"could not read the progress of {path} ({type(e).__name__}: {e}); fairseq will load it")
        return None


def completion(progress: dict, max_update: int = 0, max_epoch: int = 0, stop_time_hours: float = 0.0) -> Optional[str]:
    """Why a run at ``progress`` (see :func:`read_progress`) would stop before its next update, with the
    limits as fairseq's ``train.py`` applies them (0 = no limit); ``None`` when it would train on."""
    updates = progress["num_updates"]
    if max_update and updates >= max_update:
        return f"it is at update {updates} of optimization.max_update={max_update}"
    if max_epoch and progress["next_epoch"] > max_epoch:  # train.py: while epoch_itr.next_epoch_idx <= max_epoch
        return f"it finished epoch {progress['next_epoch'] - 1} of optimization.max_epoch={max_epoch} (update {updates})"
    hours = progress["training_time"] / 3600
    if stop_time_hours and stop_time_hours > 0 and hours > stop_time_hours:
        return (f"it trained {hours:.2f} h of optimization.stop_time_hours={stop_time_hours:g} "
                f"(update {updates})")
    return None


def finished_message(cfg) -> Optional[str]:
    """The one line for a rerun of a finished run, or ``None`` when this launch trains (or resets)."""
    ck, opt = cfg.checkpoint, cfg.optimization
    if ck.restore_file != "checkpoint_last.pt" or ck.reset_optimizer or ck.reset_dataloader:
        return None  # fairseq starts from elsewhere or resets its counters: the limits mean something new
    last = os.path.join(ck.save_dir, f"checkpoint_last{ck.get('checkpoint_suffix', '') or ''}.pt")
    progress = read_progress(last)
    if progress is None:
        return None
    why = completion(progress, max_update=opt.max_update or 0, max_epoch=opt.max_epoch or 0,
                     stop_time_hours=opt.get("stop_time_hours", 0) or 0)
    if why is None:
        return None
    folder = os.path.abspath(ck.save_dir)
    names = sorted(n for n in os.listdir(folder) if n.startswith("checkpoint") and n.endswith(".pt"))
    return (f"run already complete, nothing to do: {os.path.join(folder, os.path.basename(last))} says {why}. "
            f"Its checkpoints are in {folder} ({', '.join(names)}). To train further, raise that limit on the "
            "command line (e.g. optimization.max_update=N)")


# ----------------------------------------------------------------------------------------------------------
# one run per folder


def _holder_text(fd: int) -> str:
    """What the holder wrote into the lock file, as words (it may not have written it yet)."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if raw:
            try:
                h = json.loads(raw)
                return f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}"
            except (ValueError, AttributeError):
                return raw.splitlines()[0][:200]
        time.sleep(0.05)  # it locks first and writes right after
    return "a process that has not written its details yet"


def take_lock(save_dir: str) -> Optional[int]:
    """Lock ``SAVE_DIR/run.lock`` for this process and write who holds it; returns the descriptor (``None``
    where the filesystem has no ``flock``). Raises :class:`SaveDirInUse` or :class:`SaveDirError`."""
    path = os.path.abspath(os.path.join(save_dir, LOCK_NAME))
    if path in _held:
        return _held[path]
    try:
        os.makedirs(save_dir, exist_ok=True)  # fairseq's train.py made it already; a trainer built in Python may not
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SaveDirError(f"checkpoint.save_dir={save_dir} is not a writable folder ({type(e).__name__}: "
                           f"{e.strerror or e}); pass a folder you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_text(fd)
        os.close(fd)
        raise SaveDirInUse(f"checkpoint.save_dir={os.path.abspath(save_dir)} is in use by another training run "
                           f"({holder}; see {path}): wait for it to finish or stop it, or pass another "
                           "checkpoint.save_dir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.close(fd)
        logger.warning(f"{path}: this filesystem does not support file locks ({e.strerror}); a second run started "
                       "on the same checkpoint.save_dir would not be detected")
        return None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise SaveDirError(f"checkpoint.save_dir={save_dir}: cannot write {LOCK_NAME} ({e.strerror}); "
                           "free space or pass a folder you can write to") from None
    _held[path] = fd
    return fd


def _close_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) must not keep the lock alive after its parent died."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


# ----------------------------------------------------------------------------------------------------------
# the decision, on every worker


def _decide(cfg) -> tuple:
    """On rank 0: ("train", None), ("complete", line), ("in_use", line) or ("error", line)."""
    save_dir = cfg.checkpoint.save_dir
    try:
        done = finished_message(cfg)
        if done:
            return "complete", done
        take_lock(save_dir)
        remove_partial_checkpoints(save_dir)  # safe now: no other run can be writing them
        return "train", None
    except SaveDirInUse as e:
        return "in_use", e.message
    except SaveDirError as e:
        return "error", str(e)


def _world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def claim(cfg) -> None:
    """Decide whether this launch may train in ``cfg.checkpoint.save_dir`` (the full fairseq config); returns
    when it may, raises :class:`RunComplete`, :class:`SaveDirInUse` or :class:`SaveDirError` otherwise."""
    rank, world = _world()
    decision = [_decide(cfg) if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    kind, line = decision[0]
    if kind == "train":
        return
    if kind == "error":
        raise SaveDirError(line)
    if rank == 0:
        (logger.info if kind == "complete" else logger.error)(line)
    raise RunComplete(line) if kind == "complete" else SaveDirInUse(line)


def full_config(task_cfg):
    """The whole fairseq config a task's config belongs to (fairseq keeps the task node attached to it,
    ``merge_with_parent``, so that interpolations resolve), or ``None`` for a stand-alone task config."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(task_cfg):
        return None
    root = task_cfg._get_root()
    if root is task_cfg or "checkpoint" not in root or "optimization" not in root:
        return None
    return root


__all__ = ["LOCK_NAME", "RunComplete", "SaveDirInUse", "claim", "completion", "finished_message", "full_config",
           "read_progress", "take_lock"]
