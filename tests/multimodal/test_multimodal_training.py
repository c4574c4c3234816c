"""One student, three teachers, as users run it: the real ``fairseq-hydra-train`` with ``kd_multimodal`` on tiny
image, text and audio teachers written in fairseq's format and the data formats of the single-modality tests."""
from __future__ import annotations

import pytest
import torch

from conftest import (DISTRIBUTED, TINY_MULTIMODAL, assert_same_losses, assert_same_training, assert_same_updates,
                      gradient_free_names, hydra_train, json_log_lines, launcher, learning_rates, load_last,
                      make_sequence_teacher, modality_args)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# what makes the tiny runs tiny, on top of preset=tiny (the per-modality batch sizes of SIZES)
NO_RETRIEVAL = ["task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                "checkpoint.maximize_best_checkpoint_metric=false"]


def train(save, *overrides, **kwargs):
    return hydra_train(save, *TINY_MULTIMODAL, *overrides, config="kd_multimodal", **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sequence_setup, photo_folder, tiny_teacher, tiny_cifar, retrieval_folders):
    """One 40-update run of all three modalities from a random student, validated by every retrieval set."""
    save = tmp_path_factory.mktemp("multimodal") / "ckpt"
    proc = train(save, *modality_args(sequence_setup, photo_folder, tiny_teacher),
                 f"task.cifar10_root={tiny_cifar}", f"task.cifar100_root={tiny_cifar}",
                 f"task.text_retrieval_folder={retrieval_folders['text']}",
                 f"task.audio_retrieval_folder={retrieval_folders['audio']}", "task.knn_k=3",
                 "optimization.max_update=40")
    return save, proc.stdout + proc.stderr


def test_loss_falls_for_every_modality(trained):
    _, log = trained
    rows = json_log_lines(log, "train_inner")
    assert int(rows[-1]["num_updates"]) == 40
    for m in ("image", "text", "audio"):
        losses = [float(r[f"loss_{m}"]) for r in rows]
        assert losses[-1] < 0.7 * losses[0], (m, losses)
        assert float(rows[-1][f"pred_var_{m}"]) > 0.1 and float(rows[-1][f"target_var_{m}"]) > 0.1
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_every_modality_is_validated_under_its_single_modality_names(trained):
    import json

    save, log = trained
    valid = json_log_lines(log, "valid")[-1]
    for name in ("cifar10", "cifar100", "topics", "tones"):
        for metric in ("top1", "top3", "inv_top1", "inv_top3", "knn3", "knn3_uniform"):
            assert 0 <= float(valid[f"valid_{name}_{metric}"]) <= 100
            assert f"valid_teacher_{name}_{metric}" in valid
    for m in ("image", "text", "audio"):
        assert f"valid_loss_{m}" in valid
    record = json.loads((save / "eval_protocol.json").read_text())
    assert set(record["modalities"]) == {"image", "text", "audio"}
    assert record["modalities"]["text"]["student"]["pooling"] == "mean"
    assert record["modalities"]["image"]["student"]["pooling"] == "cls"


def test_checkpoints_hold_encoders_and_student_but_no_teacher_blocks(trained):
    save, _ = trained
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    keys = list(state["model"])
    assert not any(".teacher_blocks." in k for k in keys)
    for m in ("image", "text", "audio"):
        assert any(k.startswith(f"distiller.shared_encoders.{m}.") for k in keys), m
    assert any(k.startswith("distiller.student_blocks.") for k in keys)
    assert set(state["task_state"]["teacher_archs"]) == {"image", "text", "audio"}
    assert state["task_state"]["teacher_task_cfgs"]["audio"] == {"normalize": True}


def test_one_modality_run_equals_the_single_modality_run(tmp_path, photo_folder, tiny_teacher):
    """With only the image teacher the multimodal run is the kd_image run with the same settings: the same
    batches, initialisation, loss and updates."""
    common = ["optimization.max_update=12", "model.student_depth=2", "common.log_interval=1", *NO_RETRIEVAL]
    single = hydra_train(tmp_path / "single", f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                         "model.student_init=random", "dataset.batch_size=8", *common)
    multi = train(tmp_path / "multi", f"task.image_data={photo_folder}", f"model.image_teacher={tiny_teacher}",
                  "model.student_init=random", *common)
    a = torch.load(tmp_path / "single" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "multi" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    rename = {"distiller.shared_encoder.": "distiller.shared_encoders.image."}
    mapped = {next((k.replace(old, new) for old, new in rename.items() if k.startswith(old)), k): v
              for k, v in a["model"].items()}
    assert set(mapped) == set(b["model"])
    log_single, log_multi = single.stdout + single.stderr, multi.stdout + multi.stderr
    assert gradient_free_names(log_single) == gradient_free_names(log_multi)
    assert_same_updates({"model": mapped}, b, learning_rates(log_single), gradient_free_names(log_single))
    assert_same_losses(log_single, log_multi)


def test_resume_is_exact(tmp_path, sequence_setup, photo_folder, tiny_teacher):
    """Interrupted and resumed, every modality continues where it stopped: the same weights, Adam moments and
    schedule as an uninterrupted run (each modality's epochs and shuffles are functions of the step)."""
    common = [*modality_args(sequence_setup, photo_folder, tiny_teacher), "lr_scheduler.max_update=14",
              "model.student_init=random", "common.log_interval=1", *NO_RETRIEVAL]
    straight = train(tmp_path / "straight", *common, "optimization.max_update=14")
    train(tmp_path / "resumed", *common, "optimization.max_update=5")
    resumed = train(tmp_path / "resumed", *common, "optimization.max_update=14")
    out = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in out and "@ 5 updates" in out, out[-3000:]
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert b["optimizer_history"][-1]["num_updates"] == 14
    log = straight.stdout + straight.stderr
    assert_same_updates(a, b, learning_rates(log), gradient_free_names(log))
    moments = lambda s: [v["exp_avg_sq"] for v in s["last_optimizer_state"]["state"].values()]  # noqa: E731
    for x, y in zip(moments(a), moments(b)):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-5)


def test_two_processes_agree_with_one(tmp_path, sequence_setup, photo_folder, tiny_teacher):
    common = [*modality_args(sequence_setup, photo_folder, tiny_teacher), "optimization.max_update=6",
              "dataset.validate_interval_updates=6", "model.student_init=random", "common.log_interval=1",
              *NO_RETRIEVAL]
    one = train(tmp_path / "one", *common, "optimization.update_freq=[2]")
    two = train(tmp_path / "two", *common, *DISTRIBUTED, launcher=launcher(), env={"MASTER_ADDR": "127.0.0.1"})
    a, b = load_last(tmp_path / "one"), load_last(tmp_path / "two")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 6
    assert_same_training(one, two, a, b)


def test_bf16_training_keeps_the_frozen_teachers_in_bf16(tmp_path, sequence_setup, photo_folder, tiny_teacher):
    """With common.bf16 the three frozen teachers' blocks run in bf16 (half their fp32 memory), as the encoders
    and the student do; every modality's loss stays finite and falls."""
    proc = train(tmp_path / "bf16", *modality_args(sequence_setup, photo_folder, tiny_teacher), "common.bf16=true",
                 "optimization.max_update=8", "common.log_interval=4", "model.student_init=random", *NO_RETRIEVAL)
    out = proc.stdout + proc.stderr
    line = next((ln for ln in out.splitlines() if "precision: " in ln), "")
    assert "frozen teacher blocks bfloat16" in line and "frozen encoders bfloat16" in line \
        and "student bfloat16" in line, out[-3000:]
    rows = json_log_lines(out, "train_inner")
    assert len(rows) == 2
    for m in ("image", "text", "audio"):
        first, last = float(rows[0][f"loss_{m}"]), float(rows[-1][f"loss_{m}"])
        assert torch.isfinite(torch.tensor([first, last])).all() and last < first, (m, first, last)


def fails_before_training(save, *overrides) -> str:
    proc = train(save, *overrides, *NO_RETRIEVAL, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "begin training" not in out, out[-3000:]
    return out


def test_configuration_mistakes_are_one_line(tmp_path, sequence_setup, photo_folder, tiny_teacher):
    text_data, text_teacher = sequence_setup["text"]
    audio_data, audio_teacher = sequence_setup["audio"]
    out = fails_before_training(tmp_path / "a")
    assert "no training data is set" in out
    out = fails_before_training(tmp_path / "b", f"task.image_data={photo_folder}")
    assert "no teacher is set" in out
    out = fails_before_training(tmp_path / "c", f"task.image_data={photo_folder}", f"model.image_teacher={tiny_teacher}",
                                f"model.text_teacher={text_teacher}")
    assert "model.text_teacher is set but task.text_data is not" in out
    out = fails_before_training(tmp_path / "d", f"task.text_data={audio_data}", f"model.text_teacher={text_teacher}")
    assert f"task.text_data={audio_data} holds audio" in out
    wide = make_sequence_teacher(tmp_path / "wide.pt", "audio", embed_dim=48, num_heads=4, conv_pos_groups=4)
    out = fails_before_training(tmp_path / "e", f"task.image_data={photo_folder}", f"model.image_teacher={tiny_teacher}",
                                f"task.audio_data={audio_data}", f"model.audio_teacher={wide}")
    assert "the teachers' embed_dim differ" in out and f"image teacher {tiny_teacher}: 32" in out \
        and f"audio teacher {wide}: 48" in out, out[-3000:]
