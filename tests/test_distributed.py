"""fairseq distributed training (2 CPU processes, gloo) equals one process with the same effective batch."""
from __future__ import annotations

import socket

import pytest
import torch

from conftest import BIN, args_for, assert_same_model, hydra_train, json_log_lines

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


COMMON = ["optimization.max_update=12", "dataset.validate_interval_updates=12", "model.student_init=random",
          "dataset.batch_size=4"]


def launcher() -> list:
    return [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher, photo_folder, tiny_cifar):
    """The same training as one process and as two (per-process batch 4: two workers, or one worker
    accumulating 2 batches per update)."""
    tmp = tmp_path_factory.mktemp("distributed")
    common = [f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
              f"task.cifar10_root={tiny_cifar}", f"task.cifar100_root={tiny_cifar}", *COMMON]
    one = hydra_train(tmp / "one", *common, "optimization.update_freq=[2]")
    two = hydra_train(tmp / "two", *common, *DISTRIBUTED, launcher=launcher(), env={"MASTER_ADDR": "127.0.0.1"})
    return tmp, common, one, two


def test_two_processes_agree_with_one(runs):
    tmp_path, _, one, two = runs
    out_two = two.stdout + two.stderr
    assert "distributed init (rank 1)" in out_two or "world_size=2" in out_two.replace(" ", ""), out_two[-2000:]

    a = torch.load(tmp_path / "one" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 12
    assert_same_model(a, b, atol=2e-5, rtol=1e-4)

    va, vb = json_log_lines(one.stdout + one.stderr, "valid")[-1], json_log_lines(out_two, "valid")[-1]
    for name in [k for k in va if "cifar" in k]:
        assert float(va[name]) == float(vb[name]), name
    ta = json_log_lines(one.stdout + one.stderr, "train")[-1]
    tb = json_log_lines(out_two, "train")[-1]
    assert abs(float(ta["train_loss"]) - float(tb["train_loss"])) < 1e-3


def test_rerun_of_a_finished_distributed_run_exits_on_every_worker(runs):
    """Rank 0 decides that the run is complete and tells the other worker: both exit 0 and nothing is written."""
    tmp_path, common, _, _ = runs
    save = tmp_path / "two"
    before = {p.name: p.read_bytes() for p in save.glob("*.pt")}
    rerun = hydra_train(save, *common, *DISTRIBUTED, launcher=launcher(), env={"MASTER_ADDR": "127.0.0.1"},
                        timeout=300)
    out = rerun.stdout + rerun.stderr
    assert out.count("run already complete") == 1, out[-3000:]  # logged once, by rank 0
    assert "begin training" not in out and "Loaded checkpoint" not in out
    assert {p.name: p.read_bytes() for p in save.glob("*.pt")} == before


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_text_and_audio_two_processes_agree_with_one(tmp_path, sequence_setup, modality):
    """The same for padded text batches (loss normalised by the valid tokens of all workers) and audio batches
    sized by max_tokens (per-clip crop seeds do not depend on the worker)."""
    common = [*args_for(sequence_setup, modality), "task.retrieval=false", "optimization.max_update=8",
              "dataset.validate_interval_updates=8", "model.student_init=random"]
    if modality == "text":
        common.append("dataset.batch_size=4")
    one = hydra_train(tmp_path / "one", *common, "optimization.update_freq=[2]", config=f"kd_{modality}")
    two = hydra_train(tmp_path / "two", *common, *DISTRIBUTED, launcher=launcher(), config=f"kd_{modality}",
                      env={"MASTER_ADDR": "127.0.0.1"})
    a = torch.load(tmp_path / "one" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 8
    assert_same_model(a, b, atol=2e-5, rtol=1e-4)
    la = [float(r["loss"]) for r in json_log_lines(one.stdout + one.stderr, "train_inner")]
    lb = [float(r["loss"]) for r in json_log_lines(two.stdout + two.stderr, "train_inner")]
    assert la and la == pytest.approx(lb, abs=1e-3)
