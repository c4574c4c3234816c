"""Distillation as users run it: real ``fairseq-hydra-train`` runs on a tiny teacher and image folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REPO, assert_same_updates, gradient_free_names, hydra_train, json_log_lines, learning_rates

# Evaluation choices of the retrieval run: every one off its default, so the run shows they reach the task
# (the defaults run in the demo and the distributed test). Hydra takes "cls+mean" as a plain value.
EVAL_CHOICES = ["task.retrieval_pooling=cls+mean", "task.retrieval_layer=-2", "task.retrieval_standardize=true",
                "task.knn_k=10", "task.knn_temperature=0.1"]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def data_args(teacher, photos, cifar=None):
    args = [f"task.data={photos}", f"model.teacher_checkpoint={teacher}"]
    if cifar is None:
        # without retrieval metrics the best checkpoint is chosen by the validation loss
        return args + ["task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                       "checkpoint.maximize_best_checkpoint_metric=false"]
    return args + [f"task.cifar10_root={cifar}", f"task.cifar100_root={cifar}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher, photo_folder, tiny_cifar):
    """One 50-update run from a random student, validated by retrieval and k-NN."""
    save = tmp_path_factory.mktemp("run") / "ckpt"
    proc = hydra_train(save, *data_args(tiny_teacher, photo_folder, tiny_cifar), "model.student_init=random",
                       *EVAL_CHOICES)
    return save, proc.stdout + proc.stderr


def test_loss_falls_clearly_over_50_updates(trained):
    _, log = trained
    losses = [float(r["loss"]) for r in json_log_lines(log, "train_inner")]
    assert len(losses) >= 5
    assert losses[-1] < 0.5 * losses[0], losses
    last = json_log_lines(log, "train_inner")[-1]
    assert int(last["num_updates"]) == 50
    assert float(last["pred_var"]) > 0.1 and float(last["target_var"]) > 0.1


def test_retrieval_metrics_reach_the_valid_log_and_pick_the_best_checkpoint(trained):
    save, log = trained
    valid = json_log_lines(log, "valid")
    assert valid, log[-3000:]
    names = [f"cifar{n}_{inv}top{k}" for n in (10, 100) for inv in ("", "inv_") for k in (1, 3)]
    names += [f"cifar{n}_knn10{vote}" for n in (10, 100) for vote in ("", "_uniform")]
    for name in names:
        assert 0.0 <= float(valid[-1][f"valid_{name}"]) <= 100.0
        assert f"valid_teacher_{name}" in valid[-1]
    assert float(valid[-1]["valid_cifar10_top3"]) >= float(valid[-1]["valid_cifar10_top1"])
    best = torch.load(save / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    assert best["cfg"]["checkpoint"]["best_checkpoint_metric"] == "cifar100_top1"
    scores = [float(v["valid_cifar100_top1"]) for v in valid]
    assert best["extra_state"]["best"] == pytest.approx(max(scores), abs=0.01)


def test_eval_protocol_json_records_the_run_and_reproduces_its_numbers(trained, tiny_teacher, tiny_cifar, tmp_path):
    """SAVE_DIR/eval_protocol.json says how the valid metrics were computed; the standalone evaluator, given
    those settings, recomputes the last validation's student and teacher metrics from checkpoint_last.pt."""
    from fairseq_mmkd.retrieval.__main__ import main as retrieval_main

    save, log = trained
    record = json.loads((save / "eval_protocol.json").read_text())
    assert record["written_at_update"] == 25  # the first validation
    student, teacher = record["student"], record["teacher"]
    for p in (student, teacher):
        assert (p["pooling"], p["layer"], p["standardize"], p["knn_k"], p["knn_temperature"]) == \
            ("cls+mean", -2, True, 10, 0.1)
        assert (p["dtype"], p["device"], p["input_size"]) == ("float32", "cpu", 32)
        assert [(s["memory_size"], s["query_size"]) for s in p["sets"].values()] == [(40, 20), (100, 50)]
        assert p["sets"]["cifar10"]["resize_method"] == "none"  # tiny teacher: 32 px input, CIFAR's own size
    assert (student["weights"], student["blocks"], student["block"]) == ("student", 2, 1)
    assert (teacher["weights"], teacher["blocks"], teacher["block"]) == ("model", 4, 3)

    last = json_log_lines(log, "valid")[-1]
    assert int(last["valid_num_updates"]) == 50
    for who, checkpoint, extra in (("student", save / "checkpoint_last.pt", []),
                                   ("teacher", tiny_teacher, ["--teacher", "--weights", teacher["weights"]])):
        p = record[who]
        out = tmp_path / f"{who}.json"
        assert retrieval_main(["--checkpoint", str(checkpoint), *extra, "--cifar10", str(tiny_cifar), "--cifar100",
                               str(tiny_cifar), "--pooling", p["pooling"], "--layer", str(p["layer"]),
                               "--standardize", "--knn-k", str(p["knn_k"]), "--knn-temperature",
                               str(p["knn_temperature"]), "--device", "cpu", "--json", str(out),
                               "--no-progress"]) == 0
        result = json.loads(out.read_text())
        assert {k: v for k, v in result["protocol"].items() if k != "checkpoint"} == p
        prefix = "valid_" if who == "student" else "valid_teacher_"
        names = [k[len(prefix):] for k in last if k.startswith(prefix) and k[len(prefix):] in result]
        assert len(names) == 12, names  # 2 sets x (top1, top3, inv_top1, inv_top3, knn10, knn10_uniform)
        for name in names:  # the log rounds to 2 decimals
            assert float(last[prefix + name]) == pytest.approx(result[name], abs=0.0051), (who, name)


def test_linear_probe_runs_on_the_trained_student(trained, tiny_cifar, tmp_path):
    from fairseq_mmkd.probe import main as probe_main

    save, _ = trained
    out = tmp_path / "probe.json"
    assert probe_main(["--checkpoint", str(save / "checkpoint_last.pt"), "--cifar10", str(tiny_cifar), "--layer",
                       "-2", "--pooling", "cls+mean", "--device", "cpu", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["cifar10_linear_top1"] <= 100.0
    p = result["protocol"]
    assert (p["model"], p["weights"], p["blocks"], p["block"], p["pooling"]) == ("student", "student", 2, 1, "cls+mean")
    assert result["cifar10_probe"]["feature_dim"] == 64


def test_student_checkpoint_excludes_teacher_blocks(trained, tiny_teacher):
    save, _ = trained
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    keys = list(state["model"])
    assert not [k for k in keys if k.startswith("distiller.teacher_blocks")]
    assert any(k.startswith("distiller.shared_encoder.") for k in keys)
    assert sum(k.startswith("distiller.student_blocks.1.") for k in keys) == 12
    assert "teacher_arch" in state["task_state"], "the teacher architecture must be recorded"


def test_trained_checkpoint_loads_for_inference_without_the_teacher_file(trained, tmp_path):
    save, _ = trained
    import fairseq_mmkd  # noqa: F401  (fairseq's loader does not import the user dir itself)
    from fairseq import checkpoint_utils

    from fairseq_mmkd.models._student import load_student

    teacher_gone = tmp_path / "gone.pt"  # the path recorded in the checkpoint no longer exists
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    state["cfg"]["model"]["teacher_checkpoint"] = str(teacher_gone)
    state["cfg"]["task"]["data"] = str(tmp_path / "no_data")
    moved = tmp_path / "student.pt"
    torch.save(state, moved)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(moved)], arg_overrides={"user_dir": str(REPO / "fairseq_mmkd")})
    model = models[0].eval()
    assert model.distiller.teacher_blocks is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
    student = load_student(moved)
    with torch.no_grad():
        torch.testing.assert_close(student.forward_features(x), feats)
    assert feats.shape == (2, 1 + 16, 32)


def test_resume_continues_from_the_last_update_with_the_same_state(tmp_path, tiny_teacher, photo_folder):
    # the cosine schedule spans 30 updates in both runs; the first resumed run just stops at 15
    args = [*data_args(tiny_teacher, photo_folder), "lr_scheduler.max_update=30", "common.log_interval=1"]
    straight = hydra_train(tmp_path / "straight", *args, "optimization.max_update=30")
    hydra_train(tmp_path / "resumed", *args, "optimization.max_update=15")
    resumed = hydra_train(tmp_path / "resumed", *args, "optimization.max_update=30")
    out = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in out and "@ 15 updates" in out, out[-3000:]
    first = json_log_lines(out, "train_inner")[0]
    assert int(first["num_updates"]) > 15
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert b["optimizer_history"][-1]["num_updates"] == 30
    assert b["optimizer_history"][-1]["lr_scheduler_state"] == a["optimizer_history"][-1]["lr_scheduler_state"]
    log = straight.stdout + straight.stderr
    assert_same_updates(a, b, learning_rates(log), gradient_free_names(log))
    exp_avg = lambda s: [v["exp_avg"] for v in s["last_optimizer_state"]["state"].values()]  # noqa: E731
    for x, y in zip(exp_avg(a), exp_avg(b)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_unreadable_images_are_skipped_counted_and_logged(tmp_path, tiny_teacher, photo_folder):
    photos = tmp_path / "photos"
    shutil.copytree(photo_folder, photos)
    bad = photos / "class_0" / "broken.jpg"
    bad.write_bytes(b"")
    proc = hydra_train(tmp_path / "ckpt", *data_args(tiny_teacher, photos), "optimization.max_update=10",
                       "task.max_bad_image_fraction=0.2")
    out = proc.stdout + proc.stderr
    assert "broken.jpg" in out
    assert any(float(r.get("bad_images", 0)) >= 1 for r in json_log_lines(out, "train_inner") + json_log_lines(out, "train"))


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "missing_teacher", "teacher_is_not_d2v"])
def test_bad_inputs_fail_before_training_with_a_clear_message(case, tmp_path, tiny_teacher, photo_folder):
    teacher, data = tiny_teacher, photo_folder
    if case == "missing_data":
        data, expect = tmp_path / "nope", "nope"
    elif case == "empty_data":
        data = tmp_path / "empty"
        data.mkdir()
        expect = "no images"
    elif case == "missing_teacher":
        teacher, expect = tmp_path / "missing.pt", "file not found"
    else:
        teacher = tmp_path / "random.pt"
        teacher.write_bytes(b"not a checkpoint at all")
        expect = "not a PyTorch checkpoint"
    save = tmp_path / "ckpt"
    proc = hydra_train(save, *data_args(teacher, data), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert expect in out, out[-3000:]
    assert "begin training" not in out
    assert not (save / "checkpoint_last.pt").exists()


def test_compiled_training_matches_eager_inside_fairseqs_trainer(tmp_path, tiny_teacher, photo_folder):
    """model.compile=true (the seed config's setting) through the real trainer, inductor on CPU."""
    args = [*data_args(tiny_teacher, photo_folder), "optimization.max_update=6", "model.student_init=random"]
    eager = hydra_train(tmp_path / "eager", *args)
    compiled = hydra_train(tmp_path / "compiled", *args, "model.compile=true")
    losses = [[r["loss"] for r in json_log_lines(p.stdout + p.stderr, "train_inner")] for p in (eager, compiled)]
    assert losses[0] and losses[0] == losses[1]
    a = torch.load(tmp_path / "eager" / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    # Fused kernels reassociate fp32 sums (~1e-7). Adam divides each gradient entry by its own running
    # scale, so on near-zero entries that noise can move a weight by a fraction of one step (lr = 1e-3):
    # weights must agree to well within one step, not to 1e-5.
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=3e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")
