"""Configuration mistakes stop the run before training starts, with one clear message, and overwrite nothing.

Representative cases go through the real ``fairseq-hydra-train`` into a save dir that already holds a
previous run's checkpoints, which must stay byte-identical. The rest call the task directly (same code
path, seconds cheaper).

What fairseq itself does with these mistakes, and what the plugin adds:
- ``dataset.batch_size=0``: fairseq reads 0 as "no limit" and trains on the whole dataset as one batch;
  the task refuses it (``get_batch_iterator``), after the previous checkpoint was read but before anything
  is written.
- An unwritable ``checkpoint.save_dir``: Hydra already fails creating its log folder inside it
  (``hydra.run.dir: ${checkpoint.save_dir}/hydra``), naming the path. With Hydra's folder elsewhere,
  fairseq's ``verify_checkpoint_directory`` fails first thing in ``train.main``; the plugin rewords it
  to name ``checkpoint.save_dir``.
- A teacher whose ``input_size`` is not a multiple of its ``patch_size``, or with NaN/inf weights, would
  train silently wrong; the task refuses it after loading (``check_teacher``).
"""
from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import hydra_train, make_teacher

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

NO_RETRIEVAL = ["task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                "checkpoint.maximize_best_checkpoint_metric=false"]


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_teacher, photo_folder):
    """A save dir holding the checkpoints of a finished 2-update run."""
    save = tmp_path_factory.mktemp("previous") / "ckpt"
    hydra_train(save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}", *NO_RETRIEVAL,
                "optimization.max_update=2")
    assert (save / "checkpoint_last.pt").exists()
    return save


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.pt"))}


def fails_before_training(save, *overrides) -> str:
    """Run the real CLI; assert it fails before training without touching the checkpoints; return its output."""
    before = snapshot(save) if save.exists() else {}
    proc = hydra_train(save, *overrides, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "begin training" not in out and "Saving checkpoint" not in out, out[-3000:]
    if save.exists():
        assert snapshot(save) == before, "checkpoints of the previous run were modified"
    return out


@pytest.fixture
def reused_save(tmp_path, previous_run):
    save = tmp_path / "ckpt"
    shutil.copytree(previous_run, save)
    return save


def test_student_deeper_than_the_teacher(reused_save, tiny_teacher, photo_folder):
    out = fails_before_training(reused_save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                                *NO_RETRIEVAL, "model.student_depth=9")
    assert "ValueError: student_depth=9 exceeds the teacher's 4 shared blocks" in out, out[-3000:]
    assert "student_init=random" in out  # the way out is named


def test_batch_size_zero(reused_save, tiny_teacher, photo_folder):
    out = fails_before_training(reused_save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                                *NO_RETRIEVAL, "dataset.batch_size=0")
    assert "dataset.batch_size=0: fairseq reads it as 'no limit' and would put all 18 training images into one " \
           "batch" in out, out[-3000:]


def test_warmup_as_long_as_the_run(reused_save, tiny_teacher, photo_folder):
    # fairseq's cosine schedule divides by max_update - warmup_updates at the last update: a ZeroDivisionError
    # after all the training, before the last checkpoint is written
    out = fails_before_training(reused_save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                                *NO_RETRIEVAL, "optimization.max_update=5", "lr_scheduler.warmup_updates=5")
    assert "ValueError: lr_scheduler.warmup_updates=5 equals optimization.max_update=5" in out, out[-3000:]
    assert "use fewer warmup updates" in out and "num. shared model params" not in out


def test_missing_cifar_file_with_retrieval_on(reused_save, tiny_teacher, photo_folder, tiny_cifar, tmp_path):
    cifar = tmp_path / "cifar"
    shutil.copytree(tiny_cifar, cifar)
    (cifar / "cifar-10-batches-py" / "test_batch").unlink()
    out = fails_before_training(reused_save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                                f"task.cifar10_root={cifar}", f"task.cifar100_root={cifar}")
    assert f"{cifar}/cifar-10-batches-py/test_batch: file not found" in out, out[-3000:]
    assert "prepare_data.py" in out  # how to get the files
    assert "num. shared model params" not in out, "checked before the teacher is loaded"


@pytest.mark.parametrize("hydra_dir_elsewhere", [False, True], ids=["default_hydra_dir", "hydra_dir_elsewhere"])
def test_unwritable_save_dir(tmp_path, tiny_teacher, photo_folder, hydra_dir_elsewhere):
    blocker = tmp_path / "a_file"  # a path under a regular file cannot be created, whoever runs the test
    blocker.write_text("not a folder")
    save = blocker / "ckpt"
    extra = [f"hydra.run.dir={tmp_path / 'hydra_logs'}"] if hydra_dir_elsewhere else []
    out = fails_before_training(save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                                *NO_RETRIEVAL, *extra)
    if hydra_dir_elsewhere:  # fairseq's own check, reworded by the plugin
        expected = f"SaveDirError: checkpoint.save_dir={save} is not a writable folder (NotADirectoryError"
        assert expected in out, out[-3000:]
    else:  # Hydra creates its log folder inside the save dir before fairseq starts
        assert f"NotADirectoryError: [Errno 20] Not a directory: '{save}/hydra'" in out, out[-3000:]
    assert "num. shared model params" not in out, "fails before the teacher is loaded"
    assert blocker.read_text() == "not a folder"


# ---- the task, called directly ----------------------------------------------------------------------------


def build_model(photos, **model_fields):
    from fairseq_mmkd.models.d2v_kd import D2vKDModelConfig
    from fairseq_mmkd.tasks.d2v_kd import D2vKDTask, D2vKDTaskConfig

    task = D2vKDTask.setup_task(D2vKDTaskConfig(data=str(photos), retrieval=False))
    cfg = OmegaConf.structured(D2vKDModelConfig(_name="d2v_kd", **model_fields))
    return task.build_model(cfg)


def test_student_depth_zero(tiny_teacher, photo_folder):
    with pytest.raises(ValueError, match="student_depth must be >= 1, got 0"):
        build_model(photo_folder, teacher_checkpoint=str(tiny_teacher), student_depth=0)


def test_input_size_not_a_multiple_of_the_patch_size(tmp_path, photo_folder):
    from fairseq_mmkd import CheckpointError

    teacher = make_teacher(tmp_path / "odd.pt", input_size=36, patch_size=8)
    with pytest.raises(CheckpointError) as info:
        build_model(photo_folder, teacher_checkpoint=str(teacher), student_depth=2)
    msg = str(info.value)
    assert str(teacher) in msg and "input_size 36 is not a multiple of patch_size 8" in msg, msg


def test_teacher_with_nonfinite_weights(tmp_path, tiny_teacher, photo_folder):
    from fairseq_mmkd import CheckpointError

    state = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    key = next(k for k in state["model"] if k.startswith("blocks.2."))
    state["model"][key][0] = float("nan")
    bad = tmp_path / "nan_teacher.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="weight tensors contain NaN/inf .* the teacher checkpoint is corrupt"):
        build_model(photo_folder, teacher_checkpoint=str(bad), student_depth=2)


def test_student_checkpoint_passed_as_teacher(previous_run, photo_folder):
    from fairseq_mmkd import CheckpointError

    student = previous_run / "checkpoint_last.pt"
    with pytest.raises(CheckpointError) as info:
        build_model(photo_folder, teacher_checkpoint=str(student), student_depth=2)
    msg = str(info.value)
    assert str(student) in msg and "is a 'd2v_kd' model" in msg and "a student checkpoint of this plugin" in msg, msg


def test_ema_teacher_requested_from_a_file_without_ema(tmp_path, tiny_teacher, photo_folder):
    from fairseq_mmkd import CheckpointError

    state = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    del state["model"]["_ema"]
    no_ema = tmp_path / "no_ema.pt"
    torch.save(state, no_ema)
    with pytest.raises(CheckpointError, match=r"has no EMA weights \('_ema'\); use .*teacher_weights=model"):
        build_model(photo_folder, teacher_checkpoint=str(no_ema), teacher_weights="ema", student_depth=2)
    build_model(photo_folder, teacher_checkpoint=str(no_ema), teacher_weights="model", student_depth=2)  # the fix


@pytest.mark.parametrize("fields, message", [
    (dict(knn_k=-1), "task.knn_k=-1: use the number of neighbours that vote (DINO: 20), or 0 for no k-NN metrics"),
    (dict(knn_temperature=0.0), "task.knn_temperature=0.0 must be positive (DINO: 0.07)"),
    (dict(retrieval_layer=1), "task.retrieval_layer=1: use -1 for the last block or -k for the k-th from last"),
])
def test_bad_knn_or_layer_settings_stop_before_the_teacher_loads(photo_folder, fields, message):
    from fairseq_mmkd.tasks.d2v_kd import D2vKDTask, D2vKDTaskConfig

    with pytest.raises(ValueError) as info:
        D2vKDTask.setup_task(D2vKDTaskConfig(data=str(photo_folder), retrieval=False, **fields))
    assert str(info.value) == message


@pytest.mark.parametrize("fields, teacher_fields, message", [
    (dict(retrieval_layer=-3), {}, "task.retrieval_layer=-3, but the student has 2 blocks; use a layer between -2 "
                                   "and -1"),
    (dict(retrieval_layer=-5), {"student_depth": 6}, "task.retrieval_layer=-5, but the teacher has 4 blocks"),
    (dict(retrieval_pooling="cls+mean"), {"num_extra_tokens": 0}, "has no extra (CLS) token; use "
                                                                   "task.retrieval_pooling=mean"),
])
def test_retrieval_settings_the_model_cannot_serve_stop_before_training(tmp_path, photo_folder, tiny_cifar, fields,
                                                                        teacher_fields, message):
    from fairseq_mmkd.models.d2v_kd import D2vKDModelConfig
    from fairseq_mmkd.tasks.d2v_kd import D2vKDTask, D2vKDTaskConfig

    student_depth = teacher_fields.pop("student_depth", 2)
    teacher = make_teacher(tmp_path / "teacher.pt", **teacher_fields)
    task = D2vKDTask.setup_task(D2vKDTaskConfig(data=str(photo_folder), cifar10_root=str(tiny_cifar), **fields))
    cfg = OmegaConf.structured(D2vKDModelConfig(_name="d2v_kd", teacher_checkpoint=str(teacher),
                                                student_depth=student_depth, student_init="random"))
    with pytest.raises(ValueError) as info:
        task.build_model(cfg)
    assert message in str(info.value)
