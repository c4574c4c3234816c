"""Numerical guards (``fairseq_mmkd.runtime.guards``): NaN/inf updates are skipped and counted, too many in a row stop
the run with a message naming the likely cause, and a collapsing student gets a warning.

Most tests drive a real ``fairseq.trainer.Trainer`` in-process, configured exactly as
``fairseq-hydra-train --config-name kd_image preset=tiny`` would be, and inject the fault into one step.
One test diverges a real command-line run with an absurd learning rate.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import socket

import pytest
import torch

from conftest import REPO, hydra_train, json_log_lines

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

NO_RETRIEVAL = ["task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                "checkpoint.maximize_best_checkpoint_metric=false"]


def fairseq_cfg(*overrides):
    """The resolved config ``fairseq-hydra-train --config-dir config --config-name kd_image`` would train with."""
    from fairseq import utils
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    hydra_init("kd_image")  # fairseq's schema for the config name, as fairseq_cli.hydra_train does
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        cfg = compose("kd_image", overrides=list(overrides))
    with omegaconf_no_object_check():
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    utils.import_user_module(cfg.common)
    add_defaults(cfg)
    return cfg


def make_trainer(tmp_path, teacher, photos, *overrides):
    """A fairseq Trainer with the plugin's task, model and criterion, and the first training batches."""
    from fairseq import tasks
    from fairseq.trainer import Trainer

    cfg = fairseq_cfg("preset=tiny", f"common.user_dir={REPO / 'fairseq_mmkd'}", f"task.data={photos}",
                      f"model.teacher_checkpoint={teacher}", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
                      *NO_RETRIEVAL, *overrides)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    task.load_dataset("train")
    batches = list(trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=True))
    return trainer, batches


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def adam_state(trainer):
    state = trainer.optimizer.optimizer.state
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in state.values()]


def step(trainer, batch):
    """One update; returns the metrics it logged (fairseq's aggregator for this step alone)."""
    from fairseq.logging import metrics

    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step([batch])
    return agg


def assert_same(before: dict, after: dict):
    for k, v in before.items():
        assert torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v, k


@pytest.fixture
def nan_teacher(monkeypatch):
    """Call ``nan_teacher(trainer)``: from then on the teacher's layer outputs are NaN (corrupt targets)."""
    def install(trainer):
        distiller = trainer.model.distiller
        real = distiller.run_teacher
        monkeypatch.setattr(distiller, "run_teacher", lambda x: [y * math.nan for y in real(x)])
        return lambda: monkeypatch.setattr(distiller, "run_teacher", real)
    return install


def test_nonfinite_targets_skip_the_update_and_are_counted(tmp_path, tiny_teacher, photo_folder, nan_teacher, caplog):
    trainer, batches = make_trainer(tmp_path, tiny_teacher, photo_folder)
    step(trainer, batches[0])  # a real update first, so the optimizer has state to keep
    params, adam = trainable(trainer), adam_state(trainer)
    restore = nan_teacher(trainer)
    with caplog.at_level(logging.WARNING, logger="fairseq_mmkd.runtime.guards"):
        agg = step(trainer, batches[1])
    restore()

    assert agg["nonfinite_skipped"].sum == 1
    assert agg["loss"].count == 0, "a skipped batch must not enter the loss average (nor fairseq's -1 placeholder)"
    assert_same(params, trainable(trainer))
    for a, b in zip(adam, adam_state(trainer)):
        assert_same(a, b)  # Adam's moments and step count untouched
    assert trainer.get_num_updates() == 2  # the counter (and the LR schedule) still advance
    assert "update 2 skipped" in caplog.text and "teacher" in caplog.text

    agg = step(trainer, batches[2])  # the next finite batch trains normally again
    assert "nonfinite_skipped" not in agg and math.isfinite(agg["loss"].avg)
    assert not torch.equal(trainable(trainer)["distiller.student_blocks.0.mlp.fc1.weight"],
                           params["distiller.student_blocks.0.mlp.fc1.weight"])
    assert trainer.task.guard.consecutive == 0 and trainer.task.guard.skipped_total == 1


def test_nonfinite_gradients_with_a_finite_loss_are_skipped(tmp_path, tiny_teacher, photo_folder, caplog):
    trainer, batches = make_trainer(tmp_path, tiny_teacher, photo_folder)
    params = trainable(trainer)
    p = trainer.model.distiller.student_blocks[0].mlp.fc1.weight
    hook = p.register_hook(lambda g: g * math.inf)  # overflow in the backward pass only
    with caplog.at_level(logging.WARNING, logger="fairseq_mmkd.runtime.guards"):
        agg = step(trainer, batches[0])
    hook.remove()
    assert agg["nonfinite_skipped"].sum == 1
    assert_same(params, trainable(trainer))
    assert "gradients are NaN/inf although the loss is finite" in caplog.text


def test_consecutive_nonfinite_updates_stop_the_run_naming_the_likely_cause(tmp_path, tiny_teacher, photo_folder):
    from fairseq_mmkd.runtime.guards import NonFiniteTrainingError

    trainer, batches = make_trainer(tmp_path, tiny_teacher, photo_folder, "++criterion.max_consecutive_nonfinite=3")
    step(trainer, batches[0])
    with torch.no_grad():  # a student weight diverged: every later prediction is NaN
        trainer.model.distiller.student_blocks[1].mlp.fc2.weight.fill_(math.nan)
    step(trainer, batches[1])
    step(trainer, batches[2])
    with pytest.raises(NonFiniteTrainingError) as info:
        step(trainer, batches[0])
    msg = str(info.value)
    assert "3 consecutive updates" in msg and "max_consecutive_nonfinite=3" in msg
    assert "the last finite update was 1" in msg
    assert "Most likely cause: the student's prediction is NaN/inf: the learning rate is too high" in msg
    assert "bf16" in msg and "corrupt teacher checkpoint" in msg  # the other causes are named too


def test_collapse_is_a_warning_not_a_stop(tmp_path, tiny_teacher, photo_folder, caplog):
    trainer, batches = make_trainer(tmp_path, tiny_teacher, photo_folder, "++criterion.min_pred_var=1e9")
    params = trainable(trainer)
    with caplog.at_level(logging.WARNING, logger="fairseq_mmkd.runtime.guards"):
        step(trainer, batches[0])
        step(trainer, batches[1])
    warnings = [r for r in caplog.records if "min_pred_var" in r.getMessage()]
    assert len(warnings) == 1, "the collapse warning is rate-limited"
    assert "update 1: prediction variance pred_var=" in warnings[0].getMessage()
    assert "collapsing" in warnings[0].getMessage()
    assert trainer.get_num_updates() == 2 and trainer.task.guard.skipped_total == 0
    assert not torch.equal(trainable(trainer)["distiller.student_blocks.0.mlp.fc1.weight"],
                           params["distiller.student_blocks.0.mlp.fc1.weight"])


@pytest.mark.parametrize("value, field", [(0, "max_consecutive_nonfinite"), (-1.0, "min_pred_var")])
def test_guard_settings_are_checked_when_the_criterion_is_built(tmp_path, tiny_teacher, photo_folder, value, field):
    with pytest.raises(ValueError, match=f"criterion.{field}={value}"):
        make_trainer(tmp_path, tiny_teacher, photo_folder, f"++criterion.{field}={value}")


def _guard_worker(rank, port, finite_rank, queue):
    """One of two gloo workers: every rank but ``finite_rank`` sees a NaN loss."""
    import torch.distributed as dist

    from fairseq_mmkd.runtime.guards import TrainingGuard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        guard = TrainingGuard(max_consecutive_nonfinite=5)
        model = torch.nn.Linear(2, 2)
        loss = model(torch.ones(1, 2)).sum() * (1.0 if rank == finite_rank else math.nan)
        loss.backward()
        log = {"target_var": torch.tensor(1.0), "pred_var": torch.tensor(0.5), "nsentences": 1}
        queue.put((rank, guard.check(loss, log, model, update_num=0), guard.end_update(0)))
    finally:
        dist.destroy_process_group()


def test_all_workers_take_the_same_skip_decision():
    """Under data parallelism a NaN on one worker skips the update on all of them (all-reduced flag)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_guard_worker, args=(r, port, 0, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, True, True), (1, True, True)], results  # rank 0 is finite yet skips with rank 1


def test_a_diverging_run_stops_with_the_message_on_the_command_line(tmp_path, tiny_teacher, photo_folder):
    """An absurd learning rate: the first updates blow the student up, the next ones are skipped and logged,
    then the run stops (non-zero exit) with the message in its output."""
    proc = hydra_train(tmp_path / "ckpt", f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                       *NO_RETRIEVAL, "optimization.lr=[1e30]", "lr_scheduler.warmup_updates=1",
                       "optimization.clip_norm=0", "common.log_interval=1", "++criterion.max_consecutive_nonfinite=4",
                       check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    expected = "NonFiniteTrainingError: stopping: the loss or gradients were NaN/inf in 4 consecutive updates"
    assert expected in out, out[-3000:]
    assert "learning rate is too high" in out
    skipped = [int(float(r.get("nonfinite_skipped", 0))) for r in json_log_lines(out, "train_inner")]
    assert sum(skipped) == 3, skipped  # the 4th skipped update raises before it is logged
    assert "gradients are Nan/Inf" not in out, "fairseq's own FloatingPointError path must not be reached"
