"""Logs users can read and plot: TensorBoard event files, a quiet start, a progress bar only on a terminal."""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
import textwrap
import threading

import pytest

from conftest import BIN, REPO, json_log_lines

NOISE = ("Warning", "warnings.warn", "DEBUG", "Please install", "version_base", "ConfigStore schema")


def run_args(teacher, photos, cifar) -> list:
    """A 6-update tiny run that validates (retrieval on the tiny CIFAR sets) when it stops."""
    return ["--config-dir", "config", "--config-name", "kd_image", "preset=tiny", f"task.data={photos}",
            f"model.teacher_checkpoint={teacher}", f"task.cifar10_root={cifar}", f"task.cifar100_root={cifar}",
            "optimization.max_update=6"]


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_with_terminal_stderr(cmd) -> tuple:
    """Run with stdout to a pipe (like a log file) and stderr on a pseudo-terminal: (rc, stdout, terminal)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns (tqdm reads it)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=slave, env=ENV, text=True)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout = proc.stdout.read()
    rc = proc.wait(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    return rc, stdout, b"".join(chunks).decode("utf-8", "replace")


def test_tensorboard_gets_training_validation_and_teacher_metrics(tmp_path, tiny_teacher, photo_folder, tiny_cifar):
    """``common.tensorboard_logdir`` with the documented ``fairseq-hydra-train``; the event files are read back
    with TensorBoard's own reader. stderr is a terminal here, so the retrieval progress bar (auto) shows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    cmd = [str(BIN / "fairseq-hydra-train"), *run_args(tiny_teacher, photo_folder, tiny_cifar),
           f"checkpoint.save_dir={tmp_path / 'ckpt'}", f"common.tensorboard_logdir={tb}"]
    rc, stdout, terminal = run_with_terminal_stderr(cmd)
    assert rc == 0, (stdout + terminal)[-3000:]

    scalars = {}
    for split in ("train_inner", "train", "valid"):
        acc = EventAccumulator(str(tb / split))
        acc.Reload()
        scalars[split] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert {"loss", "target_var", "pred_var", "lr", "gnorm"} <= set(scalars["train_inner"]), scalars["train_inner"]
    assert {"loss", "target_var", "pred_var"} <= set(scalars["train"])
    retrieval = [f"{p}cifar{n}_{inv}top{k}" for p in ("", "teacher_") for n in (10, 100) for inv in ("", "inv_")
                 for k in (1, 3)]
    assert set(retrieval) | {"loss"} <= set(scalars["valid"]), sorted(scalars["valid"])
    valid = json_log_lines(stdout, "valid")[-1]  # the same numbers as the json log, at the same update
    for name in ("cifar10_top1", "cifar100_inv_top3", "teacher_cifar100_top1", "loss"):
        (step, value), = scalars["valid"][name]
        assert step == 6 and value == pytest.approx(float(valid[f"valid_{name}"]), abs=0.01), name

    assert "cifar10 train" in terminal and "batch" in terminal, "auto: the bar shows on a terminal"
    assert "cifar10 train" not in stdout
    # after the plugin is imported, fairseq's and torch's known noise is filtered (the CPU pin_memory note,
    # fairseq's deprecated autocast call)
    assert "pin_memory" not in stdout + terminal and "torch.cuda.amp.autocast" not in stdout + terminal


def test_plugin_launcher_starts_quietly_and_keeps_the_bar_out_of_logs(tmp_path, tiny_teacher, photo_folder,
                                                                      tiny_cifar):
    """``python -m fairseq_mmkd.train`` (fairseq-hydra-train's arguments): none of fairseq's or Hydra's
    import-time messages, and with output going to a file no progress bar, while the run itself logs as usual."""
    cmd = [sys.executable, "-m", "fairseq_mmkd.train", *run_args(tiny_teacher, photo_folder, tiny_cifar),
           f"checkpoint.save_dir={tmp_path / 'ckpt'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    noisy = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy
    assert out.splitlines()[0].startswith("[20"), out[:500]  # the first line is the run's own log line
    assert "cifar10 train" not in out, "no progress bar in a log file"
    assert json_log_lines(out, "valid") and json_log_lines(out, "train_inner")


def test_filters_hide_only_the_known_messages():
    """The same warnings from anywhere else still show; the root logger keeps its level after fairseq's import."""
    code = textwrap.dedent("""
        import logging, warnings
        import fairseq_mmkd
        assert logging.getLogger().level == logging.WARNING, logging.getLogger().level
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", FutureWarning)
            warnings.warn("`torch.cuda.amp.autocast(args...)` is deprecated.", FutureWarning)  # not from fairseq
            warnings.warn("something else", UserWarning)
            warnings.warn("'pin_memory' argument is set as true but no accelerator is found", UserWarning)
        print(sorted(str(w.message)[:12] for w in seen))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['`torch.cuda.', '`torch.jit.s', 'something el']", proc.stdout
    assert not [n for n in NOISE if n in proc.stderr], proc.stderr  # importing the plugin printed nothing


@pytest.mark.parametrize("setting,terminal,shown", [("auto", True, True), ("auto", False, False),
                                                    ("true", False, True), (True, False, True),
                                                    ("false", True, False), (False, True, False)])
def test_retrieval_progress_setting(monkeypatch, setting, terminal, shown):
    from fairseq_mmkd.tasks._retrieval import retrieval_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    monkeypatch.setenv("TERM", "xterm")
    assert retrieval_progress(setting) is shown


def test_retrieval_progress_rejects_other_values():
    from fairseq_mmkd.tasks._retrieval import retrieval_progress

    with pytest.raises(ValueError, match=r"task.retrieval_progress='sometimes': use auto .*, true or false"):
        retrieval_progress("sometimes")
