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
from fairseq_reference import reference_outputs, write_reference_checkpoint

REPO = Path(__file__).resolve().parents[1]
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
