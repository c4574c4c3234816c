"""The plugin's data2vec 2.0 teacher computes what fairseq's own ``Data2VecMultiModel`` computes.

Each case writes a small checkpoint with fairseq's trainer (``fairseq_reference``), loads it with
``fairseq_mmkd.load_d2v_image`` and compares every output the distillation uses with fairseq's, for the
online weights (fairseq's feature path) and the EMA weights (the teacher inside fairseq's pretraining
forward). The cases cover each architecture and target setting of ``Data2VecMultiConfig`` that changes
the computation, without taking their full product.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fairseq_mmkd import load_d2v_image, read_checkpoint
from fairseq_mmkd.testing.fairseq_reference import (fairseq_load_checkpoint, reference_outputs, torch_load_without_weights_only,
                               write_reference_checkpoint)

ATOL = 1e-5  # fp32; fairseq's manual softmax vs scaled_dot_product_attention differ by ~1e-6

# Short names are those of fairseq_reference.SMALL; unlisted settings are the released base image
# config's: post-LN, prenet 2, one CLS token, 32 px / patch 8, FFN targets, EMA teacher with its own
# patch embedding, instance-norm per layer + layer-norm of the average, average of all 3 blocks.
CASES = {
    "base": {},
    "pre_ln": dict(layer_norm_first=True),
    "pre_ln_no_prenet_no_cls": dict(layer_norm_first=True, prenet_depth=0, num_extra_tokens=0),
    "no_prenet_no_cls": dict(prenet_depth=0, num_extra_tokens=0),
    "pre_ln_two_extra_tokens": dict(layer_norm_first=True, num_extra_tokens=2),
    "24px_patch4": dict(input_size=24, patch_size=4),
    "end_of_block_targets": dict(end_of_block_targets=True),
    "pre_ln_end_of_block_targets_24px": dict(layer_norm_first=True, end_of_block_targets=True, input_size=24,
                                             patch_size=4),
    "ema_encoder_only": dict(ema_encoder_only=True),
    "ema_encoder_only_pre_ln_no_cls_24px": dict(ema_encoder_only=True, layer_norm_first=True, num_extra_tokens=0,
                                                input_size=24, patch_size=4),
    "ema_without_local_encoder": dict(ema_local_encoder=False),
    "modality_dim_differs": dict(image_embed_dim=24),
    "layer_norm_target_layer": dict(instance_norm_target_layer=False, layer_norm_target_layer=True,
                                    layer_norm_targets=False),
    "batch_norm_target_layer_instance_norm_targets": dict(instance_norm_target_layer=False,
                                                          batch_norm_target_layer=True, layer_norm_targets=False,
                                                          instance_norm_targets=True),
    "all_target_norms": dict(batch_norm_target_layer=True, instance_norm_target_layer=True,
                             layer_norm_target_layer=True, layer_norm_targets=True, instance_norm_targets=True),
    "top1_raw_targets": dict(average_top_k_layers=1, instance_norm_target_layer=False, layer_norm_targets=False),
    "top2_of_4_blocks_48d_mlp2": dict(depth=4, average_top_k_layers=2, embed_dim=48, num_heads=3, mlp_ratio=2.0),
}


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """``case name -> (checkpoint path, fairseq model)``, each written once per module."""
    root = tmp_path_factory.mktemp("fairseq_d2v2")
    cache = {}

    def get(case):
        if case not in cache:
            path = root / f"{case}.pt"
            cache[case] = path, write_reference_checkpoint(path, **CASES[case])
        return cache[case]

    return get


def images_for(model, batch: int = 3, seed: int = 0) -> torch.Tensor:
    size = model.cfg.modalities.image.input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, fairseq {tuple(expected.shape)}"
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max |ours - fairseq| = {err:.2e} > {ATOL:.0e}"


def assert_matches_fairseq(ours: dict, targets: torch.Tensor, expected: dict) -> None:
    assert_close(ours["encoder_out"], expected["encoder_out"], "encoder_out")
    assert len(ours["layer_results"]) == len(expected["layer_results"]), "number of shared blocks"
    for i, (a, b) in enumerate(zip(ours["layer_results"], expected["layer_results"])):
        assert_close(a, b, f"layer_results[{i}]")
    for i, (a, b) in enumerate(zip(ours["block_out"], expected["block_out"])):
        assert_close(a, b, f"block_out[{i}]")
    assert_close(targets, expected["targets"], "targets")
    if "x" in expected:
        assert_close(ours["x"], expected["x"], "x (final features)")


@pytest.mark.parametrize("weights", ["model", "ema"])
@pytest.mark.parametrize("case", list(CASES))
def test_teacher_matches_fairseq(reference_checkpoint, case, weights):
    path, fairseq_model = reference_checkpoint(case)
    images = images_for(fairseq_model)
    expected = reference_outputs(fairseq_model, images, weights)

    teacher = load_d2v_image(path, weights=weights)
    with torch.no_grad():
        ours = teacher(images)
    assert_matches_fairseq(ours, teacher.make_targets(ours["layer_results"]), expected)


def test_online_and_ema_teachers_differ(reference_checkpoint):
    """Guards the parity test: picking the wrong weight set must be far outside its tolerance."""
    path, fairseq_model = reference_checkpoint("base")
    images = images_for(fairseq_model)
    online = load_d2v_image(path, weights="model")(images)
    ema = load_d2v_image(path, weights="ema")(images)
    assert (online["encoder_out"] - ema["encoder_out"]).abs().max() > 1e3 * ATOL
    assert (online["block_out"][-1] - ema["block_out"][-1]).abs().max() > 1e3 * ATOL


def test_reference_checkpoint_has_the_released_layout(reference_checkpoint):
    """The files these tests load are what fairseq's trainer writes (fact sheet, section 1)."""
    path, fairseq_model = reference_checkpoint("base")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: trusted
    assert set(state) == {"args", "cfg", "model", "criterion", "optimizer_history", "task_state", "extra_state",
                          "last_optimizer_state"}
    assert state["args"] is None and state["criterion"] is None and state["task_state"] == {}
    cfg = state["cfg"]
    assert isinstance(cfg, dict) and {"common", "model", "task", "criterion", "optimizer", "ema"} <= set(cfg)
    assert cfg["model"]["_name"] == "data2vec_multi" and cfg["task"]["_name"] == "mae_image_pretraining"
    assert cfg["model"]["supported_modality"] == "IMAGE"
    assert cfg["model"]["modalities"]["image"]["type"] == "IMAGE"
    assert {"audio", "image", "text"} <= set(cfg["model"]["modalities"])
    online = {k for k in state["model"] if k != "_ema"}
    decoder = {k for k in online if k.startswith("modality_encoders.IMAGE.decoder.")}
    assert decoder and set(state["model"]["_ema"]) == online - decoder
    assert state["optimizer_history"][-1]["num_updates"] == 1
    meters = {name: meter for _, name, _, meter in state["extra_state"]["metrics"]["train"]}
    assert type(meters["target_var_np"]["val"]) is np.float64


def test_safe_loader_reads_trainer_checkpoint_with_numpy_metrics(reference_checkpoint):
    path, fairseq_model = reference_checkpoint("base")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, map_location="cpu", weights_only=True)  # what plain torch >= 2.6 does
    state = read_checkpoint(path)  # safe allow-list load, no trust needed
    meters = {name: meter for _, name, _, meter in state["extra_state"]["metrics"]["train"]}
    assert meters["target_var_np"]["val"] == np.float64(0.998)
    assert load_d2v_image(path).cfg.depth == fairseq_model.cfg.depth


@pytest.mark.parametrize("numpy_metrics", [False, True])
def test_fairseq_loads_the_same_file_and_computes_the_same_features(tmp_path, numpy_metrics):
    """fairseq's own loader (``checkpoint_utils.load_checkpoint_to_cpu`` + ``build_model(from_checkpoint)``)
    reads the file and its model computes what ours does. Files with numpy metrics need
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` there, because fairseq passes no ``weights_only``."""
    path = tmp_path / "checkpoint_last.pt"
    write_reference_checkpoint(path, numpy_metrics=numpy_metrics, layer_norm_first=True)
    if numpy_metrics:
        with torch_load_without_weights_only():
            state, fairseq_model = fairseq_load_checkpoint(path)
    else:
        state, fairseq_model = fairseq_load_checkpoint(path)
    assert state["cfg"].model._name == "data2vec_multi"
    images = images_for(fairseq_model)
    for weights in ("model", "ema"):
        teacher = load_d2v_image(path, weights=weights)
        with torch.no_grad():
            ours = teacher(images)
        assert_matches_fairseq(ours, teacher.make_targets(ours["layer_results"]),
                               reference_outputs(fairseq_model, images, weights))
