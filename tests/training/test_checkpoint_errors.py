"""Unusable checkpoints fail with one ``CheckpointError`` naming the file and the problem, and loading
never runs code hidden in a pickle unless the caller trusts the file.

Every bad file is derived from a real one written by fairseq's trainer (``fairseq_reference``), so each
test changes exactly one thing about an otherwise loadable checkpoint.
"""
from __future__ import annotations

import datetime
import os
import shlex
from collections import OrderedDict

import pytest
import torch

from fairseq_mmkd import CheckpointError, load_d2v_image, read_checkpoint
from fairseq_mmkd.testing.fairseq_reference import write_classifier_checkpoint, write_reference_checkpoint

AUDIO = {  # a small data2vec 2.0 speech model
    "supported_modality": "AUDIO",
    "model.modalities.audio.feature_encoder_spec": "[(32, 10, 5)] + [(32, 3, 2)]",
    "model.modalities.audio.conv_pos_depth": 1, "model.modalities.audio.conv_pos_width": 4,
    "model.modalities.audio.conv_pos_groups": 4, "model.modalities.audio.prenet_depth": 0,
    "model.modalities.audio.decoder.decoder_dim": 16, "model.modalities.audio.decoder.decoder_groups": 4,
    "model.modalities.audio.decoder.decoder_layers": 1,
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "checkpoint_best.pt"
    write_reference_checkpoint(path)
    return path


def edited_copy(src, dst, edit):
    """``dst``: ``src`` with ``edit(state)`` applied (the state is our own test file, so trusted)."""
    state = torch.load(src, map_location="cpu", weights_only=False)
    edit(state)
    torch.save(state, dst)
    return dst


def load_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_d2v_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, f"message does not name the file: {message}"
    assert "\n" not in message, f"message is not one line: {message}"
    return message


def test_missing_path(tmp_path):
    assert "file not found" in load_error(tmp_path / "base_imagenet.pt")


def test_directory(tmp_path):
    assert "is a directory" in load_error(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert "empty" in load_error(path)


@pytest.mark.parametrize("content", [b"<html><body>404 Not Found</body></html>\n", bytes(range(1, 256)) * 40],
                         ids=["html_error_page", "random_bytes"])
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "base_imagenet.pt"
    path.write_bytes(content)
    assert "not a PyTorch checkpoint" in load_error(path)


def test_truncated_file(tmp_path, good_checkpoint):
    data = good_checkpoint.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in load_error(path)


def test_bare_state_dict(tmp_path, good_checkpoint):
    state = torch.load(good_checkpoint, map_location="cpu", weights_only=False)["model"]
    path = tmp_path / "state_dict.pt"
    torch.save(OrderedDict((k, v) for k, v in state.items() if k != "_ema"), path)
    assert "not a fairseq checkpoint" in load_error(path)


def test_legacy_argparse_checkpoint(tmp_path, good_checkpoint):
    import argparse

    def legacy(state):
        state["args"] = argparse.Namespace(arch="transformer", task="translation")
        state["cfg"] = None

    path = edited_copy(good_checkpoint, tmp_path / "legacy.pt", legacy)
    assert "legacy argparse-era" in load_error(path)


def test_other_fairseq_model(tmp_path, good_checkpoint):
    def transformer(state):
        state["cfg"]["model"]["_name"] = "transformer"

    path = edited_copy(good_checkpoint, tmp_path / "transformer.pt", transformer)
    assert "'transformer' model, not a data2vec 2.0 model" in load_error(path)


def test_finetuned_classifier(tmp_path, good_checkpoint):
    path = tmp_path / "base_imagenet_ft.pt"
    write_classifier_checkpoint(path, good_checkpoint)
    message = load_error(path)
    assert "'mae_image_classification'" in message and "fine-tuned classifier" in message


def test_audio_model(tmp_path):
    path = tmp_path / "base_libri.pt"
    write_reference_checkpoint(path, train_steps=0, **AUDIO)
    assert "audio model, not an image model" in load_error(path)


def test_text_model_without_image_keys(tmp_path, good_checkpoint):
    def text(state):
        state["cfg"]["model"]["supported_modality"] = "TEXT"
        for k in [k for k in state["model"] if k.startswith("modality_encoders.IMAGE.")]:
            state["model"][k.replace(".IMAGE.", ".TEXT.")] = state["model"].pop(k)

    path = edited_copy(good_checkpoint, tmp_path / "nlp_base.pt", text)
    assert "text model, not an image model" in load_error(path)


@pytest.mark.parametrize("weights,key", [
    ("model", "blocks.1.mlp.fc1.weight"),
    ("model", "modality_encoders.IMAGE.context_encoder.norm.weight"),
    ("ema", "_ema/blocks.2.attn.qkv.bias"),
])
def test_missing_keys(tmp_path, good_checkpoint, weights, key):
    def drop(state):
        if key.startswith("_ema/"):
            del state["model"]["_ema"][key[len("_ema/"):]]
        else:
            del state["model"][key]

    path = edited_copy(good_checkpoint, tmp_path / "missing.pt", drop)
    message = load_error(path, weights=weights)
    assert "missing keys" in message and key in message


@pytest.mark.parametrize("key", [
    "blocks.3.norm1.weight",  # a shared block beyond cfg.model.depth
    "modality_encoders.IMAGE.context_encoder.blocks.2.norm1.weight",  # a prenet block beyond prenet_depth
])
def test_unexpected_keys(tmp_path, good_checkpoint, key):
    def add(state):
        state["model"][key] = torch.ones(32)

    path = edited_copy(good_checkpoint, tmp_path / "unexpected.pt", add)
    message = load_error(path)
    assert "unexpected keys" in message and key in message


def test_keys_of_other_modalities_are_ignored(tmp_path, good_checkpoint):
    """A multi-modal checkpoint also holds other modality encoders; the image teacher skips them."""
    def add(state):
        state["model"]["modality_encoders.AUDIO.local_encoder.conv_layers.0.0.weight"] = torch.ones(4, 1, 10)

    load_d2v_image(edited_copy(good_checkpoint, tmp_path / "multimodal.pt", add))


def test_shape_mismatch(tmp_path, good_checkpoint):
    def shrink(state):
        w = state["model"]["blocks.0.mlp.fc1.weight"]
        state["model"]["blocks.0.mlp.fc1.weight"] = w[: w.shape[0] // 2]

    path = edited_copy(good_checkpoint, tmp_path / "shape.pt", shrink)
    message = load_error(path)
    assert "shape mismatch" in message and "blocks.0.mlp.fc1.weight" in message


def test_ema_requested_from_checkpoint_without_ema(tmp_path):
    path = tmp_path / "no_ema.pt"
    write_reference_checkpoint(path, train_steps=0, skip_ema=True)
    assert "no EMA weights" in load_error(path, weights="ema")
    load_d2v_image(path, weights="model")  # the online weights are fine


class RunsShellOnUnpickle:
    """Unpickling this runs ``touch marker``: the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def with_extra_object(src, dst, obj):
    def add(state):
        state["extra_state"]["payload"] = obj

    return edited_copy(src, dst, add)


def test_malicious_checkpoint_is_refused_without_running_its_code(tmp_path, good_checkpoint):
    probe_marker, marker = tmp_path / "probe_ran", tmp_path / "pwned"
    probe = with_extra_object(good_checkpoint, tmp_path / "probe.pt", RunsShellOnUnpickle(probe_marker))
    torch.load(probe, map_location="cpu", weights_only=False)  # an unsafe load does run the payload
    assert probe_marker.exists(), "the payload is not live, the test below would prove nothing"

    evil = with_extra_object(good_checkpoint, tmp_path / "evil.pt", RunsShellOnUnpickle(marker))
    for load in (load_d2v_image, read_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(evil)
        message = str(info.value)
        assert str(evil) in message and "system" in message and "trust_checkpoint" in message, message
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_trust_checkpoint_allows_unusual_types(tmp_path, good_checkpoint):
    path = with_extra_object(good_checkpoint, tmp_path / "dated.pt", datetime.datetime(2024, 5, 1, 12, 0))
    message = load_error(path)
    assert "datetime.datetime" in message and "trust_checkpoint" in message

    trusted = load_d2v_image(path, trust_checkpoint=True)
    reference = load_d2v_image(good_checkpoint)
    for (name, a), b in zip(trusted.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
