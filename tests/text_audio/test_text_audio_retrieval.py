"""Zero-shot retrieval and k-NN for text and audio: GLUE-style text folders and labelled audio folders in their real
formats (fairseq-preprocess output, wav2vec manifests of FLAC files), padding-aware pooling, the shared
``evaluate_retrieval`` entry point (also across two gloo ranks), and ``python -m fairseq_mmkd.retrieval`` on text
and audio teacher files with the protocol JSON."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import soundfile
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fairseq_mmkd import D2vConfig, D2vModel, load_d2v
from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
from fairseq_mmkd.distill.distiller import Distiller, block_features
from fairseq_mmkd.encoders.audio import AudioEncoderConfig
from fairseq_mmkd.encoders.text import TextEncoderConfig
from fairseq_mmkd.retrieval import (AudioRetrievalSet, RetrievalDataError, TextRetrievalSet, embed_sequences,
                                    evaluate_retrieval, evaluation_protocol, folder_kind, knn_accuracy,
                                    load_retrieval_folder, metric_names, nearest_neighbours, teacher_facts,
                                    topk_accuracy)
from fairseq_mmkd.retrieval.__main__ import main

from conftest import write_audio_manifest, write_photos, write_tiny_cifar

TOPICS = {  # three classes whose sentences share a topic vocabulary (separable by their words)
    "animals": "cat dog horse cow sheep bird fish mouse lion tiger".split(),
    "weather": "rain snow wind sun cloud storm fog hail frost heat".split(),
    "numbers": "one two three four five six seven eight nine ten".split(),
}


def topic_sentences(n: int, seed: int) -> tuple:
    """``n`` sentences of 2 to 14 topic words (plus a shared filler), cycling through the topics."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    lines, labels = [], []
    for i in range(n):
        topic = names[i % len(names)]
        words = list(rng.choice(TOPICS[topic], size=int(rng.integers(2, 15))))
        words.insert(int(rng.integers(0, len(words))), "the")
        lines.append(" ".join(words))
        labels.append(topic)
    return lines, labels


def preprocess(jobs) -> None:
    """Run fairseq-preprocess (fairseq_cli.preprocess, the code behind the command) for each ``(destdir, lines by
    split, srcdict)`` job in order, in one process: one start-up of fairseq for every folder of this module."""
    argvs = []
    for dest, splits, srcdict in jobs:
        argv = ["--only-source", "--destdir", str(dest), "--workers", "1"]
        for split, lines in splits.items():
            raw = dest.parent / f"{dest.name}.{split}.raw"
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text("".join(f"{line}\n" for line in lines))
            argv += [f"--{split}pref", str(raw)]
        argvs.append(argv + (["--srcdict", str(srcdict)] if srcdict else []))
    code = ("import sys, json\nfrom fairseq import options\nfrom fairseq_cli.preprocess import main\n"
            "for argv in json.loads(sys.argv[1]):\n    main(options.get_preprocessing_parser().parse_args(argv))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
    """GLUE-style folders made by fairseq-preprocess as RoBERTa's GLUE recipe runs it: ``topics`` (``input0/``
    train builds dict.txt, valid reuses it; ``label/`` its own dictionary, one label per line), ``pairs`` (with
    ``input1/``), and label folders of the wrong kind for the error tests."""
    base = tmp_path_factory.mktemp("glue")
    train, train_labels = topic_sentences(24, 0)
    valid, valid_labels = topic_sentences(12, 1)
    topics, pairs = base / "topics", base / "pairs"
    words, labels = topics / "input0" / "dict.txt", topics / "label" / "dict.txt"
    preprocess([
        (topics / "input0", {"train": train, "valid": valid}, None),
        (topics / "label", {"train": train_labels, "valid": valid_labels}, None),
        (pairs / "input0", {"train": train[:6], "valid": valid[:3]}, words),
        (pairs / "input1", {"train": train[:6][::-1], "valid": valid[:3][::-1]}, words),
        (pairs / "label", {"train": train_labels[:6], "valid": valid_labels[:3]}, labels),
        (base / "floats" / "label", {"train": ["0.5", "1.75", "3.25"] * 8}, None),
        (base / "short" / "label", {"train": ["animals"] * 5}, labels),
    ])
    return {"topics": (topics, (train, train_labels), (valid, valid_labels)), "pairs": (pairs, train[:6]),
            "base": base}


@pytest.fixture(scope="module")
def glue(text_folders):
    return text_folders["topics"]


def dictionary_size(root) -> int:
    return 4 + sum(1 for _ in open(root / "input0" / "dict.txt")) + 1  # specials + symbols + <mask>


def text_model(vocab: int, positions: int = 32, seed: int = 0, extra: int = 0) -> D2vModel:
    torch.manual_seed(seed)
    enc = TextEncoderConfig(vocab_size=vocab, max_source_positions=positions, prenet_depth=1, num_extra_tokens=extra)
    model = D2vModel(D2vConfig(modality="text", embed_dim=32, depth=2, num_heads=4, norm_eps=1e-5, encoder=enc))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


TINY_AUDIO = dict(conv_spec="[(32, 10, 5)] + [(32, 3, 2)] * 2", conv_pos_width=10, conv_pos_depth=2, conv_pos_groups=4,
                  prenet_depth=1, alibi_heads=4, model_depth=2)  # receptive field: 40 samples


def audio_model(seed: int = 0, **overrides) -> D2vModel:
    torch.manual_seed(seed)
    enc = AudioEncoderConfig(**{**TINY_AUDIO, **overrides})
    model = D2vModel(D2vConfig(modality="audio", embed_dim=32, depth=2, num_heads=4, norm_eps=1e-5, encoder=enc))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def teacher_fn(model):
    """What the standalone evaluator embeds with a teacher file: the last block, with the sequence padding mask."""
    def feature_fn(source, padding_mask):
        enc = model.encoder(source, padding_mask)
        return block_features(model.blocks, enc, model.cfg.num_heads, -1, model.norm), enc.padding_mask
    return feature_fn


SOUNDS = {0: "whistle", 1: "hum", 2: "buzz"}


def write_audio_folder(root, train_lengths=(3000, 1800, 2600, 2200, 3400, 2000, 2900, 1500, 2400),
                       valid_lengths=(2500, 1700, 3100, 2100, 2800, 1900)):
    """Train/valid wav2vec manifests of 16 kHz FLAC tones (pitch by class) and string labels per clip."""
    train_labels = [i % 3 for i in range(len(train_lengths))]
    valid_labels = [i % 3 for i in range(len(valid_lengths))]
    write_audio_manifest(root, list(train_lengths), labels=train_labels, seed=0)
    write_audio_manifest(root, list(valid_lengths), labels=valid_labels, seed=1, split="valid")
    for split, labels in (("train", train_labels), ("valid", valid_labels)):  # class names, not numbers
        (root / f"{split}.label").write_text("".join(f"{SOUNDS[x]}\n" for x in labels))
    return root


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    return write_audio_folder(tmp_path_factory.mktemp("audio") / "sounds")


def manifest_paths(root, split):
    lines = (root / f"{split}.tsv").read_text().splitlines()
    return [os.path.join(lines[0], line.split("\t")[0]) for line in lines[1:]]


# ---------------------------------------------------------------------------------------------------- loaders

def test_folder_kind_tells_the_three_layouts_apart(glue, sounds, tmp_path):
    root = glue[0]
    assert folder_kind(root) == "text" and folder_kind(sounds) == "audio"
    write_photos(tmp_path / "photos" / "train", classes=2, per_class=1)
    write_photos(tmp_path / "photos" / "test", classes=2, per_class=1)
    assert folder_kind(tmp_path / "photos") == "image"
    with pytest.raises(RetrievalDataError, match="fairseq-preprocess output for training"):
        folder_kind(root / "input0")
    with pytest.raises(RetrievalDataError, match="not a retrieval folder; expected a labelled image folder"):
        folder_kind(tmp_path)
    with pytest.raises(RetrievalDataError, match="is a GLUE-style text folder .* but the teacher is a data2vec 2.0 "
                                                 "audio model"):
        load_retrieval_folder(root, "audio")


def test_text_folder_items_are_sentence_prediction_inputs(glue):
    """Each item is <s> + the sentence's ids + </s> (fairseq's sentence_prediction with init_token 0), labels are
    label/dict.txt indices in both splits, and fit_teacher cuts to the teacher's positions."""
    from fairseq.data import Dictionary

    root, (train, train_labels), (valid, valid_labels) = glue
    data = load_retrieval_folder(root)
    assert isinstance(data, TextRetrievalSet) and (data.num_train, data.num_test) == (24, 12)
    words = Dictionary.load(str(root / "input0" / "dict.txt"))
    names = Dictionary.load(str(root / "label" / "dict.txt")).symbols[4:]
    for split, lines, labels in (("train", train, train_labels), ("test", valid, valid_labels)):
        source, mask = data.batch(split, range(len(lines)))
        for i, line in enumerate(lines):
            expected = [0] + [words.index(w) for w in line.split()] + [2]
            assert source[i][~mask[i]].tolist() == expected and (source[i][mask[i]] == 1).all()
        assert [names[c] for c in data.split(split).labels.tolist()] == labels
    data.fit_teacher(vocab_size=dictionary_size(root), max_length=6, pad_idx=1)
    source, mask = data.batch("train", [0])
    assert source.shape == (1, 6) and source[0, 0] == 0
    assert data.protocol()["truncated_items"]["train"] == sum(len(s.split()) + 2 > 6 for s in train)
    limited = load_retrieval_folder(root, limit=5)
    assert limited.num_train == 5 and limited.train_labels.tolist() == data.train_labels[[0, 6, 12, 17, 23]].tolist()


def test_text_sentence_pairs_are_joined_as_roberta_does(text_folders):
    root, train = text_folders["pairs"]
    data = load_retrieval_folder(root)
    from fairseq.data import Dictionary
    words = Dictionary.load(str(root / "input0" / "dict.txt"))
    source, mask = data.batch("train", [1])
    first, second = train[1], train[::-1][1]
    assert source[0][~mask[0]].tolist() == ([0] + [words.index(w) for w in first.split()] + [2, 2]
                                            + [words.index(w) for w in second.split()] + [2])


def test_text_folder_errors_are_one_line_and_say_what_to_do(glue, text_folders, tmp_path):
    root, base = glue[0], text_folders["base"]
    with pytest.raises(RetrievalDataError) as info:
        load_retrieval_folder(root, "text", vocab_size=50265)
    message = str(info.value)
    assert f"{dictionary_size(root)} embedding rows" in message and "50265 rows" in message
    assert "--srcdict" in message and "\n" not in message

    import shutil
    regression = tmp_path / "stsb"
    shutil.copytree(root / "input0", regression / "input0")
    (regression / "label").mkdir()
    (regression / "label" / "train.label").write_text("3.8\n1.25\n")
    with pytest.raises(RetrievalDataError, match="regression targets"):
        load_retrieval_folder(regression)
    floats = base / "floats"
    shutil.copytree(root / "input0", floats / "input0")
    with pytest.raises(RetrievalDataError, match="regression targets, not classes"):
        load_retrieval_folder(floats)
    short = base / "short"
    shutil.copytree(root / "input0", short / "input0")
    with pytest.raises(RetrievalDataError, match="has 5 labels but input0/train has 24 sentences"):
        load_retrieval_folder(short)
    nolabel = tmp_path / "nolabel"
    shutil.copytree(root / "input0", nolabel / "input0")
    with pytest.raises(RetrievalDataError, match="has no label/ folder"):
        load_retrieval_folder(nolabel)


def test_audio_folder_keeps_exact_samples_and_normalises_whole_clips(sounds):
    """int16 storage is exact (the float32 fairseq reads), string labels map to the same classes in both splits,
    and normalisation, switchable after loading, uses the statistics of the whole clip even when it is cut."""
    from fairseq_mmkd.data.audio import read_audio

    data = load_retrieval_folder(sounds)
    assert isinstance(data, AudioRetrievalSet) and data.train.data.dtype == torch.int16
    assert data.classes == sorted(SOUNDS.values())
    assert [data.classes[c] for c in data.test_labels.tolist()] == [SOUNDS[i % 3] for i in range(6)]
    paths = manifest_paths(sounds, "train")
    source, mask = data.batch("train", [1, 0])
    for row, i in enumerate([1, 0]):
        wav = read_audio(paths[i])
        assert torch.equal(source[row][~mask[row]], wav) and (source[row][mask[row]] == 0).all()

    data.normalize = True
    data.fit_teacher(max_length=2000)
    source, mask = data.batch("train", [0])  # clip 0 has 3000 samples: cut to 2000, normalised as a whole first
    expected = F.layer_norm(read_audio(paths[0]), (3000,))[:2000]
    torch.testing.assert_close(source[0], expected, atol=2e-6, rtol=0)
    assert source.shape == (1, 2000) and data.protocol()["normalize"] is True


def test_audio_short_clips_are_left_out_and_counted(sounds):
    facts = teacher_facts(audio_model().cfg, {"normalize": False})
    assert facts == {"modality": "audio", "min_length": 40, "max_length": None, "normalize": False}
    data = load_retrieval_folder(sounds, **{**facts, "min_length": 1800})
    assert (data.num_train, data.num_test) == (8, 5)  # the 1500- and 1700-sample clips
    assert data.protocol()["left_out_items"] == {"train": 1, "test": 1}
    with pytest.raises(RetrievalDataError, match="all 9 train items are shorter than 9999 samples"):
        load_retrieval_folder(sounds, min_length=9999)


def test_audio_folder_errors_name_the_file(sounds, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(sounds, bad)
    lines = (bad / "train.tsv").read_text().splitlines()
    (bad / "train.tsv").write_text("\n".join([str(bad)] + lines[1:]) + "\n")
    (bad / "valid.tsv").write_text("\n".join([str(bad)] + (bad / "valid.tsv").read_text().splitlines()[1:]) + "\n")
    soundfile.write(bad / "clip_2.flac", np.zeros(2600, np.float32), 8000)
    with pytest.raises(RetrievalDataError, match=r"clip_2\.flac: sample rate 8000 Hz.*resample"):
        load_retrieval_folder(bad)
    soundfile.write(bad / "clip_2.flac", np.zeros(2600, np.float32), 16000)
    (bad / "valid.label").write_text("hum\nbuzz\n")
    with pytest.raises(RetrievalDataError, match="valid.label has 2 labels but .*valid.tsv lists 6 clips"):
        load_retrieval_folder(bad)
    (bad / "valid.label").unlink()
    with pytest.raises(RetrievalDataError, match="valid.label not found"):
        load_retrieval_folder(bad)


# ------------------------------------------------------------------------------------- batching and pooling

def test_text_embedding_of_a_padded_sequence_equals_its_embedding_alone(glue):
    """Batches sorted by length, padded and masked: every sentence's mean (and <s>) embedding is the one it gets
    in a batch of its own, and the rows come back in the set's order."""
    root = glue[0]
    model = text_model(dictionary_size(root))
    data = load_retrieval_folder(root, **teacher_facts(model.cfg))
    fn = teacher_fn(model)
    for pooling in ("mean", "cls"):
        batched = embed_sequences(fn, data, "train", 0, pooling, batch_size=7, progress=False)
        alone = embed_sequences(fn, data, "train", 0, pooling, batch_size=1, progress=False)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        by_hand = []
        for i in range(data.num_train):
            source, _ = data.batch("train", [i])
            x = model(source)["x"][0]
            by_hand.append(x.mean(0) if pooling == "mean" else x[0])
        torch.testing.assert_close(batched, torch.stack(by_hand), atol=1e-5, rtol=1e-5)
    # without the mask the pads would count: the test above can fail
    unmasked = embed_sequences(lambda s, m: (teacher_fn(model)(s, m)[0], None), data, "train", 0, "mean",
                               batch_size=7, progress=False)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_audio_padding_only_leaks_through_fairseqs_positional_convolution():
    """Audio cannot be padding-exact in fairseq's semantics: the frame mask is exact for the conv feature
    extractor (a valid frame's receptive field holds valid samples only), but data2vec 2.0's relative positional
    encoder convolves across frames without a mask, so the last valid frames see the padding's frames, and
    attention then spreads that to every frame. Sorting batches by length keeps the padding small; the embedding
    of a padded clip stays within a small distance of its embedding alone."""
    model = audio_model()
    clip = torch.randn(1, 2400)
    padded = torch.cat([clip, torch.zeros(1, 1600)], 1)
    mask = torch.arange(4000)[None] >= 2400
    enc = model.encoder
    local_alone = enc.project_features(enc.local_encoder(clip))
    local_padded = enc.project_features(enc.local_encoder(padded))
    frames = local_alone.shape[1]
    assert int((~enc.frame_padding_mask(mask, local_padded.shape[1])).sum()) == frames
    torch.testing.assert_close(local_padded[:, :frames], local_alone)  # the conv stack: exact
    fn = teacher_fn(model)
    alone, _ = fn(clip, None)
    x, seq_mask = fn(padded, mask)
    assert not torch.allclose(x[:, :frames], alone, atol=1e-4)  # the positional conv: not exact
    mean_alone = alone.mean(1)
    keep = (~seq_mask).float().unsqueeze(-1)
    mean_padded = (x * keep).sum(1) / keep.sum(1)
    assert F.cosine_similarity(mean_padded, mean_alone).item() > 0.99
    assert F.cosine_similarity(x.mean(1), mean_alone).item() < F.cosine_similarity(mean_padded, mean_alone).item()


def test_cls_pooling_reads_text_bos_but_needs_an_extra_token_for_audio(glue, sounds):
    model = audio_model()
    data = load_retrieval_folder(sounds)
    with pytest.raises(ValueError, match="needs an extra \\(CLS\\) token"):
        evaluate_retrieval(teacher_fn(model), {"sounds": data}, num_extra_tokens=0, pooling="cls", progress=False)
    with_cls = audio_model(num_extra_tokens=1)
    metrics = evaluate_retrieval(teacher_fn(with_cls), {"sounds": data}, num_extra_tokens=1, pooling="cls+mean",
                                 progress=False, knn_k=3)
    assert set(metrics) == set(metric_names("sounds", knn_k=3))
    text = load_retrieval_folder(glue[0])
    protocol = evaluation_protocol({"topics": text}, pooling="cls")
    assert protocol["pooling_reads"].startswith("the first token (<s>")


def test_evaluate_retrieval_on_text_and_audio_is_exact_search_on_per_item_embeddings(glue, sounds):
    """The metrics are those of an exact search over embeddings computed one item at a time, for text and audio."""
    """(Audio is embedded one clip per batch here: padded audio is close to, not equal to, a clip alone; see above.)"""
    root = glue[0]
    cases = [("topics", text_model(dictionary_size(root)), load_retrieval_folder(root), 4),
             ("sounds", audio_model(), load_retrieval_folder(sounds, normalize=True), 1)]
    for name, model, data, batch_size in cases:
        fn = teacher_fn(model)
        seen = {}
        metrics = evaluate_retrieval(fn, {name: data}, pooling="mean", batch_size=batch_size, device="cpu",
                                     progress=False, knn_k=5, backend="torch",
                                     on_embedded=lambda n, d, tr, te: seen.update(train=tr, test=te))
        assert list(metrics) == metric_names(name, knn_k=5)
        alone = {s: torch.stack([fn(*data.batch(s, [i]))[0].mean((0, 1)) for i in range(len(data.split(s)))])
                 for s in ("train", "test")}
        for s in ("train", "test"):
            torch.testing.assert_close(seen[s], alone[s], atol=1e-5, rtol=1e-4)
        top = topk_accuracy(alone["train"], data.train_labels, alone["test"], data.test_labels, (1, 3), "torch")
        inverse = topk_accuracy(alone["test"], data.test_labels, alone["train"], data.train_labels, (1, 3), "torch")
        assert (metrics[f"{name}_top1"], metrics[f"{name}_top3"]) == (top[1], top[3])
        assert (metrics[f"{name}_inv_top1"], metrics[f"{name}_inv_top3"]) == (inverse[1], inverse[3])
        knn = knn_accuracy(nearest_neighbours(alone["train"], alone["test"], 5, "torch"), data.train_labels,
                           data.test_labels, 5, 0.07)
        assert (metrics[f"{name}_knn5"], metrics[f"{name}_knn5_uniform"]) == (knn["weighted"], knn["uniform"])


def test_distiller_features_return_the_sequence_padding_mask(glue):
    root = glue[0]
    teacher = text_model(dictionary_size(root))
    distiller = Distiller(teacher, student_depth=1).eval()
    source, mask = load_retrieval_folder(root).batch("train", [0, 1, 2])
    x, seq_mask = distiller.features(source, mask, layer=-1)
    assert torch.equal(seq_mask, mask)
    torch.testing.assert_close(x, distiller.forward_features(source, mask))
    t, _ = distiller.features(source, mask, layer=-2, teacher=True)
    torch.testing.assert_close(t, distiller.teacher_features(source, mask, layer=-2))


# ------------------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def text_teacher(glue, tmp_path_factory):
    path = tmp_path_factory.mktemp("tt") / "text_teacher.pt"
    model = text_model(dictionary_size(glue[0]))
    save_d2v_checkpoint(model, path, task_cfg=model.encoder.fairseq_task_cfg(model.cfg.encoder))
    return path


@pytest.fixture(scope="module")
def audio_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("at") / "audio_teacher.pt"
    model = audio_model()
    task = {**model.encoder.fairseq_task_cfg(model.cfg.encoder), "max_sample_size": 2800}
    save_d2v_checkpoint(model, path, task_cfg=task)
    return path


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_cli_evaluates_a_teacher_file_and_records_the_protocol(modality, glue, sounds, text_teacher, audio_teacher,
                                                               tmp_path, capsys):
    folder, checkpoint = (glue[0], text_teacher) if modality == "text" else (sounds, audio_teacher)
    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(checkpoint), "--teacher", "--folder", str(folder), "--knn-k", "3",
                 "--json", str(out), "--no-progress", "--device", "cpu", "--backend", "torch"]) == 0
    result = json.loads(out.read_text())
    name = folder.name
    assert set(metric_names(name, knn_k=3)) <= set(result) and result["modality"] == modality
    assert "input_size" not in result and f"{name}_train_items" in result
    p = result["protocol"]
    assert (p["modality"], p["pooling"], p["model"]) == (modality, "mean", "teacher")
    assert "input_size" not in p and p["pooling_reads"] == "the mean over all positions, padded positions left out"
    s = p["sets"][name]
    assert not any(k.startswith("resize") or k.startswith("normalization_") for k in s)
    assert (s["memory_split"], s["query_split"], s["memory_file_split"], s["query_file_split"]) == \
        ("train", "test", "train", "valid")
    if modality == "text":
        assert (s["max_length"], s["pad_idx"], s["dictionary_size"]) == (32, 1, dictionary_size(folder))
    else:  # normalize and the 2800-sample crop come from the teacher's task settings
        assert (s["normalize"], s["max_length"], s["storage_dtype"]) == (True, 2800, "int16")
        assert s["truncated_items"] == {"train": 3, "test": 1} and s["left_out_items"] == {"train": 0, "test": 0}

    # the record is enough to recompute the numbers
    model = load_d2v(checkpoint, weights=p["weights"])
    data = load_retrieval_folder(folder, **teacher_facts(model.cfg, model.fairseq_task_cfg))
    again = evaluate_retrieval(teacher_fn(model), {name: data}, num_extra_tokens=p["num_extra_tokens"],
                               pooling=p["pooling"], knn_k=p["knn_k"], knn_temperature=p["knn_temperature"],
                               device="cpu", backend="torch", progress=False)
    assert again == {k: result[k] for k in again}
    assert f"{name}" in capsys.readouterr().out


def test_cli_refuses_sets_of_another_modality_in_one_line(glue, sounds, text_teacher, audio_teacher, tmp_path, capsys):
    write_tiny_cifar(tmp_path, "cifar10", 3, n_train=6, n_test=3)
    cases = [(["--checkpoint", str(text_teacher), "--cifar10", str(tmp_path)],
              "--cifar10 is an image set, but"),
             (["--checkpoint", str(audio_teacher), "--folder", str(glue[0])],
              "is a GLUE-style text folder"),
             (["--checkpoint", str(text_teacher), "--folder", str(sounds), "--pooling", "cls"], "is a labelled audio"),
             (["--checkpoint", str(audio_teacher), "--folder", str(sounds), "--pooling", "cls"],
              "no extra (CLS) token; use --pooling mean"),
             (["--checkpoint", str(text_teacher), "--folder", str(glue[0]), "--max-length", "99"],
              "the model has 32 positions")]
    for args, message in cases:
        assert main(args + ["--teacher", "--no-progress", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_cli_student_checkpoint_embeds_through_distiller_features(sounds, tmp_path, monkeypatch):
    """A d2v_kd student (what kd_model.load_student returns) of an audio teacher; normalisation comes from the
    teacher task settings the model carries, or --normalize."""

    teacher = audio_model()
    distiller = Distiller(teacher, student_depth=1).eval()
    calls = []

    class Student(torch.nn.Module):
        num_extra_tokens, input_size = 0, None

        def __init__(self, task_cfg):
            super().__init__()
            self.distiller, self.teacher_task_cfg = distiller, task_cfg

        def forward_features(self, source, padding_mask=None, layer=-1):
            raise AssertionError("text and audio go through distiller.features")

    def load_student(path, device="cpu", trust_checkpoint=False):
        calls.append(path)
        return Student({"normalize": True} if path == "with_task.pt" else None)

    monkeypatch.setitem(sys.modules, "fairseq_mmkd.models._student", types.SimpleNamespace(load_student=load_student))
    out = tmp_path / "s.json"
    assert main(["--checkpoint", "with_task.pt", "--folder", str(sounds), "--json", str(out), "--no-progress",
                 "--knn-k", "3", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "student" and result["protocol"]["sets"]["sounds"]["normalize"] is True
    assert main(["--checkpoint", "bare.pt", "--folder", str(sounds), "--no-progress", "--device", "cpu"]) == 2
    assert main(["--checkpoint", "bare.pt", "--folder", str(sounds), "--no-progress", "--device", "cpu",
                 "--normalize", "false", "--knn-k", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["protocol"]["sets"]["sounds"]["normalize"] is False


# ------------------------------------------------------------------------------------------ torch.distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, root, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from pathlib import Path
        root = Path(root)
        data = load_retrieval_folder(root, limit=11)
        model = text_model(dictionary_size(root))
        metrics = evaluate_retrieval(teacher_fn(model), {"topics": data}, pooling="mean", batch_size=5, device="cpu",
                                     progress=False, knn_k=3)
        emb = embed_sequences(teacher_fn(model), data, "test", 0, "mean", batch_size=5, progress=False)
        torch.save({"metrics": metrics, "embeddings": emb}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_get_the_single_process_text_result(glue, tmp_path):
    """Ranks embed interleaved shards of the length order (11 items per split: 6 + 5, the short shard padded) and
    all get the single-process embeddings, in the set's order, and metrics."""
    root = glue[0]
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    data = load_retrieval_folder(root, limit=11)
    model = text_model(dictionary_size(root))
    single = evaluate_retrieval(teacher_fn(model), {"topics": data}, pooling="mean", batch_size=5, device="cpu",
                                progress=False, knn_k=3)
    emb = embed_sequences(teacher_fn(model), data, "test", 0, "mean", batch_size=5, progress=False)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["metrics"] == single
        torch.testing.assert_close(result["embeddings"], emb, rtol=1e-5, atol=1e-5)


def test_probe_runs_on_a_text_folder(glue, text_teacher, tmp_path):
    from fairseq_mmkd.probe import main as probe_main

    out = tmp_path / "probe.json"
    assert probe_main(["--checkpoint", str(text_teacher), "--teacher", "--folder", str(glue[0]), "--no-progress",
                       "--device", "cpu", "--l2-grid", "0.01", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["topics_linear_top1"] <= 100 and result["topics_train_items"] == 24
    assert result["protocol"]["modality"] == "text" and result["protocol"]["pooling"] == "mean"
