"""Student export: a trained d2v_kd checkpoint becomes a data2vec2 file that both we and fairseq read."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fairseq_mmkd
from fairseq_mmkd.models._student import load_student

from conftest import REPO, hydra_train


@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory, tiny_teacher, photo_folder):
    save = tmp_path_factory.mktemp("export_run")
    hydra_train(save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                "task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                "checkpoint.maximize_best_checkpoint_metric=false", "optimization.max_update=6",
                "model.student_init=random", "model.student_depth=3")
    return save / "checkpoint_last.pt"


def test_export_round_trip_gives_identical_outputs(student_checkpoint, tmp_path):
    out = tmp_path / "student_d2v2.pt"
    proc = subprocess.run([sys.executable, "-m", "fairseq_mmkd.export", "--checkpoint", str(student_checkpoint),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "depth 3" in proc.stdout
    student = load_student(student_checkpoint)
    exported = fairseq_mmkd.load_d2v_image(out)
    assert exported.cfg.depth == 3 and len(exported.blocks) == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x)["x"], student.forward_features(x), rtol=0, atol=0)
    ema = fairseq_mmkd.load_d2v_image(out, weights="ema")  # data2vec2 loaders expect an _ema copy
    with torch.no_grad():
        torch.testing.assert_close(ema(x)["x"], exported(x)["x"], rtol=0, atol=0)


def test_exported_checkpoint_is_a_valid_data2vec_multi_model_for_fairseq(student_checkpoint, tmp_path):
    """fairseq's own data2vec2 code (patched copy) validates the cfg, builds the model and loads the weights."""
    from fairseq_mmkd.testing.fairseq_reference import fairseq_load_checkpoint

    from fairseq_mmkd.export import export_student

    out = tmp_path / "student_d2v2.pt"
    ours = export_student(student_checkpoint, out)
    state, model = fairseq_load_checkpoint(out)
    assert state["cfg"].model._name == "data2vec_multi"
    assert len(model.blocks) == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, mode="IMAGE", mask=False, features_only=True, remove_extra_tokens=False)["x"]
        torch.testing.assert_close(ours(x)["x"], ref, atol=1e-5, rtol=1e-5)


def test_export_refuses_a_teacher_checkpoint_with_a_clear_message(tiny_teacher, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fairseq_mmkd.export", "--checkpoint", str(tiny_teacher),
                           "--output", str(tmp_path / "x.pt")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not a d2v_kd student checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.pt").exists()
