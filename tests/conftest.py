"""Shared fixtures: tiny teachers, image folders and CIFAR sets written in the real on-disk formats (the writers are
``fairseq_mmkd.testing.fixtures``, which the benchmark scripts use too), and helpers that run and read fairseq."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest
import torch

from hypothesis import settings

from fairseq_mmkd.testing.fixtures import (TINY_AUDIO, TINY_TEACHER, TINY_TEXT, dictionary_size,  # noqa: F401
                                           make_sequence_teacher, make_teacher, make_text_corpus, write_audio_manifest,
                                           write_glue_folder, write_photos, write_text_corpus, write_tiny_cifar)

# Property tests draw the same examples on every run: CI cannot flake, and a failure reproduces locally.
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.load_profile("deterministic")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "tiny_d2v2.pt")


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "train")


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_tiny_cifar(root, "cifar10", 10)
    write_tiny_cifar(root, "cifar100", 100, n_train=100, n_test=50, seed=1)
    return root


SIZES = {  # what makes the tiny runs tiny, on top of preset=tiny
    "text": ["task.tokens_per_sample=16"],
    "audio": ["task.min_sample_size=800", "task.max_sample_size=2000", "dataset.max_tokens=16000",
              "dataset.batch_size=null", "optimization.update_freq=[1]"],
}


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("text") / "bin")


@pytest.fixture(scope="session")
def audio_manifest(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_audio_manifest(tmp_path_factory.mktemp("audio") / "clips",
                                [int(n) for n in rng.integers(1000, 4000, size=40)])


@pytest.fixture(scope="session")
def retrieval_folders(tmp_path_factory, text_corpus):
    """modality -> a labelled retrieval folder: text (GLUE layout, two topics of distinct words) and audio
    (two kinds of tone, train/valid manifests with labels)."""
    root = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(1)
    topics = {"low": [f"w{i}" for i in range(20)], "high": [f"w{i}" for i in range(20, 40)]}

    def rows(n):
        return [(" ".join(rng.choice(words, size=6)), label) for label, words in topics.items() for _ in range(n)]

    text = write_glue_folder(root / "topics", {"train": rows(6), "valid": rows(3)}, Path(text_corpus) / "dict.txt")
    audio = root / "tones"
    write_audio_manifest(audio, [1600] * 6, labels=[0, 1] * 3, split="train", seed=2)
    write_audio_manifest(audio, [1600] * 4, labels=[0, 1] * 2, split="valid", seed=3)
    return {"text": text, "audio": audio}


@pytest.fixture(scope="session")
def sequence_setup(tmp_path_factory, text_corpus, audio_manifest):
    """modality -> (data, teacher): tiny teachers whose sizes fit the data (text: the corpus' dictionary)."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "text": (text_corpus, make_sequence_teacher(root / "text.pt", "text", vocab_size=dictionary_size(text_corpus))),
        "audio": (audio_manifest, make_sequence_teacher(root / "audio.pt", "audio")),
    }


def args_for(setup, modality, *extra):
    data, teacher = setup[modality]
    return [f"task.data={data}", f"model.teacher_checkpoint={teacher}", *SIZES[modality], *extra]


def hydra_train(save_dir, *overrides, config="kd_image", preset="tiny", env=None, timeout=600, check=True, launcher=()):
    """Run the real ``fairseq-hydra-train`` from the repo root; returns the CompletedProcess."""
    cmd = [*launcher, str(BIN / "fairseq-hydra-train"), "--config-dir", "config", "--config-name", config, *([f"preset={preset}"] if preset else []),
           f"checkpoint.save_dir={save_dir}", *overrides]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"fairseq-hydra-train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def assert_same_model(a: dict, b: dict, atol: float, rtol: float) -> None:
    """Every weight of checkpoint ``a`` (a loaded checkpoint dict) equals ``b``'s within the tolerances, named on
    failure."""
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def learning_rates(text: str) -> list:
    """The learning rate of every update of a run logged with ``common.log_interval=1``, in update order."""
    lrs = {int(r["num_updates"]): float(r["lr"]) for r in json_log_lines(text, "train_inner")}
    assert lrs and sorted(lrs) == list(range(1, max(lrs) + 1)), f"not every update was logged: {sorted(lrs)}"
    return [lrs[n] for n in sorted(lrs)]


def gradient_free_names(text: str) -> list:
    """The parameters a run's log says it froze because the loss gives them no gradient."""
    marker = "keep their initial values (docs/architecture.md): "
    lines = [line for line in text.splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1].strip().split(", ") if lines else []


def assert_same_updates(a: dict, b: dict, lrs, frozen=()) -> None:
    """Checkpoints ``a`` and ``b`` hold the same weights up to what float rounding can make of the Adam updates at
    learning rates ``lrs`` that led to them (one per update), and bitwise the same ``frozen`` parameters (no update
    touches them).

    Per element, an update adds ``lr_t * m/(sqrt(v) + eps)``, a step of at most about ``lr_t``, and stores the sum in
    float32. Two runs that differ only in rounding (summation order, a different CPU) can round every stored sum
    differently (one ulp of the largest weight of the tensor per update) and every step differently; a step's
    relative rounding is ~1e-7 and the updates that follow can amplify it where an element's gradient is near zero,
    bounded by its own step size: ``1e-4 * sum(lr_t)`` allows that amplification a factor of 1,000. A run whose
    gradients differ (another batch on one worker) moves its weights by a fraction of ``sum(lr_t)`` itself.
    """
    frozen = set(frozen)
    assert set(a["model"]) == set(b["model"]) and frozen <= set(a["model"]), sorted(frozen - set(a["model"]))
    step_bound = 1e-4 * sum(lrs)
    for k, v in a["model"].items():
        if k in frozen:
            assert torch.equal(b["model"][k], v), f"{k} is frozen but changed"
            continue
        ulp = torch.finfo(v.dtype).eps * float(v.abs().max())
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=step_bound + len(lrs) * ulp,
                                   msg=lambda m: f"{k}: {m}")


def assert_same_losses(text_a: str, text_b: str) -> None:
    """The same loss at every logged update: fairseq prints losses rounded to 4 decimals, so values that agree to
    float rounding print at most one unit of the last digit apart."""
    la = [float(r["loss"]) for r in json_log_lines(text_a, "train_inner")]
    lb = [float(r["loss"]) for r in json_log_lines(text_b, "train_inner")]
    assert la and len(la) == len(lb), (len(la), len(lb))
    assert la == pytest.approx(lb, rel=0, abs=1.5e-4)


def json_log_lines(text: str, kind: str = "train_inner") -> list:
    """fairseq's json log lines of one kind (train_inner, train, valid) from a run's output: Hydra's log format
    (``[time][kind][INFO] - {...}``, fairseq-hydra-train) or fairseq's (``time | INFO | kind | {...}``, its argparse
    tools)."""
    out = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0 or (f"[{kind}][" not in line[:start] and f"| {kind} | " not in line[:start]):
            continue
        try:
            out.append(json.loads(line[start:]))
        except json.JSONDecodeError:
            pass
    return out


# Two gloo workers on this machine (torchrun), as the distributed tests of every area run them.
DISTRIBUTED = [
    "distributed_training.distributed_world_size=2",
    "distributed_training.distributed_backend=gloo",
    "distributed_training.distributed_init_method=env://",
    "distributed_training.distributed_no_spawn=true",
    "distributed_training.distributed_rank=${oc.env:RANK}",
    "distributed_training.ddp_backend=legacy_ddp",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> list:
    return [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_last(folder) -> dict:
    return load(Path(folder) / "checkpoint_last.pt")


def assert_same_training(one, two, a: dict, b: dict) -> None:
    """The 2-process run ``two`` (checkpoint ``b``) did what the 1-process run ``one`` (``a``) did."""
    out_one, out_two = one.stdout + one.stderr, two.stdout + two.stderr
    assert_same_losses(out_one, out_two)
    frozen = gradient_free_names(out_one)
    assert frozen and frozen == gradient_free_names(out_two)
    assert_same_updates(a, b, learning_rates(out_one), frozen)


# fairseq's argparse tools (fairseq-train, fairseq-validate) with the plugin.
PLUGIN = str(REPO / "fairseq_mmkd")
CORE_GROUPS = ("common", "distributed_training", "dataset", "optimization", "checkpoint")
COMPONENTS = ("task", "model", "criterion", "optimizer", "lr_scheduler")


def group_defaults(group: str, cfg: dict) -> dict:
    """field -> default of the dataclass behind ``cfg[group]`` (fairseq's for its core groups, the registered one
    for the components)."""
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    if group in CORE_GROUPS:
        dc = FairseqConfig.__dataclass_fields__[group].type
    else:
        registry = {"task": TASK_DATACLASS_REGISTRY, "model": MODEL_DATACLASS_REGISTRY}.get(group) or \
            REGISTRIES[group]["dataclass_registry"]
        dc = registry[cfg[group]["_name"]]
    out = {}
    for f in fields(dc):
        default = f.default if f.default is not MISSING else f.default_factory()
        out[f.name] = getattr(default, "value", default)
    return out


def training_flags(cfg: dict) -> list:
    """fairseq-train's command line for the settings of a resolved config (a checkpoint's ``cfg``): the positional
    DATA, the components, and a flag for every value that differs from its dataclass default."""
    argv = [cfg["task"]["data"]] if cfg["task"].get("data") else []
    argv += ["--task", cfg["task"]["_name"], "--arch", cfg["model"]["_name"], "--criterion",
             cfg["criterion"]["_name"], "--optimizer", cfg["optimizer"]["_name"], "--lr-scheduler",
             cfg["lr_scheduler"]["_name"]]
    for group in CORE_GROUPS + COMPONENTS:
        defaults = group_defaults(group, cfg)
        for key, value in cfg[group].items():
            default = defaults.get(key, value)
            if key in ("_name", "data") or (isinstance(default, str) and default.startswith("${")):
                continue
            if value == (list(default) if isinstance(default, tuple) else default):
                continue
            flag = "--" + key.replace("_", "-")
            assert value is not None and (not isinstance(value, bool) or default is not None), \
                f"{group}.{key}={value} cannot be set by a flag"
            if isinstance(value, bool):
                argv.append(flag)  # store_true from False, store_false from True: naming it flips it
            elif isinstance(value, (list, tuple)):
                argv += [flag, ",".join(map(str, value))]
            else:
                argv += [flag, str(value)]
    return argv


def fairseq_tool(tool: str, *args, timeout=600, check=True):
    proc = subprocess.run([str(BIN / tool), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def validate(checkpoint, *extra, task="d2v_kd", check=True):
    proc = fairseq_tool("fairseq-validate", "--user-dir", PLUGIN, "--task", task, "--path", str(checkpoint),
                        "--cpu", "--batch-size", "1", "--log-format", "json", *extra, check=check)
    out = proc.stdout + proc.stderr
    rows = json_log_lines(out, "valid")
    assert rows, out[-3000:]
    return rows[-1], out


# The multimodal runs' tiny sizes (kd_multimodal and the tests that run it through fairseq's tools).
TINY_MULTIMODAL = ["task.tokens_per_sample=16", "task.image_batch_size=8", "task.text_batch_size=8",
                   "task.audio_batch_size=null", "task.audio_max_tokens=16000", "task.min_sample_size=800",
                   "task.max_sample_size=2000", "dataset.batch_size=1"]


def modality_args(setup, photo_folder, tiny_teacher, modalities=("image", "text", "audio")) -> list:
    args = []
    if "image" in modalities:
        args += [f"task.image_data={photo_folder}", f"model.image_teacher={tiny_teacher}"]
    for m in ("text", "audio"):
        if m in modalities:
            data, teacher = setup[m]
            args += [f"task.{m}_data={data}", f"model.{m}_teacher={teacher}"]
    return args
