"""Distilling text and audio teachers as users run it: the real ``fairseq-hydra-train`` with ``kd_text`` and
``kd_audio`` on fairseq-preprocess output and wav2vec manifests, tiny teachers written in fairseq's format."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import (SIZES, args_for, assert_same_updates, dictionary_size, gradient_free_names, hydra_train,
                      json_log_lines, learning_rates, make_sequence_teacher, write_text_corpus)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NO_RETRIEVAL = ["task.retrieval=false"]


def train(save, setup, modality, *extra, **kwargs):
    return hydra_train(save, *args_for(setup, modality, *extra), config=f"kd_{modality}", **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sequence_setup, retrieval_folders):
    """One 40-update run per modality from a random student, validated by retrieval on a labelled folder."""
    out = {}
    for modality in ("text", "audio"):
        save = tmp_path_factory.mktemp(f"{modality}_run") / "ckpt"
        proc = train(save, sequence_setup, modality, f"task.retrieval_folder={retrieval_folders[modality]}",
                     "task.knn_k=3", "model.student_init=random", "optimization.max_update=40")
        out[modality] = save, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_retrieval_and_knn_metrics_reach_the_valid_log(runs, modality):
    """Memory = train, queries = valid, and the inverse; k-NN; the teacher's once, with a teacher_ prefix;
    the protocol of the run recorded (mean pooling over valid positions, no image resize)."""
    import json

    save, log = runs[modality]
    valid = json_log_lines(log, "valid")
    assert len(valid) == 2, log[-3000:]
    name = "topics" if modality == "text" else "tones"
    for metric in ("top1", "top3", "inv_top1", "inv_top3", "knn3", "knn3_uniform"):
        for who in ("", "teacher_"):
            assert 0 <= float(valid[-1][f"valid_{who}{name}_{metric}"]) <= 100, metric
    assert float(valid[-1][f"valid_{name}_top3"]) >= float(valid[-1][f"valid_{name}_top1"])
    record = json.loads((save / "eval_protocol.json").read_text())
    protocol = record["student"]
    assert protocol["pooling"] == "mean" and "input_size" not in protocol
    assert protocol["sets"][name]["modality"] == modality
    assert not (save / "retrieval_examples.png").exists()  # pictures are drawn for images only


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_loss_falls(runs, modality):
    _, log = runs[modality]
    rows = json_log_lines(log, "train_inner")
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) >= 5 and int(rows[-1]["num_updates"]) == 40
    assert losses[-1] < 0.6 * losses[0], losses
    assert float(rows[-1]["pred_var"]) > 0.1 and float(rows[-1]["target_var"]) > 0.1
    if modality == "text":  # wps counts real tokens: 8 blocks of 16 tokens (the last block of an epoch is short)
        assert max(float(r["wpb"]) for r in rows) == 128.0
    else:  # ... and audio samples: each batch is cropped to its shortest clip, at most 2,000 samples
        assert all(float(r["wpb"]) <= 16000 for r in rows)


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_checkpoints_hold_no_teacher_blocks_and_load_without_the_teacher(runs, sequence_setup, modality, tmp_path):
    from fairseq_mmkd.models._student import load_student

    save, _ = runs[modality]
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    keys = list(state["model"])
    assert not any(".teacher_blocks." in k for k in keys)
    local = "local_encoder.embed_tokens." if modality == "text" else "local_encoder.conv_layers."
    assert any(k.startswith("distiller.shared_encoder." + local) for k in keys)
    moved = tmp_path / "student.pt"
    shutil.copy(save / "checkpoint_last.pt", moved)
    student = load_student(moved)  # the teacher file is not needed (and not read)
    assert student.modality == modality and student.distiller.teacher_blocks is None
    if modality == "text":
        source = torch.tensor([[0, 5, 6, 7, 2, 1, 1], [0, 8, 9, 10, 11, 12, 2]])
    else:
        source = torch.randn(2, 1600)
    with torch.no_grad():
        assert student.forward_features(source).shape[0] == 2
    if modality == "audio":  # normalisation travels with the student (audio retrieval needs it)
        assert student.teacher_task_cfg == {"normalize": True}


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_text_and_audio_students_export_to_files_fairseq_loads(runs, sequence_setup, modality, tmp_path):
    """``python -m fairseq_mmkd.export`` of a text or audio student: load_d2v computes the student's features
    exactly, fairseq's own data2vec2 code to 1e-5 (text: with the dictionary --text-dict names)."""
    from pathlib import Path

    from fairseq_mmkd.testing.fairseq_reference import fairseq_load_checkpoint

    from fairseq_mmkd import load_d2v
    from fairseq_mmkd.export import main
    from fairseq_mmkd.models._student import load_student

    save, _ = runs[modality]
    out = tmp_path / "student_d2v2.pt"
    text = ["--text-dict", str(Path(sequence_setup["text"][0]) / "dict.txt")] if modality == "text" else []
    assert main(["--checkpoint", str(save / "checkpoint_last.pt"), "--output", str(out), *text]) == 0
    if modality == "text":
        source = torch.tensor([[0, 5, 6, 7, 2, 1, 1], [0, 8, 9, 10, 11, 12, 2]])
        padding_mask = source.eq(1)
    else:
        source, padding_mask = torch.randn(2, 1600), torch.zeros(2, 1600, dtype=torch.bool)
        padding_mask[1, 1200:] = True
    with torch.no_grad():
        expected, seq_mask = load_student(save / "checkpoint_last.pt").distiller.features(source, padding_mask)
        torch.testing.assert_close(load_d2v(out)(source, padding_mask)["x"], expected, rtol=0, atol=0)
        state, model = fairseq_load_checkpoint(out)
        got = model(source, mode=modality.upper(), padding_mask=padding_mask, mask=False, features_only=True,
                    remove_extra_tokens=False)["x"]
    assert ((got - expected).abs() * (~seq_mask).unsqueeze(-1)).max() <= 1e-5
    if modality == "audio":  # the teacher's normalisation travels into the exported file
        assert state["cfg"].task.normalize is True


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_resume_is_exact(tmp_path, sequence_setup, modality):
    """Interrupted at update 6 and resumed, the run ends with the weights, Adam moments and schedule of an
    uninterrupted one: the same batches (fairseq's seeded shuffle) and the same audio crops (seeded per clip
    and epoch)."""
    common = ["lr_scheduler.max_update=14", "model.student_init=random", "common.log_interval=1", *NO_RETRIEVAL]
    straight = train(tmp_path / "straight", sequence_setup, modality, *common, "optimization.max_update=14")
    train(tmp_path / "resumed", sequence_setup, modality, *common, "optimization.max_update=6")
    resumed = train(tmp_path / "resumed", sequence_setup, modality, *common, "optimization.max_update=14")
    out = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in out and "@ 6 updates" in out, out[-3000:]
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert b["optimizer_history"][-1]["num_updates"] == 14
    assert b["optimizer_history"][-1]["lr_scheduler_state"] == a["optimizer_history"][-1]["lr_scheduler_state"]
    log = straight.stdout + straight.stderr
    assert_same_updates(a, b, learning_rates(log), gradient_free_names(log))
    moments = lambda s: [v["exp_avg_sq"] for v in s["last_optimizer_state"]["state"].values()]  # noqa: E731
    for x, y in zip(moments(a), moments(b)):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-5)


def fails_before_training(save, config, *overrides) -> str:
    proc = hydra_train(save, *overrides, config=config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "begin training" not in out and "Saving checkpoint" not in out, out[-3000:]
    return out


def test_data_of_another_modality_than_the_teacher_is_refused(tmp_path, sequence_setup, photo_folder, tiny_teacher):
    text_data, text_teacher = sequence_setup["text"]
    audio_data, audio_teacher = sequence_setup["audio"]
    out = fails_before_training(tmp_path / "a", "kd_audio", f"task.data={text_data}",
                                f"model.teacher_checkpoint={audio_teacher}", *NO_RETRIEVAL)
    assert f"task.data={text_data} holds text (fairseq-preprocess output" in out and "is a data2vec 2.0 audio model" in out
    out = fails_before_training(tmp_path / "b", "kd_text", f"task.data={photo_folder}",
                                f"model.teacher_checkpoint={text_teacher}", *NO_RETRIEVAL)
    assert "holds images" in out and "is a data2vec 2.0 text model" in out
    out = fails_before_training(tmp_path / "c", "kd_image", f"task.data={audio_data}",
                                f"model.teacher_checkpoint={tiny_teacher}", *NO_RETRIEVAL,
                                "checkpoint.best_checkpoint_metric=loss", "checkpoint.maximize_best_checkpoint_metric=false")
    assert "holds audio (a wav2vec manifest" in out and "is a data2vec 2.0 image model" in out


def test_text_of_another_dictionary_is_one_line(tmp_path, sequence_setup, text_corpus):
    other = make_sequence_teacher(tmp_path / "other.pt", "text", vocab_size=dictionary_size(text_corpus) + 7)
    out = fails_before_training(tmp_path / "ckpt", "kd_text", f"task.data={text_corpus}",
                                f"model.teacher_checkpoint={other}", *NO_RETRIEVAL, *SIZES["text"])
    assert f"(+ <mask> = {dictionary_size(text_corpus)} embedding rows), but the teacher's token embedding has " \
           f"{dictionary_size(text_corpus) + 7} rows" in out, out[-3000:]


@pytest.mark.parametrize("case", ["empty_text", "missing_shard", "manifest_root_missing", "clips_too_short"])
def test_bad_text_and_audio_data_fail_before_training(case, tmp_path, sequence_setup, audio_manifest):
    modality = "text" if case in ("empty_text", "missing_shard") else "audio"
    data, teacher = sequence_setup[modality]
    extra = list(SIZES[modality])
    if case == "empty_text":
        data, expect = write_text_corpus(tmp_path / "empty", []), "holds no tokens"
    elif case == "missing_shard":
        data, expect = f"{data}:{tmp_path / 'nope'}", "shard"
    elif case == "manifest_root_missing":
        folder = tmp_path / "manifest"
        folder.mkdir()
        (folder / "train.tsv").write_text("/nonexistent/librispeech\na.flac\t32000\n")
        data, expect = folder, "the audio root folder '/nonexistent/librispeech' on the first line"
    else:
        extra = [e for e in extra if not e.startswith("task.min_sample_size")] + ["task.min_sample_size=100000"]
        expect = "are shorter than min_sample_size=100000 samples; lower task.min_sample_size"
    out = fails_before_training(tmp_path / "ckpt", f"kd_{modality}", f"task.data={data}",
                                f"model.teacher_checkpoint={teacher}", *NO_RETRIEVAL, *extra)
    assert expect in out, out[-3000:]


def test_unreadable_audio_files_are_skipped_counted_and_named(tmp_path, sequence_setup, audio_manifest):
    folder = tmp_path / "clips"
    shutil.copytree(audio_manifest, folder)
    tsv = folder / "train.tsv"
    tsv.write_text(tsv.read_text().replace(str(audio_manifest), str(folder), 1))
    (folder / "clip_3.flac").write_bytes(b"not audio")
    _, teacher = sequence_setup["audio"]
    proc = hydra_train(tmp_path / "ckpt", f"task.data={folder}", f"model.teacher_checkpoint={teacher}",
                       *SIZES["audio"], *NO_RETRIEVAL, "optimization.max_update=10", "task.max_bad_audio_fraction=0.2",
                       config="kd_audio")
    out = proc.stdout + proc.stderr
    assert "clip_3.flac" in out
    rows = json_log_lines(out, "train_inner") + json_log_lines(out, "train")
    assert any(float(r.get("bad_audio_files", 0)) >= 1 for r in rows), out[-2000:]
