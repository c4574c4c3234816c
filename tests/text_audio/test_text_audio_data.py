"""Text and audio training data in the formats fairseq users already have: ``fairseq-preprocess`` output
and wav2vec manifests of 16 kHz files, read as data2vec 2.0's pretraining reads them, bad input included."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import soundfile
import torch

from fairseq_mmkd.data import audio as audio_data
from fairseq_mmkd.data import text as text_data

from conftest import write_text_corpus, write_audio_manifest


# ----------------------------------------------------------------------------------------------------------
# text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    lines = [f"the cat number {i} sat on mat {i % 3}" for i in range(40)]
    return write_text_corpus(root / "bin", lines), lines


def test_blocks_are_the_token_stream_with_bos(corpus):
    """Blocks of ``tokens_per_sample - 1`` tokens cross line boundaries (every line ends in ``</s>``), each
    starting with ``<s>``, and together are exactly the corpus."""
    folder, lines = corpus
    dictionary = text_data.load_dictionary(folder)
    blocks = text_data.token_blocks(folder, "train", dictionary, tokens_per_sample=16)
    stream = []
    for line in lines:
        stream += [dictionary.index(w) for w in line.split()] + [dictionary.eos()]
    got = []
    for i in range(len(blocks)):
        block = blocks[i]
        assert block[0] == dictionary.bos() and len(block) <= 16
        assert len(block) == 16 or i == len(blocks) - 1
        got += block[1:].tolist()
    assert got == stream


def test_dictionary_must_fit_the_teacher(corpus):
    folder, _ = corpus
    dictionary = text_data.load_dictionary(folder)
    text_data.check_vocabulary(dictionary, len(dictionary), folder)  # fits
    with pytest.raises(text_data.TextDataError) as info:
        text_data.check_vocabulary(dictionary, 50265, folder)
    message = str(info.value)
    assert f"{len(dictionary)} embedding rows" in message and "50265 rows" in message and "--srcdict" in message


def test_empty_text_and_missing_files_are_one_line(tmp_path):
    empty = write_text_corpus(tmp_path / "empty", [])
    with pytest.raises(text_data.TextDataError, match="holds no tokens"):
        text_data.token_blocks(empty, "train", text_data.load_dictionary(empty), 16)
    (tmp_path / "nodict").mkdir()
    with pytest.raises(text_data.TextDataError, match="has no dict.txt"):
        text_data.load_dictionary(str(tmp_path / "nodict"))
    with pytest.raises(text_data.TextDataError, match="has no valid.bin"):
        text_data.token_blocks(empty, "valid", text_data.load_dictionary(empty), 16)


def test_collate_pads_and_masks():
    batch = text_data.collate_tokens([{"id": 0, "source": torch.tensor([0, 5, 6, 2])},
                                      {"id": 1, "source": torch.tensor([0, 7])}], pad_idx=1)
    assert batch["net_input"]["source"].tolist() == [[0, 5, 6, 2], [0, 7, 1, 1]]
    assert batch["net_input"]["padding_mask"].tolist() == [[False] * 4, [False, False, True, True]]
    assert batch["ntokens"] == 6 and batch["nsamples"] == 2


# ----------------------------------------------------------------------------------------------------------
# audio


@pytest.fixture
def manifest(tmp_path):
    lengths = [3000, 2500, 800, 4000]  # the 800-sample clip is below min_sample_size=1000
    return write_audio_manifest(tmp_path / "audio", lengths), lengths


def test_manifest_clips_normalised_cropped_to_the_shortest(manifest):
    folder, lengths = manifest
    clips = audio_data.load_audio_clips(folder, normalize=True, min_sample_size=1000, max_sample_size=2800, seed=3)
    assert len(clips) == 3 and clips.num_skipped_short == 1
    item = clips[0]
    raw, _ = soundfile.read(clips.path(0), dtype="float32")
    assert len(item["source"]) == len(raw)
    assert abs(float(item["source"].mean())) < 1e-5 and abs(float(item["source"].std(unbiased=False)) - 1) < 1e-3
    batch = clips.collater([clips[i] for i in range(3)])
    assert batch["net_input"]["source"].shape == (3, 2500)  # the shortest kept clip
    assert batch["bad_files"] == {"bad_audio_files": 0} and batch["ntokens"] == 3 * 2500
    # a crop is a contiguous piece of its clip, at an offset fixed by (seed, epoch, clip): same again, new next epoch
    full = clips[2]["source"]
    crop = batch["net_input"]["source"][2]
    starts = [s for s in range(len(full) - 2500 + 1) if torch.equal(full[s:s + 2500], crop)]
    assert len(starts) == 1
    assert torch.equal(clips.collater([clips[i] for i in range(3)])["net_input"]["source"], batch["net_input"]["source"])
    clips.set_epoch(2)
    assert not torch.equal(clips.collater([clips[i] for i in range(3)])["net_input"]["source"][2], crop)
    clips.train = False
    assert torch.equal(clips.collater([clips[2], clips[0]])["net_input"]["source"][0], full[:2800])


def test_stereo_is_averaged_and_raw_when_not_normalising(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    stereo = np.stack([np.full(2000, 0.5), np.full(2000, -0.1)], 1).astype(np.float32)
    soundfile.write(folder / "s.wav", stereo, 16000, subtype="FLOAT")
    (folder / "train.tsv").write_text(f"{folder}\ns.wav\t2000\n")
    clips = audio_data.load_audio_clips(folder, normalize=False)
    assert torch.allclose(clips[0]["source"], torch.full((2000,), 0.2))


def test_unreadable_and_missing_files_are_skipped_counted_and_named(manifest, caplog):
    folder, _ = manifest
    (folder / "clip_1.flac").write_bytes(b"not audio at all")
    os.remove(folder / "clip_3.flac")
    clips = audio_data.load_audio_clips(folder, normalize=True, min_sample_size=1000, max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        items = [clips[i] for i in range(len(clips))]
    # kept clips: clip_0, clip_1, clip_3 (clip_2 is too short); 1 -> 3 -> (wraps) 0, and 3 -> 0
    assert [it["num_replaced"] for it in items] == [0, 2, 1]
    assert "file not found" in caplog.text
    assert clips.bad.paths == {str(folder / "clip_1.flac"), str(folder / "clip_3.flac")}
    assert "clip_1.flac" in caplog.text and "clip_3.flac" in caplog.text
    assert clips.collater(items)["bad_files"] == {"bad_audio_files": 3}  # skips, as images count them
    strict = audio_data.load_audio_clips(folder, normalize=True, min_sample_size=1000, max_bad_fraction=0.1)
    with pytest.raises(audio_data.AudioDataError, match="too many unreadable audio files.*task.max_bad_audio_fraction"):
        strict[1]


def test_wrong_sample_rate_is_an_error_naming_the_file(manifest):
    folder, _ = manifest
    soundfile.write(folder / "clip_0.flac", np.zeros(3000, np.float32), 8000)
    clips = audio_data.load_audio_clips(folder, normalize=True)
    with pytest.raises(audio_data.AudioDataError, match=r"clip_0.flac: sample rate 8000 Hz.*resample"):
        clips[0]


@pytest.mark.parametrize("problem,expected", [
    ("no_manifest", "does not exist; a wav2vec manifest folder holds train.tsv"),
    ("root_missing", "the audio root folder '/nonexistent/audio' on the first line"),
    ("bad_line", "line 2: expected 'relative/path<TAB>num_samples'"),
    ("all_short", "shorter than min_sample_size=32000 samples; lower task.min_sample_size"),
])
def test_bad_manifests_are_one_line(tmp_path, problem, expected):
    folder = tmp_path / "m"
    folder.mkdir()
    text = {"root_missing": "/nonexistent/audio\na.flac\t100\n", "bad_line": f"{folder}\na.flac 100\n",
            "all_short": f"{folder}\na.flac\t100\n"}.get(problem)
    if text:
        (folder / "train.tsv").write_text(text)
    with pytest.raises(audio_data.AudioDataError) as info:
        audio_data.load_audio_clips(folder, normalize=True, min_sample_size=32000)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# preparing audio folders (what the README tells users to run)


def test_fairseqs_manifest_script_writes_what_the_pipeline_reads(tmp_path):
    import subprocess
    import sys

    src = write_audio_manifest(tmp_path / "audio", [1600, 2400, 3200])
    dest = tmp_path / "manifest"
    dest.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fairseq.examples.wav2vec.wav2vec_manifest", str(src), "--dest",
                           str(dest), "--ext", "flac", "--valid-percent", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    clips = audio_data.load_audio_clips(dest, normalize=True)
    assert sorted(int(n) for n in clips.sizes) == [1600, 2400, 3200]
    assert len(clips[0]["source"]) == clips.sizes[0]


def test_prepare_audio_folder_splits_labelled_clips(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    src = tmp_path / "commands"
    for label in ("yes", "no", "_background_noise_"):
        (src / label).mkdir(parents=True)
        for i in range(4):
            soundfile.write(src / label / f"{i}.wav", np.zeros(1600 * (i + 1), np.float32), 16000)
    (src / "validation_list.txt").write_text("yes/0.wav\nno/3.wav\n")
    (src / "testing_list.txt").write_text("no/2.wav\n")
    dest = tmp_path / "folder"
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_audio_folder.py"), str(src), str(dest), "--valid-list",
           str(src / "validation_list.txt"), "--exclude-list", str(src / "testing_list.txt")]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    root, valid = audio_data.read_manifest(str(dest / "valid.tsv"))
    assert root == str(src) and valid == [("no/3.wav", 6400), ("yes/0.wav", 1600)]
    assert (dest / "valid.label").read_text().split() == ["no", "yes"]
    _, train = audio_data.read_manifest(str(dest / "train.tsv"))
    assert len(train) == 5 and ("no/2.wav", 4800) not in train  # 8 clips - 2 valid - 1 test; noise skipped
    assert (dest / "train.label").read_text().split() == ["no", "no", "yes", "yes", "yes"]
    soundfile.write(src / "yes" / "8k.wav", np.zeros(800, np.float32), 8000)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "yes/8k.wav (8000 Hz)" in proc.stderr
