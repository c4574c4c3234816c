"""Checkpoints written before the package moved into role folders (tests/data/legacy/, made by its generate.py with
the code of that time) load, evaluate and resume with today's code: a d2v_kd and a d2v_kd_multimodal (image and
text) training checkpoint of update 5 of a 10-update run."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, hydra_train, json_log_lines, make_text_corpus, write_photos,
                      write_tiny_cifar)

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
RUNS = {"image": None, "multimodal": "image"}  # checkpoint -> the modality its retrieval was evaluated on


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy_data")
    return {"photos": write_photos(root / "photos"), "text": make_text_corpus(root / "text"),
            "cifar": write_tiny_cifar(root / "cifar", "cifar100", 100, n_train=100, n_test=50, seed=1)}


@pytest.mark.parametrize("name", RUNS)
def test_legacy_checkpoint_loads_with_the_features_it_had(name):
    """Float32 through the frozen encoder and two student blocks on another CPU or kernel rounds differently by
    ~1e-6 on features of order 1 (LayerNorm outputs); 1e-5 allows ten times that."""
    from fairseq_mmkd.models._student import load_student

    model = load_student(LEGACY / f"{name}_checkpoint_5.pt")
    model = model.modality_model(RUNS[name]) if RUNS[name] else model
    saved = torch.load(LEGACY / f"{name}_features.pt", weights_only=True)
    with torch.no_grad():
        features = model.forward_features(saved["images"])
    torch.testing.assert_close(features, saved["features"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", RUNS)
def test_legacy_checkpoint_evaluates_to_the_numbers_it_had(name, data, tmp_path):
    """The standalone evaluator gives the recorded metrics; a near-tie of two cosines may rank one query
    differently on another CPU, so each may move by one query of the smaller side (50 test images: 2 points)."""
    out = tmp_path / "retrieval.json"
    subprocess.run([sys.executable, "-m", "fairseq_mmkd.retrieval", "--checkpoint", str(LEGACY / f"{name}_checkpoint_5.pt"),
                    "--cifar100", str(data["cifar"]), "--json", str(out), "--no-progress",
                    *(["--modality", RUNS[name]] if RUNS[name] else [])], cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    metrics = json.loads(out.read_text())
    for key, value in EXPECTED[name]["retrieval"].items():
        assert metrics[key] == pytest.approx(value, abs=100 / 50), key


@pytest.mark.parametrize("name", RUNS)
def test_legacy_checkpoint_resumes_as_the_run_continued(name, data, tmp_path):
    """Resumed at update 5 with today's code, updates 6 to 10 log the losses the uninterrupted run of that time
    logged (printed to 4 decimals: one unit of the last digit apart at most)."""
    save = tmp_path / "run"
    save.mkdir()
    shutil.copyfile(LEGACY / f"{name}_checkpoint_5.pt", save / "checkpoint_last.pt")
    if name == "image":
        args = [f"task.data={data['photos']}", f"model.teacher_checkpoint={LEGACY / 'image_teacher.pt'}"]
        config = "kd_image"
    else:
        args = [f"task.image_data={data['photos']}", f"model.image_teacher={LEGACY / 'image_teacher.pt'}",
                f"task.text_data={data['text']}", f"model.text_teacher={LEGACY / 'text_teacher.pt'}",
                *EXPECTED["multimodal_overrides"]]
        config = "kd_multimodal"
    proc = hydra_train(save, *args, *EXPECTED["common"], config=config)
    out = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in out and "@ 5 updates" in out, out[-3000:]
    resumed = {int(r["num_updates"]): float(r["loss"]) for r in json_log_lines(out, "train_inner")}
    expected = {int(k): v for k, v in EXPECTED[name]["losses"].items() if int(k) > 5}
    assert sorted(resumed) == sorted(expected) == list(range(6, 11))
    assert [resumed[n] for n in expected] == pytest.approx([expected[n] for n in expected], rel=0, abs=1.5e-4)
