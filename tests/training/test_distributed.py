"""fairseq distributed training (2 CPU processes, gloo) equals one process with the same effective batch.

What data parallelism must make equal is the gradient of every update; the checks read it through what it decides:
every update's loss (logged at each update) and the weights after the run, within what float rounding can make of
the run's own learning rates (``conftest.assert_same_updates``). Both checks fail when one worker trains on other
data (``test_a_worker_on_other_data_is_caught``)."""
from __future__ import annotations

import pytest

from conftest import (DISTRIBUTED, args_for, assert_same_losses, assert_same_training, assert_same_updates,
                      gradient_free_names, hydra_train, json_log_lines, launcher, learning_rates, load_last,
                      write_photos)

COMMON = ["optimization.max_update=12", "dataset.validate_interval_updates=12", "model.student_init=random",
          "dataset.batch_size=4", "common.log_interval=1"]


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
    a, b = load_last(tmp_path / "one"), load_last(tmp_path / "two")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 12
    assert_same_training(one, two, a, b)
    va, vb = json_log_lines(one.stdout + one.stderr, "valid")[-1], json_log_lines(out_two, "valid")[-1]
    for name in [k for k in va if "cifar" in k]:
        assert float(va[name]) == float(vb[name]), name


def test_a_worker_on_other_data_is_caught(runs, photo_folder, tmp_path):
    """The same 2-process run with worker 1 reading another image folder (of the same size and kind): the loss
    check and the weight check each fail."""
    folder, common, one, _ = runs
    other = write_photos(tmp_path / "other", seed=7)
    per_rank = [c for c in common if not c.startswith("task.data=")] + ["task.data='${oc.env:MMKD_DATA_${oc.env:RANK}}'"]
    wrong = hydra_train(tmp_path / "wrong", *per_rank, *DISTRIBUTED, launcher=launcher(),
                        env={"MASTER_ADDR": "127.0.0.1", "MMKD_DATA_0": str(photo_folder),
                             "MMKD_DATA_1": str(other)})
    out_one, out_wrong = one.stdout + one.stderr, wrong.stdout + wrong.stderr
    with pytest.raises(AssertionError):
        assert_same_losses(out_one, out_wrong)
    with pytest.raises(AssertionError, match="not close"):
        assert_same_updates(load_last(folder / "one"), load_last(tmp_path / "wrong"), learning_rates(out_one),
                            gradient_free_names(out_one))


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
              "dataset.validate_interval_updates=8", "model.student_init=random", "common.log_interval=1"]
    if modality == "text":
        common.append("dataset.batch_size=4")
    one = hydra_train(tmp_path / "one", *common, "optimization.update_freq=[2]", config=f"kd_{modality}")
    two = hydra_train(tmp_path / "two", *common, *DISTRIBUTED, launcher=launcher(), config=f"kd_{modality}",
                      env={"MASTER_ADDR": "127.0.0.1"})
    a, b = load_last(tmp_path / "one"), load_last(tmp_path / "two")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 8
    assert_same_training(one, two, a, b)
