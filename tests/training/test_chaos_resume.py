"""Crash safety: a training run SIGKILLed at random moments, including halfway through writing a checkpoint,
resumes from the newest intact ``checkpoint_last.pt`` every time and ends exactly where an uninterrupted run
with the same seed ends.

What fairseq-fixed 0.12.3.1 does when it saves (``checkpoint_utils.save_checkpoint``): the first file of
the round is written by ``torch_persistent_save``, atomically (``<name>.tmp``, then ``os.rename``). At an
end-of-epoch save that file is ``checkpoint_last.pt`` itself. At an interval save it is
``checkpoint_E_U.pt``, and ``checkpoint_best.pt`` / ``checkpoint_last.pt`` are then *copied* from it with
``PathManager.copy`` = ``shutil.copyfile``, in place: a kill during that copy leaves a truncated
``checkpoint_last.pt`` and every restart fails to load it. The plugin makes that copy atomic
(``fairseq_mmkd.runtime.guards.install_checkpoint_file_guards``); ``test_checkpoint_copy_is_atomic`` shows both
behaviours. The plugin also writes the first file itself (same ``.tmp`` + rename, plus an fsync) so that a
failed write can be cleaned up (``tests/training/test_save_dir.py``).

Why the resumed run is exact, although fairseq resumes mid-epoch from interval checkpoints: the checkpoint
records the position in the epoch (fairseq skips the batches already consumed), every epoch's shuffle is
drawn from ``seed + epoch`` (``task.rebuild_batches=true``), each image's augmentation from
``(seed, epoch, index)``, fairseq reseeds torch with ``seed + num_updates`` before every update, and
validation uses fixed centre crops. The only differences left would come from nondeterministic kernels
(e.g. GPU atomics) or a different number of CPU threads; here the final weights agree to the bit.

Faults are injected by a small wrapper around ``fairseq_cli.hydra_train.cli_main`` (the same command for
every launch; ``MMKD_CHAOS_FAULT`` selects the fault): ``save:N`` pauses halfway through the N-th
``torch.save`` of the launch, ``copy:N`` halfway through its N-th copy onto ``checkpoint_last.pt``, and
the test SIGKILLs the run as soon as it reports the pause, so the kill lands mid-write deterministically;
``time:T`` SIGKILLs it T seconds after training begins.

Longer runs with more (random) kills: ``bash scripts/chaos_resume.sh --kills 10 --updates 200``, which
runs this file as a script.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

from conftest import REPO, assert_same_updates, gradient_free_names, json_log_lines

INJECTOR = r"""
import io, os, shutil, sys, time
import torch
kind, _, nth = os.environ.get("MMKD_CHAOS_FAULT", "").partition(":")
seen = 0

def pause_halfway(data, f, name):
    f.write(data[: len(data) // 2])
    f.flush()
    print(f"MMKD-CHAOS paused halfway through writing {name}", flush=True)
    time.sleep(3600)

real_save, real_copyfile = torch.save, shutil.copyfile

def save(obj, f, *args, **kwargs):
    global seen
    if kind == "save" and hasattr(f, "write"):
        seen += 1
        if seen == int(nth):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            pause_halfway(buf.getvalue(), f, getattr(f, "name", "?"))
    return real_save(obj, f, *args, **kwargs)

def copyfile(src, dst, *args, **kwargs):
    global seen
    if kind == "copy" and os.path.basename(dst).startswith("checkpoint_last"):
        seen += 1
        if seen == int(nth):
            with open(src, "rb") as s, open(dst, "wb") as f:
                pause_halfway(s.read(), f, dst)
    return real_copyfile(src, dst, *args, **kwargs)

torch.save, shutil.copyfile = save, copyfile
from fairseq_cli.hydra_train import cli_main
sys.argv[0] = "fairseq-hydra-train"
cli_main()
"""

PAUSED = re.compile(r"MMKD-CHAOS paused halfway through writing (\S+)")
LOADED = re.compile(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)")


def train_args(teacher, photos, updates: int, save_interval: int = 4) -> list:
    """The tiny run without retrieval, checkpointing often, with the cosine length pinned to ``updates``."""
    return [f"task.data={photos}", f"model.teacher_checkpoint={teacher}", "task.retrieval=false",
            "checkpoint.best_checkpoint_metric=loss", "checkpoint.maximize_best_checkpoint_metric=false",
            f"checkpoint.save_interval_updates={save_interval}", f"optimization.max_update={updates}",
            f"lr_scheduler.max_update={updates}", "common.log_interval=1"]


def command(save_dir, args) -> list:
    return [sys.executable, "-c", INJECTOR, "--config-dir", "config", "--config-name", "kd_image", "preset=tiny",
            f"checkpoint.save_dir={save_dir}", *args]


def checkpoint_updates(path) -> Optional[int]:
    """num_updates of a checkpoint file (None when absent); fails on a file that does not load."""
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["optimizer_history"][-1]["num_updates"])


def check_all_checkpoints_load(save_dir) -> dict:
    """Every ``*.pt`` file in the save dir loads with a safe ``torch.load``: ``{name: num_updates}``."""
    found = {}
    for path in sorted(Path(save_dir).glob("*.pt")):
        try:
            found[path.name] = checkpoint_updates(path)
        except Exception as e:  # noqa: BLE001  (any failure to load is the bug this test looks for)
            raise AssertionError(f"{path.name} is corrupt after a kill: {type(e).__name__}: {e}") from None
    return found


@dataclass
class Launch:
    fault: str
    resume_expected: int  # num_updates of checkpoint_last.pt before the launch (0: none)
    resumed_from: Optional[int] = None  # what fairseq says it loaded
    killed: bool = False
    returncode: Optional[int] = None
    paused_in: Optional[str] = None  # the file a save/copy fault left half-written
    checkpoints: dict = field(default_factory=dict)
    output: str = ""


def run_once(cmd, fault: str, env: dict, timeout: float) -> Launch:
    """Start the run; SIGKILL it when the fault says so (or at ``timeout``)."""
    launch = Launch(fault=fault, resume_expected=0)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "MMKD_CHAOS_FAULT": fault}, start_new_session=True)

    def kill():
        if proc.poll() is None:
            launch.killed = True
            os.killpg(proc.pid, signal.SIGKILL)  # the session this launch created: the run and nothing else

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    timer = None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            paused = PAUSED.search(line)
            if paused:
                launch.paused_in = paused.group(1)
                kill()
            elif fault.startswith("time:") and timer is None and "begin training epoch" in line:
                timer = threading.Timer(float(fault[5:]), kill)
                timer.start()
        launch.returncode = proc.wait()
    finally:
        watchdog.cancel()
        if timer is not None:
            timer.cancel()
        kill()
        proc.wait()
    launch.output = "".join(lines)
    return launch


def chaos_run(save_dir, args, faults, env=None, timeout=300.0, log=print) -> list:
    """Launch the same command once per fault, then once more without; check each kill and each resume."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = command(save_dir, args)
    launches = []
    for fault in [*faults, ""]:
        expected = checkpoint_updates(Path(save_dir) / "checkpoint_last.pt") or 0
        launch = run_once(cmd, fault, env, timeout)
        launch.resume_expected = expected
        launches.append(launch)
        out = launch.output
        loaded = LOADED.search(out)
        if loaded:
            launch.resumed_from = int(loaded.group(2))
        elif "No existing checkpoint found" in out:
            launch.resumed_from = 0
        if launch.resumed_from != expected:
            raise AssertionError(f"launch {len(launches)} ({fault or 'no fault'}) resumed from "
                                 f"{launch.resumed_from}, expected checkpoint_last.pt's {expected} updates:\n"
                                 f"{out[-3000:]}")
        launch.checkpoints = check_all_checkpoints_load(save_dir)
        log(f"launch {len(launches)}: fault={fault or 'none'} resumed@{launch.resumed_from} "
            f"{'KILLED' if launch.killed else f'exit {launch.returncode}'}"
            f"{f' mid-write of {Path(launch.paused_in).name}' if launch.paused_in else ''} "
            f"checkpoints={launch.checkpoints}")
        if not launch.killed:
            if launch.returncode != 0:
                raise AssertionError(f"launch {len(launches)} failed ({launch.returncode}):\n{out[-4000:]}")
            break  # the run reached max_update (a fault that never triggered also ends up here)
    return launches


def lr_by_update(outputs) -> dict:
    """{num_updates: lr} from every train_inner line of the given outputs."""
    pairs = {}
    for out in outputs:
        for rec in json_log_lines(out, "train_inner"):
            n, lr = int(rec["num_updates"]), float(rec["lr"])
            assert pairs.setdefault(n, lr) == lr, f"update {n} logged two learning rates"
    return pairs


def compare_final(straight_dir, chaos_dir, updates: int, straight_output: str) -> float:
    """The resumed run's last checkpoint matches the uninterrupted one (whose log is ``straight_output``): returns
    the largest weight difference."""
    a = torch.load(Path(straight_dir) / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(Path(chaos_dir) / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == updates
    assert b["optimizer_history"][-1]["lr_scheduler_state"] == a["optimizer_history"][-1]["lr_scheduler_state"]
    assert b["extra_state"]["train_iterator"] == a["extra_state"]["train_iterator"]
    lrs = lr_by_update([straight_output])
    assert sorted(lrs) == list(range(1, updates + 1)), "every update is logged (common.log_interval=1)"
    assert_same_updates(a, b, [lrs[n] for n in sorted(lrs)], gradient_free_names(straight_output))
    worst = max((b["model"][k].float() - v.float()).abs().max().item() for k, v in a["model"].items())
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[i][name], sa[i][name], atol=1e-8, rtol=1e-5)
    return worst


def test_checkpoint_copy_is_atomic(tmp_path, monkeypatch):
    """A crash halfway through copying checkpoint_E_U.pt onto checkpoint_last.pt: fairseq's own copy leaves
    a truncated checkpoint_last.pt, the plugin's leaves the previous one intact."""
    import fairseq_mmkd  # noqa: F401  (installs the guards, as fairseq's --user-dir import does)
    from fairseq import checkpoint_utils

    copy = checkpoint_utils.PathManager.copy
    assert getattr(copy, "_mmkd_atomic", False), "importing the plugin must install the atomic copy"
    new, last = tmp_path / "checkpoint_1_8.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"num_updates": 8, "w": torch.randn(64, 64)}, new)

    class Crash(Exception):
        pass

    real_copyfile = shutil.copyfile

    def crashing_copyfile(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise Crash

    def fresh_last():
        torch.save({"num_updates": 4, "w": torch.zeros(64, 64)}, last)

    fresh_last()
    monkeypatch.setattr(shutil, "copyfile", crashing_copyfile)
    with pytest.raises(Crash):
        copy.stock(str(new), str(last), overwrite=True)  # fairseq's PathManager.copy
    with pytest.raises(Exception):
        torch.load(last, weights_only=True)  # truncated: a restart could not resume

    fresh_last()
    with pytest.raises(Crash):
        checkpoint_utils.PathManager.copy(str(new), str(last), overwrite=True)
    assert torch.load(last, weights_only=True)["num_updates"] == 4  # the previous checkpoint, intact
    monkeypatch.setattr(shutil, "copyfile", real_copyfile)
    assert checkpoint_utils.PathManager.copy(str(new), str(last), overwrite=True)
    assert last.read_bytes() == new.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_partial_checkpoints_are_removed_when_a_run_starts(tmp_path):
    """Cleaned up once the new run holds the folder's lock (never while another run might be writing them)."""
    from omegaconf import OmegaConf

    from fairseq_mmkd.runtime import save_dir

    (tmp_path / "checkpoint_last.pt.tmp").write_bytes(b"half")
    (tmp_path / "checkpoint_3_12.pt.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    cfg = OmegaConf.create({"checkpoint": {"save_dir": str(tmp_path), "restore_file": "checkpoint_last.pt",
                                           "reset_optimizer": False, "reset_dataloader": False},
                            "optimization": {"max_update": 10, "max_epoch": 0}})
    save_dir.claim(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", save_dir.LOCK_NAME]


def test_sigkill_at_random_moments_resumes_exactly(tmp_path, tiny_teacher, photo_folder):
    """Three kills: halfway through fairseq's own write of checkpoint_last.pt (end of epoch), halfway through
    the copy onto checkpoint_last.pt (interval save), and at a random moment; then the run completes."""
    updates = 30
    args = train_args(tiny_teacher, photo_folder, updates)
    straight = run_once(command(tmp_path / "straight", args), "", {**os.environ, "PYTHONUNBUFFERED": "1",
                                                                   "OMP_NUM_THREADS": "1"}, 300)
    assert straight.returncode == 0, straight.output[-4000:]

    rng = random.Random(20240611)
    faults = ["save:3", "copy:1", f"time:{rng.uniform(0.0, 0.3):.2f}"]
    launches = chaos_run(tmp_path / "chaos", args, faults)
    assert [x.killed for x in launches[:2]] == [True, True] and not launches[-1].killed
    # the timed kill lands while training (~0.3 s of ~24 remaining updates); on a very fast machine the run
    # may finish first, and then it is simply the last launch
    assert len(launches) == 4 or (len(launches) == 3 and launches[2].returncode == 0), [x.fault for x in launches]

    # save:3 is the end-of-epoch write of checkpoint_last.pt at update 6 (after 3 and 4): fairseq's .tmp
    assert Path(launches[0].paused_in).name == "checkpoint_last.pt.tmp"
    assert launches[1].resume_expected == 4, "resumes from the interval checkpoint copied at update 4"
    # copy:1 is the copy onto checkpoint_last.pt at update 8: it goes to a .tmp, never in place
    assert Path(launches[1].paused_in).name == "checkpoint_last.pt.tmp"
    assert launches[1].checkpoints["checkpoint_3_8.pt"] == 8 and launches[1].checkpoints["checkpoint_last.pt"] == 6
    assert launches[2].resumed_from == 6, "the newest intact checkpoint_last.pt, not the newer checkpoint_3_8.pt"
    assert not list((tmp_path / "chaos").glob("*.tmp")), "partial files of the killed launches are cleaned up"

    lr_straight = lr_by_update([straight.output])
    lr_chaos = lr_by_update([x.output for x in launches])
    assert set(lr_chaos) == set(lr_straight), "every logged update was reached"
    assert lr_chaos == lr_straight, "the learning-rate schedule continues where it stopped"
    compare_final(tmp_path / "straight", tmp_path / "chaos", updates, straight.output)  # observed here: identical to the bit


def main(argv=None) -> int:
    """``scripts/chaos_resume.sh``: an uninterrupted run, then the same run killed ``--kills`` times at random."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--updates", type=int, default=200, help="max_update (3 updates per epoch of the demo images)")
    p.add_argument("--save-interval", type=int, default=4, help="checkpoint.save_interval_updates")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder, removed)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: a tiny random one)")
    p.add_argument("--data", default=None, help="training images (default: tiny generated photos)")
    args = p.parse_args(argv)

    import tempfile

    from conftest import make_teacher, write_photos

    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or make_teacher(work / "teacher.pt")
    data = args.data or write_photos(work / "photos")
    rng = random.Random(args.seed)
    faults = [rng.choice([f"save:{rng.randint(1, 6)}", f"copy:{rng.randint(1, 3)}",
                          f"time:{rng.uniform(0.0, 2.0):.2f}"]) for _ in range(args.kills)]
    print(f"[chaos] work dir {work}; faults: {faults}", flush=True)
    train = train_args(teacher, data, args.updates, args.save_interval)
    start = time.time()
    straight = run_once(command(work / "straight", train), "", {**os.environ, "PYTHONUNBUFFERED": "1",
                                                                "OMP_NUM_THREADS": "1"}, 3600)
    if straight.returncode != 0:
        print(straight.output[-4000:])
        return 1
    print(f"[chaos] uninterrupted run: {time.time() - start:.0f} s", flush=True)
    ok = True
    try:
        launches = chaos_run(work / "chaos", train, faults, timeout=3600,
                             log=lambda m: print(f"[chaos] {m}", flush=True))
        kills = sum(x.killed for x in launches)
        assert lr_by_update([x.output for x in launches]) == lr_by_update([straight.output]), "learning rates differ"
        worst = compare_final(work / "straight", work / "chaos", args.updates, straight.output)
        print(f"[chaos] OK: {kills} kills ({sum(bool(x.paused_in) for x in launches)} mid-write), every "
              f"checkpoint loadable after each, every resume from the newest checkpoint_last.pt, final weights "
              f"equal the uninterrupted run's (max |diff| {worst:g})")
    except AssertionError as e:
        ok = False
        print(f"[chaos] FAILED: {e}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
