"""``python -m fairseq_mmkd.retrieval``: teacher and student checkpoints, table and JSON, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fairseq_mmkd import D2vConfig, D2vModel
from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
from fairseq_mmkd.encoders.image import ImageEncoderConfig
from fairseq_mmkd.retrieval import metric_names, write_cifar
from fairseq_mmkd.retrieval.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def write_colour_cifar(root, name, n_train, n_test, classes=3, seed=0):
    """CIFAR files whose classes are noisy pure colours, in the real pickle layout."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(classes, 3))

    def split(n):
        labels = np.arange(n) % classes
        images = np.clip(palette[labels][:, None, None] + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255)
        return images.astype(np.uint8), labels

    write_cifar(root, name, *split(n_train), *split(n_test))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_colour_cifar(root, "cifar10", 20, 9)
    write_colour_cifar(root, "cifar100", 15, 6, seed=1)
    return root


def tiny_model(num_extra_tokens=1) -> D2vModel:
    torch.manual_seed(0)
    return D2vModel(D2vConfig(embed_dim=32, depth=1, num_heads=4, encoder=ImageEncoderConfig(
        input_size=32, patch_size=8, embed_dim=32, prenet_depth=1, num_extra_tokens=num_extra_tokens))).eval()


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny_d2v2.pt"
    save_d2v_checkpoint(tiny_model(), path)
    return path


def test_teacher_checkpoint_prints_table_and_writes_flat_json(teacher_checkpoint, data_root, tmp_path, capsys):
    out = tmp_path / "results" / "teacher.json"
    rc = main(["--checkpoint", str(teacher_checkpoint), "--teacher", "--cifar10", str(data_root),
               "--cifar100", str(data_root), "--json", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    names = metric_names("cifar10") + metric_names("cifar100")
    assert all(isinstance(result[n], float) and 0 <= result[n] <= 100 for n in names)
    assert not any(k.startswith("teacher_") for k in result)
    assert result["model"] == "teacher" and result["pooling"] == "cls" and result["input_size"] == 32
    assert (result["cifar10_train_images"], result["cifar10_test_images"]) == (20, 9)
    assert (result["cifar100_train_images"], result["cifar100_test_images"]) == (15, 6)
    table = capsys.readouterr().out
    assert "inv_top1" in table and f"{result['cifar100_inv_top3']:.2f}" in table


def test_limit_and_mean_pooling(teacher_checkpoint, data_root, tmp_path):
    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(teacher_checkpoint), "--teacher", "--cifar10", str(data_root), "--limit", "5",
                 "--pooling", "mean", "--batch-size", "2", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["pooling"] == "mean" and result["cifar10_train_images"] == 5 and "cifar100_top1" not in result


def test_custom_image_folder_set_is_named_by_the_user(teacher_checkpoint, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("test", 2)):
        for cls, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            (tmp_path / "photos" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.normal(0, 10, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "photos" / split / cls / f"{i}.png")
    out = tmp_path / "custom.json"
    assert main(["--checkpoint", str(teacher_checkpoint), "--teacher", "--custom", str(tmp_path / "photos"),
                 "--custom-name", "photos", "--custom-size", "32", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert (result["photos_train_images"], result["photos_test_images"]) == (8, 4)
    assert set(metric_names("photos")) <= set(result)
    s = result["protocol"]["sets"]["photos"]
    assert (s["memory_size"], s["query_size"], s["num_classes"]) == (8, 4, 2)
    assert "ImageOps.fit" in s["source"] and "32x32" in s["source"] and s["resize_method"] == "none"
    # --folder (the probe's spelling) names the set after the folder, as task.retrieval_folder does
    assert main(["--checkpoint", str(teacher_checkpoint), "--teacher", "--folder", str(tmp_path / "photos"),
                 "--folder-size", "32", "--knn-k", "3", "--json", str(out), "--no-progress"]) == 0
    assert set(metric_names("photos", knn_k=3)) <= set(json.loads(out.read_text()))


def test_student_checkpoint_uses_load_student(data_root, tmp_path, monkeypatch):
    model = tiny_model()
    calls = []

    class FakeStudent(torch.nn.Module):  # the interface fairseq_mmkd.models._student.load_student returns
        num_extra_tokens, input_size = 1, 32
        distiller = types.SimpleNamespace(student_blocks=model.blocks, student_norm=None, cfg=model.cfg)

        def forward_features(self, images, layer=-1):
            return model(images)["block_out"][layer]

    def load_student(path, device="cpu", trust_checkpoint=False):
        calls.append((path, device, trust_checkpoint))
        return FakeStudent()

    monkeypatch.setitem(sys.modules, "fairseq_mmkd.models._student", types.SimpleNamespace(load_student=load_student))
    out = tmp_path / "student.json"
    assert main(["--checkpoint", "student.pt", "--cifar100", str(data_root), "--json", str(out), "--device", "cpu",
                 "--trust-checkpoint", "--no-progress"]) == 0
    assert calls == [("student.pt", "cpu", True)]
    result = json.loads(out.read_text())
    assert result["model"] == "student" and set(metric_names("cifar100")) <= set(result)


@pytest.mark.parametrize("args, message", [
    (["--cifar10", "{empty}"], "cifar-10-batches-py/data_batch_1..5, test_batch"),
    (["--cifar100", "{empty}"], "cifar-100-python/train, test"),
    ([], "pass at least one of --cifar10 DIR, --cifar100 DIR"),
    (["--cifar10", "{data}", "--checkpoint", "{garbage}"], "not a PyTorch checkpoint"),
    (["--cifar10", "{data}", "--checkpoint", "{missing}"], "file not found"),
])
def test_errors_are_one_line_with_exit_status_2(teacher_checkpoint, data_root, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello, not a checkpoint")
    fill = dict(empty=tmp_path, data=data_root, garbage=garbage, missing=tmp_path / "nope.pt")
    argv = ["--checkpoint", str(teacher_checkpoint), "--teacher", "--no-progress"] + [a.format(**fill) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_cls_pooling_on_a_model_without_cls_token_is_reported(tmp_path, data_root, capsys):
    path = tmp_path / "no_cls.pt"
    save_d2v_checkpoint(tiny_model(num_extra_tokens=0), path)
    assert main(["--checkpoint", str(path), "--teacher", "--cifar10", str(data_root), "--no-progress"]) == 2
    assert "use --pooling mean" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(teacher_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fairseq_mmkd.retrieval", "--checkpoint", str(teacher_checkpoint),
                           "--teacher", "--cifar10", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "prepare_data.py --cifar" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["scripts/prepare_data.py", "scripts/bench_retrieval.py",
                                    "scripts/measure_pooling.py"])
def test_scripts_show_help(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.fixture(scope="module")
def deeper_teacher(tmp_path_factory):
    """Two blocks, input size 48: CIFAR's 32 px images are resized (what the protocol must say)."""
    torch.manual_seed(1)
    model = D2vModel(D2vConfig(embed_dim=32, depth=2, num_heads=4, encoder=ImageEncoderConfig(
        input_size=48, patch_size=8, embed_dim=32, prenet_depth=0, num_extra_tokens=1))).eval()
    path = tmp_path_factory.mktemp("deeper") / "teacher48.pt"
    save_d2v_checkpoint(model, path)
    return path


@pytest.mark.parametrize("extra", [[], ["--pooling", "mean", "--layer", "-2", "--standardize", "--knn-k", "5",
                                        "--knn-temperature", "0.1", "--limit", "12"]],
                         ids=["defaults", "every_choice"])
def test_json_protocol_records_what_ran_and_reproduces_the_numbers(deeper_teacher, data_root, tmp_path, extra):
    from fairseq_mmkd import load_d2v_image
    from fairseq_mmkd.distill.distiller import block_features
    from fairseq_mmkd.retrieval import evaluate_retrieval, load_cifar

    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(deeper_teacher), "--teacher", "--cifar10", str(data_root), "--json", str(out),
                 "--device", "cpu", "--no-progress", "--backend", "torch", *extra]) == 0
    result = json.loads(out.read_text())
    p = result["protocol"]
    limit = 12 if extra else None
    expected = dict(pooling="mean", layer=-2, standardize=True, knn_k=5, knn_temperature=0.1) if extra else \
        dict(pooling="cls", layer=-1, standardize=False, knn_k=20, knn_temperature=0.07)
    assert {k: p[k] for k in expected} == expected
    assert p["knn_weighting"].keys() == {f"knn{expected['knn_k']}", f"knn{expected['knn_k']}_uniform"}
    assert (p["model"], p["weights"], p["blocks"], p["block"]) == ("teacher", "model", 2, 3 + expected["layer"])
    assert (p["dtype"], p["device"], p["input_size"], p["search"]) == ("float32", "cpu", 48, "exact (torch)")
    s = p["sets"]["cifar10"]
    assert (s["memory_split"], s["memory_size"], s["query_split"], s["query_size"]) == \
        ("train", limit or 20, "test", min(limit or 9, 9))
    assert (s["resize_method"], s["resize_from"], s["resize_to"], s["resize_antialias"]) == \
        ("bicubic", [32, 32], [48, 48], False)
    assert s["normalization_std"] == [0.229, 0.224, 0.225] and "CIFAR-10 python pickles" in s["source"]

    # Everything needed to recompute the numbers is in the record.
    model = load_d2v_image(deeper_teacher, weights=p["weights"])
    again = evaluate_retrieval(lambda x: block_features(model.blocks, model.encoder(x), model.cfg.num_heads, p["layer"],
                                                        model.norm),
                               {"cifar10": load_cifar(data_root, "cifar10", limit=limit)},
                               input_size=p["input_size"], num_extra_tokens=p["num_extra_tokens"],
                               pooling=p["pooling"], ks=p["retrieval_ks"], knn_k=p["knn_k"],
                               knn_temperature=p["knn_temperature"], standardize=p["standardize"], device="cpu",
                               backend="torch", progress=False)
    assert again == {k: result[k] for k in again}
    assert f"cifar10_knn{expected['knn_k']}_uniform" in again


def test_retrieval_benchmark_runs_at_tiny_size_and_times_knn():
    proc = subprocess.run([sys.executable, "scripts/bench_retrieval.py", "--memory", "300", "--queries", "60",
                           "--dim", "16", "--classes", "5", "--images", "0", "--naive-queries", "10", "--repeats", "1",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    knn = [line for line in proc.stdout.splitlines() if "kNN-20 from the same search" in line]
    assert knn and knn[0].strip().startswith("torch:") and "the two votes alone" in knn[0], proc.stdout
