"""``python -m fairseq_mmkd.extract`` writes what fairseq's own data2vec 2.0 computes, and a bad command
fails with one ``error:`` line and exit status 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairseq_mmkd.extract import main
from fairseq_mmkd.testing.fairseq_reference import reference_outputs, write_reference_checkpoint

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def run_extract(*args):
    return subprocess.run([sys.executable, "-m", "fairseq_mmkd.extract", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A fairseq-written checkpoint, its fairseq model, and 5 images saved as the CLI expects them."""
    root = tmp_path_factory.mktemp("extract")
    model = write_reference_checkpoint(root / "checkpoint_best.pt")
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.save(root / "images.npy", images.numpy())
    return root / "checkpoint_best.pt", model, images, root


def assert_usage_error(proc, *phrases):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_extract_matches_fairseq(teacher, weights):
    ckpt, fairseq_model, images, root = teacher
    out = root / f"features_{weights}.npz"
    # batch size 2 over 5 images: two full batches and a partial one must land in the right rows
    proc = run_extract("--checkpoint", ckpt, "--input", root / "images.npy", "--output", out,
                       "--weights", weights, "--batch-size", 2)
    assert proc.returncode == 0, proc.stderr

    expected = reference_outputs(fairseq_model, images, weights)
    depth = len(expected["block_out"])
    with np.load(out) as got:
        assert sorted(got.files) == sorted(["encoder_out", "targets"] + [f"layer_results_{i}" for i in range(depth)]
                                           + [f"block_out_{i}" for i in range(depth)])
        pairs = [("encoder_out", expected["encoder_out"]), ("targets", expected["targets"])]
        pairs += [(f"layer_results_{i}", t) for i, t in enumerate(expected["layer_results"])]
        pairs += [(f"block_out_{i}", t) for i, t in enumerate(expected["block_out"])]
        for name, want in pairs:
            assert got[name].dtype == np.float32 and got[name].shape == tuple(want.shape), name
            err = np.abs(got[name] - want.numpy()).max()
            assert err <= ATOL, f"{name}: max |ours - fairseq| = {err:.2e}"


def test_bad_checkpoint_exits_2_without_traceback(teacher, tmp_path):
    _, _, _, root = teacher
    bad = tmp_path / "base_imagenet.pt"
    bad.write_bytes(b"<html>403 Forbidden</html>")
    proc = run_extract("--checkpoint", bad, "--input", root / "images.npy", "--output", tmp_path / "out.npz")
    assert_usage_error(proc, str(bad), "not a PyTorch checkpoint")
    assert not (tmp_path / "out.npz").exists()


def test_bad_input_shape_exits_2_without_traceback(teacher, tmp_path):
    ckpt, _, _, _ = teacher
    images = tmp_path / "images_224.npy"
    np.save(images, np.zeros((2, 3, 48, 48), dtype=np.float32))
    proc = run_extract("--checkpoint", ckpt, "--input", images, "--output", tmp_path / "out.npz")
    assert_usage_error(proc, str(images), "[B, 3, 32, 32]", "[2, 3, 48, 48]")
    assert list(tmp_path.iterdir()) == [images], "a failed run left files behind"


@pytest.mark.parametrize("problem", ["missing", "float64", "channels_last", "npz", "empty", "no_out_dir",
                                     "cuda"])
def test_bad_input_is_one_error_line(teacher, tmp_path, capsys, problem):
    """The same error path, in-process (a subprocess per case would mostly time fairseq's import)."""
    ckpt, _, _, _ = teacher
    images, out, extra = tmp_path / "images.npy", tmp_path / "out.npz", []
    arrays = {"float64": np.zeros((2, 3, 32, 32)), "channels_last": np.zeros((2, 32, 32, 3), np.float32),
              "empty": np.zeros((0, 3, 32, 32), np.float32)}
    if problem in arrays:
        np.save(images, arrays[problem])
    elif problem == "npz":
        np.savez(tmp_path / "images.npz", images=np.zeros((2, 3, 32, 32), np.float32))
        images = tmp_path / "images.npz"
    elif problem != "missing":
        np.save(images, np.zeros((2, 3, 32, 32), np.float32))
    if problem == "no_out_dir":
        out = tmp_path / "missing_dir" / "out.npz"
    if problem == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is available here")
        extra = ["--device", "cuda"]
    status = main(["--checkpoint", str(ckpt), "--input", str(images), "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    expected = {"missing": "not found", "float64": "float32", "channels_last": "[B, 3, 32, 32]", "npz": ".npz archive",
                "empty": "no images", "no_out_dir": "does not exist", "cuda": "no CUDA device"}[problem]
    assert expected in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# text and audio checkpoints


@pytest.fixture(scope="module")
def text_audio(tmp_path_factory):
    """Fairseq-written text and audio checkpoints (never seen by the plugin before), their models and inputs."""
    from fairseq_mmkd.testing import fairseq_reference as ref

    root = tmp_path_factory.mktemp("extract_text_audio")
    out = {}
    for modality, lengths in (("text", [24, 20, 13, 24, 7]), ("audio", [2000, 1700, 1200, 2000, 900])):
        path = root / f"{modality}.pt"
        model = write_reference_checkpoint(path, modality=modality)
        gen = torch.Generator().manual_seed(1)
        batch = (ref.text_batch if modality == "text" else ref.audio_batch)(model.cfg, 5, gen, lengths)
        source = batch["source"]
        mask = torch.arange(source.shape[1])[None, :] >= torch.tensor(lengths)[:, None]
        np.save(root / f"{modality}.npy", source.numpy())
        np.save(root / f"{modality}_mask.npy", mask.numpy())
        out[modality] = path, model, source, mask, root
    return out


def assert_npz_matches(out, expected: dict, padded: bool) -> None:
    depth = len(expected["block_out"])
    with np.load(out) as got:
        names = ["encoder_out", "targets"] + [f"layer_results_{i}" for i in range(depth)] + \
            [f"block_out_{i}" for i in range(depth)]
        assert sorted(got.files) == sorted(names + (["padding_mask"] if padded else []))
        valid = 1.0
        if padded:
            assert got["padding_mask"].dtype == np.bool_
            assert np.array_equal(got["padding_mask"], expected["padding_mask"].numpy())
            valid = (~got["padding_mask"])[..., None]
        pairs = [("encoder_out", expected["encoder_out"])]
        pairs += [(f"layer_results_{i}", t) for i, t in enumerate(expected["layer_results"])]
        pairs += [(f"block_out_{i}", t) for i, t in enumerate(expected["block_out"])]
        if not padded:
            pairs.append(("targets", expected["targets"]))
        for name, want in pairs:
            assert got[name].dtype == np.float32 and got[name].shape == tuple(want.shape), name
            err = (np.abs(got[name] - want.numpy()) * valid).max()
            assert err <= ATOL, f"{name}: max |ours - fairseq| = {err:.2e}"
        if padded:  # the plugin's targets: 0 at padding, finite everywhere
            assert np.isfinite(got["targets"]).all() and (got["targets"] * ~valid).max() == 0


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("weights", ["model", "ema"])
@pytest.mark.parametrize("modality", ["text", "audio"])
def test_extract_text_and_audio_match_fairseq(text_audio, modality, weights, padded):
    ckpt, fairseq_model, source, mask, root = text_audio[modality]
    out = root / f"{modality}_{weights}_{padded}.npz"
    if padded:
        args = ["--input", root / f"{modality}.npy", "--padding-mask", root / f"{modality}_mask.npy"]
        expected = reference_outputs(fairseq_model, source, weights, mask)
    else:  # the full-length rows only
        full = (~mask).all(1)
        np.save(root / f"{modality}_full.npy", source[full].numpy())
        args = ["--input", root / f"{modality}_full.npy"]
        expected = reference_outputs(fairseq_model, source[full], weights)
    status = main(["--checkpoint", str(ckpt), *map(str, args), "--output", str(out), "--weights", weights,
                   "--batch-size", "2"])
    assert status == 0
    assert_npz_matches(out, expected, padded)


def test_text_without_mask_is_padded_at_pad_tokens(text_audio, tmp_path):
    ckpt, fairseq_model, source, mask, root = text_audio["text"]
    out = tmp_path / "implicit.npz"
    assert main(["--checkpoint", str(ckpt), "--input", str(root / "text.npy"), "--output", str(out)]) == 0
    assert_npz_matches(out, reference_outputs(fairseq_model, source, "model", mask), padded=True)


def test_audio_files_read_normalised_and_padded(text_audio, tmp_path):
    """``--input a.wav b.flac``: 16 kHz files (one stereo, averaged), normalised per file when the checkpoint was
    trained with ``normalize``, padded to the longest: what fairseq computes on that padded batch."""
    import soundfile

    ckpt, fairseq_model, _, _, _ = text_audio["audio"]
    gen = np.random.default_rng(0)
    mono = (0.3 * gen.standard_normal(1900) + 0.1).astype(np.float32)
    stereo = (0.2 * gen.standard_normal((1300, 2))).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", mono, 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "b.flac", stereo, 16000, subtype="PCM_24")
    b, _ = soundfile.read(tmp_path / "b.flac", dtype="float32")  # FLAC is 24-bit: compare with what it holds
    assert torch.load(ckpt, weights_only=False)["cfg"]["task"]["normalize"] is True
    clips = [torch.from_numpy(mono), torch.from_numpy(b.mean(1))]
    clips = [torch.nn.functional.layer_norm(c, c.shape) for c in clips]
    source = torch.zeros(2, 1900)
    mask = torch.ones(2, 1900, dtype=torch.bool)
    for i, c in enumerate(clips):
        source[i, :len(c)], mask[i, :len(c)] = c, False
    out = tmp_path / "files.npz"
    status = main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "a.wav"), str(tmp_path / "b.flac"),
                   "--output", str(out)])
    assert status == 0
    assert_npz_matches(out, reference_outputs(fairseq_model, source, "model", mask), padded=True)


@pytest.mark.parametrize("problem,expected", [
    ("text_float", "takes int64 token ids, got float32"),
    ("text_rank3", "int64 tensor [B, T]"),
    ("text_out_of_vocab", "token ids must be in [0, 35)"),
    ("text_too_long", "longer than the teacher's 24 positions"),
    ("text_mask_shape", "must have the input's shape [2, 10]"),
    ("text_mask_dtype", "must be bool"),
    ("audio_int16", "takes float32 samples, got int16"),
    ("audio_rank3", "float tensor [B, L]"),
    ("audio_too_short", "shorter than the conv feature extractor's receptive field (40 samples)"),
    ("audio_short_clip_in_mask", "only 30 unpadded samples, fewer than the conv feature extractor's receptive"),
    ("audio_mask_shape", "must have the input's shape [2, 500]"),
    ("audio_wrong_rate", "sample rate 8000 Hz"),
    ("audio_files_for_text", "is a text model"),
])
def test_bad_text_and_audio_inputs_are_one_error_line(text_audio, tmp_path, capsys, problem, expected):
    modality = problem.split("_")[0]
    ckpt = text_audio[modality][0] if problem != "audio_files_for_text" else text_audio["text"][0]
    x, args = tmp_path / "x.npy", []
    if problem == "text_float":
        np.save(x, np.zeros((2, 10), np.float32))
    elif problem == "text_rank3":
        np.save(x, np.zeros((2, 10, 1), np.int64))
    elif problem == "text_out_of_vocab":
        np.save(x, np.full((2, 10), 35, np.int64))
    elif problem == "text_too_long":
        np.save(x, np.full((2, 25), 5, np.int64))
    elif problem.startswith("text_mask"):
        np.save(x, np.full((2, 10), 5, np.int64))
        mask = np.zeros((2, 9), bool) if problem == "text_mask_shape" else np.zeros((2, 10), np.int64)
        np.save(tmp_path / "m.npy", mask)
        args = ["--padding-mask", str(tmp_path / "m.npy")]
    elif problem == "audio_int16":
        np.save(x, np.zeros((2, 500), np.int16))
    elif problem == "audio_rank3":
        np.save(x, np.zeros((2, 1, 500), np.float32))
    elif problem == "audio_too_short":
        np.save(x, np.zeros((2, 39), np.float32))
    elif problem in ("audio_short_clip_in_mask", "audio_mask_shape"):
        np.save(x, np.zeros((2, 500), np.float32))
        mask = np.zeros((2, 500), bool)
        mask[1, 30:] = True
        np.save(tmp_path / "m.npy", mask if problem == "audio_short_clip_in_mask" else mask[:, :400])
        args = ["--padding-mask", str(tmp_path / "m.npy")]
    if problem in ("audio_wrong_rate", "audio_files_for_text"):
        import soundfile

        soundfile.write(tmp_path / "x.wav", np.zeros(4000, np.float32), 8000 if problem == "audio_wrong_rate" else 16000)
        x = tmp_path / "x.wav"
    out = tmp_path / "out.npz"
    status = main(["--checkpoint", str(ckpt), "--input", str(x), *args, "--output", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists()
