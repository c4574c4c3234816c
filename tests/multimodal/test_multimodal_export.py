"""A multimodal student's checkpoints and exports: one real ``fairseq-hydra-train`` run of ``kd_multimodal`` (image,
text and audio teachers, whose files are deleted after training), read back without the teachers, exported as a
multimodal and as single-modality data2vec 2.0 files, and evaluated by the command lines with ``--modality``."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fairseq_mmkd import CheckpointError, load_d2v
from fairseq_mmkd.models._student import load_student
from fairseq_mmkd.testing.fairseq_reference import fairseq_load_multimodal_checkpoint

from conftest import REPO, dictionary_size, hydra_train, make_teacher

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODALITIES = ("image", "text", "audio")


def norm_eps(module) -> list:
    return [m.eps for m in module.modules() if hasattr(m, "eps")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, sequence_setup, photo_folder):
    """10 updates of one student under three teachers; the teacher files are gone afterwards."""
    root = tmp_path_factory.mktemp("multimodal_export")
    teachers = {"image": make_teacher(root / "image_teacher.pt")}
    for m in ("text", "audio"):
        teachers[m] = root / f"{m}_teacher.pt"
        shutil.copy(sequence_setup[m][1], teachers[m])
    save = root / "ckpt"
    hydra_train(save, *[f"model.{m}_teacher={p}" for m, p in teachers.items()], f"task.image_data={photo_folder}",
                f"task.text_data={sequence_setup['text'][0]}", f"task.audio_data={sequence_setup['audio'][0]}",
                "task.tokens_per_sample=16", "task.image_batch_size=8", "task.text_batch_size=8",
                "task.audio_max_tokens=16000", "task.min_sample_size=800", "task.max_sample_size=2000",
                "dataset.batch_size=1", "task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                "checkpoint.maximize_best_checkpoint_metric=false", "optimization.max_update=10",
                config="kd_multimodal")
    encoders = {m: load_d2v(p, modality=m).encoder.state_dict() for m, p in teachers.items()}
    for p in teachers.values():
        p.unlink()
    return SimpleNamespace(ckpt=save / "checkpoint_last.pt", teachers=teachers, teacher_encoders=encoders,
                           text_dict=Path(sequence_setup["text"][0]) / "dict.txt",
                           vocab=dictionary_size(sequence_setup["text"][0]), root=root)


@pytest.fixture(scope="module")
def student(run):
    return load_student(run.ckpt)


@pytest.fixture(scope="module")
def exported(run):
    """The multimodal file, written by the command line."""
    out = run.root / "multimodal_d2v2.pt"
    proc = subprocess.run([sys.executable, "-m", "fairseq_mmkd.export", "--checkpoint", str(run.ckpt), "--output",
                           str(out), "--text-dict", str(run.text_dict)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(path=out, stdout=proc.stdout, stderr=proc.stderr)


def batch(modality: str, vocab: int):
    """``(source, padding_mask)`` of two items, the second padded (text and audio)."""
    gen = torch.Generator().manual_seed(0)
    if modality == "image":
        return torch.randn(2, 3, 32, 32, generator=gen), None
    if modality == "text":
        tokens = torch.randint(4, vocab - 1, (2, 9), generator=gen)
        tokens[:, 0], tokens[0, -1], tokens[1, 5] = 0, 2, 2
        tokens[1, 6:] = 1
        return tokens, tokens.eq(1)
    mask = torch.zeros(2, 1800, dtype=torch.bool)
    mask[1, 1300:] = True
    return torch.randn(2, 1800, generator=gen), mask


def student_features(student, modality, source, padding_mask):
    """The student's features and their padding mask at sequence resolution (None: nothing padded)."""
    with torch.no_grad():
        return student.modality_model(modality).distiller.features(source, padding_mask)


def fairseq_features(model, modality, source, padding_mask):
    with torch.no_grad():
        return model(source, mode=modality.upper(), padding_mask=padding_mask, mask=False, features_only=True,
                     remove_extra_tokens=False)["x"]


def assert_fairseq_matches(fairseq_model, file_cfg, modality, expected, source, padding_mask):
    """fairseq computes the student's features (``expected``: features and padding mask) at every valid position.
    Where the file gives the encoder its own eps (audio here: 1e-5 before 1e-6 blocks), fairseq builds the encoder's
    LayerNorms with the model's ``norm_eps``, close but not equal; given the encoder's own eps, it matches."""
    features, seq_mask = expected
    valid = 1.0 if seq_mask is None else (~seq_mask).unsqueeze(-1).float()
    error = lambda: ((fairseq_features(fairseq_model, modality, source, padding_mask) - features).abs()  # noqa: E731
                     * valid).max().item()
    own = file_cfg["modalities"][modality].get("norm_eps")
    if own is not None:
        norms = [m for m in fairseq_model.modality_encoders[modality.upper()].context_encoder.modules()
                 if isinstance(m, torch.nn.LayerNorm)]
        assert norms and {m.eps for m in norms} == {file_cfg["norm_eps"]} != {own}
        assert error() < 1e-3
        for m in norms:
            m.eps = own
    assert error() <= 1e-5


def test_checkpoints_hold_the_frozen_encoders_and_the_student_and_load_without_the_teachers(run, student):
    state = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    keys = list(state["model"])
    assert not any("teacher_blocks" in k for k in keys)
    for m in MODALITIES:
        assert any(k.startswith(f"distiller.shared_encoders.{m}.") for k in keys), m
    assert any(k.startswith("distiller.student_blocks.") for k in keys)
    assert not any(p.exists() for p in run.teachers.values())  # loaded (fixture) with every teacher file gone
    assert student.modalities == list(MODALITIES) and student.distiller.teacher_blocks is None
    for m in MODALITIES:  # the frozen encoders are the teachers', bit for bit
        encoder = student.distiller.shared_encoders[m].state_dict()
        assert encoder.keys() == run.teacher_encoders[m].keys()
        assert all(torch.equal(encoder[k], v) for k, v in run.teacher_encoders[m].items()), m
        source, padding_mask = batch(m, run.vocab)
        features, _ = student_features(student, m, source, padding_mask)
        assert features.shape[0] == 2 and torch.isfinite(features).all()
    assert student.modality_model("audio").teacher_task_cfg == {"normalize": True}


def test_multimodal_export_runs_every_modality_as_the_student(run, student, exported):
    assert "data2vec_multi multimodal model (image, text, audio" in exported.stdout and "depth 2" in exported.stdout
    assert "the audio encoder's LayerNorm eps (1e-05) differs from the student blocks' (1e-06)" in exported.stderr
    state = torch.load(exported.path, map_location="cpu", weights_only=True)
    cfg = state["cfg"]["model"]
    assert cfg["_name"] == "data2vec_multi" and cfg["supported_modality"] is None and cfg["depth"] == 2
    assert set(cfg["modalities"]) == set(MODALITIES) and cfg["norm_eps"] == 1e-6
    assert cfg["modalities"]["audio"]["norm_eps"] == 1e-5 and "norm_eps" not in cfg["modalities"]["image"]
    assert {k.split(".")[1] for k in state["model"] if k.startswith("modality_encoders.")} == {"IMAGE", "TEXT", "AUDIO"}
    assert state["cfg"]["task"]["_name"] == "multimodal_pretraining"
    assert state["cfg"]["task"]["text"]["data"] == str(run.text_dict.parent.resolve())
    for m in MODALITIES:
        source, padding_mask = batch(m, run.vocab)
        expected, _ = student_features(student, m, source, padding_mask)
        for weights in ("model", "ema"):
            model = load_d2v(exported.path, modality=m, weights=weights)
            with torch.no_grad():
                torch.testing.assert_close(model(source, padding_mask)["x"], expected, rtol=0, atol=0)
        # each encoder keeps its teacher's LayerNorm eps (the audio teacher's 1e-5 before 1e-6 blocks)
        assert norm_eps(model.encoder) == norm_eps(student.distiller.shared_encoders[m])
        assert norm_eps(model.blocks) == norm_eps(student.distiller.student_blocks)
    assert load_d2v(exported.path, modality="audio").fairseq_task_cfg["normalize"] is True
    with pytest.raises(CheckpointError, match=r"multimodal data2vec 2.0 model \(audio, image, text\).*--modality"):
        load_d2v(exported.path)


def test_fairseq_reads_the_multimodal_file(run, student, exported):
    state, model = fairseq_load_multimodal_checkpoint(exported.path)
    assert sorted(model.modality_encoders) == ["AUDIO", "IMAGE", "TEXT"]
    for m in MODALITIES:
        source, padding_mask = batch(m, run.vocab)
        assert_fairseq_matches(model, state["cfg"]["model"], m, student_features(student, m, source, padding_mask),
                               source, padding_mask)


@pytest.mark.parametrize("modality", MODALITIES)
def test_single_modality_export_is_a_file_fairseq_loads(run, student, modality, tmp_path, capsys):
    from fairseq_mmkd.export import main

    out = tmp_path / f"{modality}.pt"
    text = ["--text-dict", str(run.text_dict)] if modality == "text" else []
    if modality == "text":  # without the dictionary: a file for load_d2v, and a note saying what fairseq needs
        assert main(["--checkpoint", str(run.ckpt), "--output", str(out), "--modality", "text"]) == 0
        assert "pass --text-dict DICT.TXT for a file fairseq loads" in capsys.readouterr().err
        assert torch.load(out, weights_only=True)["cfg"]["task"]["data"] == ""
    assert main(["--checkpoint", str(run.ckpt), "--output", str(out), "--modality", modality, *text]) == 0
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["cfg"]["model"]["supported_modality"] == modality.upper()
    assert {k.split(".")[1] for k in state["model"] if k.startswith("modality_encoders.")} == {modality.upper()}
    source, padding_mask = batch(modality, run.vocab)
    expected = student_features(student, modality, source, padding_mask)
    with torch.no_grad():
        torch.testing.assert_close(load_d2v(out)(source, padding_mask)["x"], expected[0], rtol=0, atol=0)
    file_state, fairseq_model = fairseq_load_multimodal_checkpoint(out)
    assert_fairseq_matches(fairseq_model, file_state["cfg"]["model"], modality, expected, source, padding_mask)


def test_exports_carry_the_audio_teachers_normalisation(run, tmp_path):
    from fairseq_mmkd.export import write_student

    student = load_student(run.ckpt)
    student.teacher_task_cfgs["audio"] = {"normalize": False}  # as recorded from a teacher trained without it
    write_student(student, tmp_path / "multi.pt")
    write_student(student, tmp_path / "audio.pt", "audio")
    for path in (tmp_path / "multi.pt", tmp_path / "audio.pt"):
        assert load_d2v(path, modality="audio").fairseq_task_cfg["normalize"] is False


def test_export_errors_are_one_line_and_write_nothing(run, tmp_path, capsys):
    from fairseq_mmkd.export import main

    bad_dict = tmp_path / "dict.txt"
    bad_dict.write_text("a 1\nb 1\n")
    cases = [
        (["--text-dict", str(bad_dict)], "gives 7 embedding rows (4 specials + symbols + <mask>), but the student's "
                                         f"text encoder has {run.vocab}"),
        (["--text-dict", str(tmp_path / "missing")], "not found"),
        (["--modality", "image", "--text-dict", str(run.text_dict)], "--text-dict is for a text model"),
    ]
    for args, message in cases:
        out = tmp_path / "out.pt"
        assert main(["--checkpoint", str(run.ckpt), "--output", str(out), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
        assert not out.exists()


def cli_error(main, args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_retrieval_probe_and_extract_take_a_modality_of_multimodal_files(run, exported, retrieval_folders,
                                                                         tiny_cifar, tmp_path, capsys):
    """The training checkpoint and its export give the same metrics and features for each modality; without
    --modality, one error line lists the modalities."""
    from fairseq_mmkd import extract, probe
    from fairseq_mmkd.retrieval import __main__ as retrieval

    common = ["--no-progress", "--device", "cpu", "--knn-k", "3"]
    sets = {"image": ["--cifar10", str(tiny_cifar)], "text": ["--folder", str(retrieval_folders["text"])],
            "audio": ["--folder", str(retrieval_folders["audio"])]}
    for m in MODALITIES:
        results = []
        for source in (["--checkpoint", str(run.ckpt)], ["--checkpoint", str(exported.path), "--teacher"]):
            out = tmp_path / f"{m}.json"
            assert retrieval.main([*source, "--modality", m, *sets[m], *common, "--json", str(out)]) == 0
            results.append(json.loads(out.read_text()))
        student, export = results
        assert student["modality"] == export["modality"] == m and student["model"] == "student"
        metrics = [k for k in student if k.endswith(("_top1", "_top3", "_knn3"))]
        assert metrics and all(student[k] == export[k] for k in metrics), (student, export)
    capsys.readouterr()
    err = cli_error(retrieval.main, ["--checkpoint", str(run.ckpt), *sets["text"], *common], capsys)
    assert "is a multimodal student (image, text, audio); choose one with --modality" in err
    err = cli_error(retrieval.main, ["--checkpoint", str(exported.path), "--teacher", *sets["text"], *common], capsys)
    assert "is a multimodal data2vec 2.0 model (audio, image, text)" in err and "--modality" in err

    out = tmp_path / "probe.json"
    probe_args = ["--cifar10", str(tiny_cifar), "--no-progress", "--device", "cpu", "--l2-grid", "1e-3"]
    assert probe.main(["--checkpoint", str(run.ckpt), "--modality", "image", *probe_args, "--json", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["cifar10_linear_top1"] <= 100
    err = cli_error(probe.main, ["--checkpoint", str(run.ckpt), *probe_args], capsys)
    assert "is a multimodal student (image, text, audio); choose one with --modality" in err

    source, padding_mask = batch("audio", run.vocab)
    np.save(tmp_path / "audio.npy", source.numpy())
    np.save(tmp_path / "mask.npy", padding_mask.numpy())
    dumps = []
    for ckpt in (run.ckpt, exported.path):
        out = tmp_path / f"{Path(ckpt).stem}.npz"
        assert extract.main(["--checkpoint", str(ckpt), "--modality", "audio", "--input", str(tmp_path / "audio.npy"),
                             "--padding-mask", str(tmp_path / "mask.npy"), "--output", str(out)]) == 0
        dumps.append(np.load(out))
    assert set(dumps[0].files) == set(dumps[1].files) and "block_out_1" in dumps[0].files
    for name in set(dumps[0].files) - {"targets"}:  # a multimodal file has one target setting: the image teacher's
        np.testing.assert_array_equal(dumps[0][name], dumps[1][name], err_msg=name)
    capsys.readouterr()
    for ckpt, message in ((run.ckpt, "is a multimodal student (image, text, audio); choose one with --modality"),
                          (exported.path, "is a multimodal data2vec 2.0 model (audio, image, text)")):
        err = cli_error(extract.main, ["--checkpoint", str(ckpt), "--input", str(tmp_path / "audio.npy"), "--output",
                                       str(tmp_path / "x.npz")], capsys)
        assert message in err
    assert not (tmp_path / "x.npz").exists()


def test_per_layer_alibi_scales_follow_the_student_blocks_into_the_export(tmp_path):
    """An audio student whose blocks use the ALiBi scales of teacher layers 0 and 2 exports a file whose blocks 0 and 1
    get exactly those (fairseq's own code included)."""
    from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
    from fairseq_mmkd.distill.distiller import Distiller
    from fairseq_mmkd.encoders.audio import AudioEncoderConfig
    from fairseq_mmkd.export import student_as_d2v

    enc = AudioEncoderConfig(conv_spec="[(32, 10, 5)] + [(32, 3, 2)] * 2", conv_pos_width=10, conv_pos_depth=2,
                             conv_pos_groups=4, prenet_depth=1, alibi_heads=4, alibi_scale_per_layer=True,
                             model_depth=3)
    torch.manual_seed(0)
    teacher = D2vModel(D2vConfig(modality="audio", embed_dim=32, depth=3, num_heads=4, norm_eps=1e-5, encoder=enc,
                                 targets=TargetConfig(average_top_k_layers=2)))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        teacher.encoder.alibi_scale.copy_(torch.rand_like(teacher.encoder.alibi_scale) + 0.5)
    distiller = Distiller(teacher, student_depth=2, student_init="teacher_spread").eval()
    assert distiller.student_bias_layers == [0, 2]
    model = student_as_d2v(SimpleNamespace(distiller=distiller, modality="audio"))
    path = tmp_path / "audio.pt"
    save_d2v_checkpoint(model, path)
    source, padding_mask = batch("audio", 0)
    with torch.no_grad():
        expected = distiller.features(source, padding_mask)
        torch.testing.assert_close(load_d2v(path)(source, padding_mask)["x"], expected[0], rtol=0, atol=0)
    state, fairseq_model = fairseq_load_multimodal_checkpoint(path)
    assert_fairseq_matches(fairseq_model, state["cfg"]["model"], "audio", expected, source, padding_mask)
