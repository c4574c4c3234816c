"""The checkpoint folder as schedulers treat it: a finished run rerun, two runs on one folder, a full disk.

All launches are the real ``fairseq-hydra-train`` (preset=tiny). The save folder holds Hydra's own folder
too (``hydra.run.dir: ${checkpoint.save_dir}/hydra``), which Hydra writes before fairseq or the plugin runs:
the rerun test checks everything else byte for byte (and its modification times), and says exactly what
Hydra changes in its folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, REPO, hydra_train

NO_RETRIEVAL = ["task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                "checkpoint.maximize_best_checkpoint_metric=false"]
LOADED = re.compile(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)")


def run_args(teacher, photos, max_update) -> list:
    # the cosine length is pinned, so that raising max_update continues the same schedule
    return [f"task.data={photos}", f"model.teacher_checkpoint={teacher}", *NO_RETRIEVAL,
            f"optimization.max_update={max_update}", "lr_scheduler.max_update=1000"]


def updates_in(path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["optimizer_history"][-1]["num_updates"])


def tree(folder: Path) -> dict:
    """Every file below ``folder``: {relative path: (bytes, mtime_ns)}."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher, photo_folder):
    """A save folder whose run finished at optimization.max_update=4 (mid-epoch 2: 3 updates per epoch)."""
    save = tmp_path_factory.mktemp("finished") / "ckpt"
    hydra_train(save, *run_args(tiny_teacher, photo_folder, 4))
    assert updates_in(save / "checkpoint_last.pt") == 4
    return save


@pytest.fixture
def reused(tmp_path, finished):
    save = tmp_path / "ckpt"
    shutil.copytree(finished, save)  # copy2: contents and modification times
    return save


# ---- 1. reruns ---------------------------------------------------------------------------------------------


def test_rerunning_a_finished_run_changes_nothing_and_raising_max_update_continues(reused, finished, tiny_teacher,
                                                                                  photo_folder):
    save = reused
    before, folder_mtime = tree(save), save.stat().st_mtime_ns
    for launch in range(2):
        proc = hydra_train(save, *run_args(tiny_teacher, photo_folder, 4))
        out = proc.stdout + proc.stderr
        lines = [line for line in out.splitlines() if "run already complete" in line]
        assert len(lines) == 1, out[-3000:]
        assert (f"{save}/checkpoint_last.pt says it is at update 4 of optimization.max_update=4" in lines[0]
                and f"Its checkpoints are in {save} (checkpoint_best.pt, checkpoint_last.pt)" in lines[0]), lines[0]
        for work in ("num. shared model params", "Loaded checkpoint", "begin training", "begin validation",
                     "Saving checkpoint"):
            assert work not in out, f"launch {launch + 2} did {work!r}"
        after = tree(save)
        outside_hydra = {k for k in after if not k.startswith("hydra/")}
        assert outside_hydra == {k for k in before if not k.startswith("hydra/")} == \
            {"checkpoint_best.pt", "checkpoint_last.pt", "run.lock"}
        for name in outside_hydra:  # same bytes, never rewritten
            assert after[name] == before[name], f"{name} changed"
        assert save.stat().st_mtime_ns == folder_mtime, "a file was created or removed in the save folder"
        # Hydra's folder: its copies of the configuration are rewritten with the launch's (the same; the
        # first rerun runs in a copy of the finished folder, so its save_dir differs), and the launch's log
        # lines, the "complete" line among them, are appended to its log
        assert set(after) == set(before)
        for name in (k for k in after if k.startswith("hydra/.hydra/")):
            expected = before[name][0].replace(str(finished).encode(), str(save).encode())
            assert after[name][0] == expected, name
        old_log, new_log = before["hydra/hydra_train.log"][0], after["hydra/hydra_train.log"][0]
        assert new_log.startswith(old_log) and b"run already complete" in new_log[len(old_log):]
        before = after

    proc = hydra_train(save, *run_args(tiny_teacher, photo_folder, 6))
    out = proc.stdout + proc.stderr
    loaded = LOADED.search(out)
    assert loaded and loaded.group(1) == f"{save}/checkpoint_last.pt" and loaded.group(2) == "4", out[-3000:]
    assert "run already complete" not in out
    assert updates_in(save / "checkpoint_last.pt") == 6


def test_completion_follows_fairseqs_stopping_rules(finished):
    """max_update, max_epoch and stop_time_hours as fairseq's train.py applies them, on a real checkpoint."""
    from fairseq_mmkd.runtime.save_dir import completion, read_progress

    progress = read_progress(str(finished / "checkpoint_last.pt"))
    assert progress["num_updates"] == 4 and progress["next_epoch"] == 2  # update 4 is mid-epoch 2
    assert completion(progress, max_update=4) == "it is at update 4 of optimization.max_update=4"
    assert completion(progress, max_update=5) is None
    assert completion(progress, max_update=0) is None  # 0: no limit
    assert completion(progress, max_epoch=1) == "it finished epoch 1 of optimization.max_epoch=1 (update 4)"
    assert completion(progress, max_epoch=2) is None  # epoch 2 is not finished
    assert completion({**progress, "training_time": 7200.0}, stop_time_hours=1.5).startswith("it trained 2.00 h")
    assert completion({**progress, "training_time": 7200.0}, stop_time_hours=3) is None
    assert read_progress(str(finished / "missing.pt")) is None


def test_a_run_finished_by_max_epoch_or_reset_counters(finished, tmp_path):
    """The decision itself (what setup_task calls): complete by epoch exits 0 and creates nothing; a launch
    that resets fairseq's counters or restores another file trains."""
    from omegaconf import OmegaConf

    from fairseq_mmkd.runtime import save_dir

    folder = tmp_path / "ckpt"
    shutil.copytree(finished, folder)
    (folder / "run.lock").unlink()

    def cfg(**checkpoint):
        return OmegaConf.create({"checkpoint": {"save_dir": str(folder), "restore_file": "checkpoint_last.pt",
                                                "reset_optimizer": False, "reset_dataloader": False, **checkpoint},
                                 "optimization": {"max_update": 0, "max_epoch": 1}})

    with pytest.raises(save_dir.RunComplete) as info:
        save_dir.claim(cfg())
    assert info.value.code == 0 and "finished epoch 1 of optimization.max_epoch=1" in str(info.value)
    assert not (folder / "run.lock").exists(), "a finished run takes no lock and writes nothing"
    assert save_dir.finished_message(cfg(reset_optimizer=True)) is None
    assert save_dir.finished_message(cfg(restore_file=str(folder / "checkpoint_best.pt"))) is None


# ---- 2. one run per folder ---------------------------------------------------------------------------------


def start(save, args, log: Path) -> subprocess.Popen:
    cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", "config", "--config-name", "kd_image", "preset=tiny",
           f"checkpoint.save_dir={save}", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_concurrent_starts_one_trains_and_a_start_after_it_was_killed_resumes(tmp_path, reused, tiny_teacher,
                                                                                   photo_folder):
    save = reused
    args = run_args(tiny_teacher, photo_folder, 100_000)
    logs = [tmp_path / "a.out", tmp_path / "b.out"]
    procs = [start(save, args, log) for log in logs]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), 180, "one of the two starts to end")
        refused = next(i for i, p in enumerate(procs) if p.poll() is not None)
        holder = procs[1 - refused]
        out = logs[refused].read_text()
        assert procs[refused].returncode == 1, out[-3000:]
        lines = [line for line in out.splitlines() if "is in use by another training run" in line]
        assert len(lines) == 1, out[-3000:]
        assert f"checkpoint.save_dir={save} " in lines[0]
        assert f"(pid {holder.pid} on host {socket.gethostname()}, started " in lines[0], lines[0]
        assert "Traceback" not in out
        assert "num. shared model params" not in out, "refused before the teacher was loaded"
        wait_for(lambda: "Saved checkpoint" in logs[1 - refused].read_text(), 180, "the holder to train and save")
        assert holder.poll() is None, "the holder trains on"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the session each launch created: the run and nothing else
            p.wait()
    assert holder.returncode == -signal.SIGKILL

    # the operating system released the killed holder's lock: the next start takes it and resumes
    resume_from = updates_in(save / "checkpoint_last.pt")
    assert resume_from > 4, "the holder trained and saved before it was killed"
    proc = hydra_train(save, *run_args(tiny_teacher, photo_folder, resume_from + 2))
    out = proc.stdout + proc.stderr
    loaded = LOADED.search(out)
    assert loaded and int(loaded.group(2)) == resume_from, out[-3000:]
    assert "in use by another" not in out
    assert updates_in(save / "checkpoint_last.pt") == resume_from + 2
    lock = json.loads((save / "run.lock").read_text())
    assert lock["pid"] != holder.pid and lock["host"] == socket.gethostname()


# ---- 3. a full disk ----------------------------------------------------------------------------------------


def test_a_checkpoint_write_that_fails_part_way_keeps_the_previous_checkpoints(reused, tiny_teacher, photo_folder):
    """The resumed run's first save (checkpoint_last.pt at the end of epoch 2, update 6) fails halfway: a
    file-size limit (``ulimit -f``, RLIMIT_FSIZE) makes the write fail with EFBIG once the file reaches half
    a checkpoint, as a full disk fails it with ENOSPC."""
    save = reused
    before = {p.name: p.read_bytes() for p in save.glob("*.pt")}
    size = len(before["checkpoint_last.pt"])
    blocks = size // 2 // 1024  # bash's ulimit -f counts 1024-byte blocks
    limited = ("bash", "-c", f'ulimit -f {blocks} && exec "$@"', "limited")
    proc = hydra_train(save, *run_args(tiny_teacher, photo_folder, 8), launcher=limited, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    lines = [line for line in out.splitlines() if "stopping: could not write checkpoint" in line]
    assert len(lines) == 1, out[-3000:]
    assert f"could not write checkpoint {save}/checkpoint_last.pt: File too large" in lines[0], lines[0]
    needed = re.search(r"It needs ([\d.]+) KB", lines[0])
    assert needed and abs(float(needed.group(1)) * 1000 - size) < 0.02 * size, lines[0]
    assert "Traceback" not in out
    assert '"num_updates": "5"' in out, "it trained on after update 4 and failed at the save"

    assert not list(save.glob("*.tmp")), "the partial file was removed"
    assert {p.name: p.read_bytes() for p in save.glob("*.pt")} == before
    assert updates_in(save / "checkpoint_last.pt") == updates_in(save / "checkpoint_best.pt") == 4  # loadable


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_no_space_left_while_writing_or_copying_a_checkpoint(tmp_path):
    """ENOSPC itself: the ``.tmp`` file a checkpoint goes through is made a link to /dev/full, where every
    write fails with 'No space left on device'. Both ways fairseq produces a checkpoint file are covered:
    ``torch_persistent_save`` (the first file of a save) and ``PathManager.copy`` (checkpoint_last/best)."""
    import fairseq_mmkd  # noqa: F401  (installs the guards, as fairseq's --user-dir import does)
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    from fairseq_mmkd.runtime.guards import CheckpointWriteError

    previous = tmp_path / "checkpoint_last.pt"
    torch.save({"num_updates": 4}, previous)
    old = previous.read_bytes()
    state = {"num_updates": 8, "w": torch.randn(256, 256)}
    newer = tmp_path / "checkpoint_2_8.pt"
    torch.save(state, newer)
    for write in (lambda: checkpoint_utils.torch_persistent_save(state, str(previous)),
                  lambda: PathManager.copy(str(newer), str(previous), overwrite=True)):
        os.symlink("/dev/full", tmp_path / "checkpoint_last.pt.tmp")
        with pytest.raises(CheckpointWriteError) as info:
            write()
        assert info.value.code == 1
        msg = str(info.value)
        assert f"could not write checkpoint {previous}: No space left on device" in msg, msg
        assert re.search(r"It needs 26\d\.\d KB", msg), msg  # 256 x 256 float32 = 262 KB
        assert not os.path.lexists(tmp_path / "checkpoint_last.pt.tmp"), "the partial file was removed"
        assert previous.read_bytes() == old
    checkpoint_utils.torch_persistent_save(state, str(previous))  # with room: written whole, no .tmp left
    assert torch.load(previous, weights_only=True)["num_updates"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2_8.pt", "checkpoint_last.pt"]


def test_a_filesystem_without_file_locks_warns_and_trains(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from fairseq_mmkd.runtime import save_dir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="fairseq_mmkd.runtime.save_dir"):
        assert save_dir.take_lock(str(tmp_path)) is None
    assert "does not support file locks (No locks available); a second run started on the same " \
           "checkpoint.save_dir would not be detected" in caplog.text
