"""Which student parameters the distillation loss gives no gradient: measured, against ``gradient_free_parameters``.

Gradients are measured in float64 on randomised models (every student weight perturbed away from its init, so no
gradient vanishes by a symmetry of the initialisation). A parameter counts as gradient-free when its gradient is
``None`` or at most 1e-13 of the largest gradient. Between the two sides of that line: float64 rounding residue of
a cancelled sum is ~1e-16 relative per operation (a few hundred operations here), and the smallest genuine gradients
of the sweep are second order in a normalisation epsilon: a post-LN block's closing LayerNorm weight seen through a
per-layer batch norm and then an instance norm (each cancels a per-channel scale up to its 1e-5 epsilon), ~1e-10.
"""
from __future__ import annotations

import itertools
from dataclasses import fields

import pytest
import torch

from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
from fairseq_mmkd.distill.distiller import Distiller, gradient_free_parameters
from fairseq_mmkd.encoders.image import ImageEncoderConfig
from fairseq_mmkd.encoders.text import TextEncoderConfig
from fairseq_mmkd.distill.multimodal import MultimodalDistiller

RELATIVE_ZERO = 1e-13


def teacher(modality="image", layer_norm_first=False, end_of_block=False, seed=0) -> D2vModel:
    encoder = (ImageEncoderConfig(input_size=16, patch_size=8, embed_dim=16, prenet_depth=0, num_extra_tokens=1)
               if modality == "image" else TextEncoderConfig(vocab_size=30, max_source_positions=16))
    cfg = D2vConfig(modality=modality, embed_dim=16, depth=3, num_heads=2, layer_norm_first=layer_norm_first,
                    end_of_block_targets=end_of_block, encoder=encoder)
    torch.manual_seed(seed)
    return D2vModel(cfg)


def perturbed(distiller):
    with torch.no_grad():
        for p in distiller.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return distiller.double()


def batch(modality):
    torch.manual_seed(1)
    if modality == "image":
        return torch.randn(3, 3, 16, 16, dtype=torch.float64), None
    tokens = torch.randint(4, 30, (3, 9))
    tokens[0, 6:] = 1  # padded: the masked statistics must cancel the constants over the valid tokens only
    return tokens, tokens.eq(1)


def measured_gradient_free(distiller, modality, target_cfg, include_extra_tokens=True) -> set:
    source, padding_mask = batch(modality)
    distiller.zero_grad(set_to_none=True)
    distiller.loss(source, target_cfg, include_extra_tokens, padding_mask)["loss_sum"].backward()
    grads = {n: p.grad for n, p in distiller.named_parameters() if p.requires_grad}
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    return {n for n, g in grads.items() if g is None or float(g.abs().max()) <= RELATIVE_ZERO * scale}


RECIPES = [TargetConfig(average_top_k_layers=k, **dict(zip([f.name for f in fields(TargetConfig)][1:], flags)))
           for k, flags in zip(itertools.cycle([1, 2]), itertools.product([False, True], repeat=5))]


@pytest.mark.parametrize("layer_norm_first,end_of_block", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("recipe", range(len(RECIPES)))
def test_rule_matches_the_measured_gradients(recipe, layer_norm_first, end_of_block):
    cfg = RECIPES[recipe]
    d = perturbed(Distiller(teacher(layer_norm_first=layer_norm_first, end_of_block=end_of_block), student_depth=2,
                            student_init="random"))
    assert measured_gradient_free(d, "image", cfg) == set(gradient_free_parameters(d, cfg)), cfg


@pytest.mark.parametrize("include_extra_tokens", [True, False])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_rule_holds_for_the_released_recipes_with_padding_and_without_the_cls_token(modality, include_extra_tokens):
    """data2vec2's own recipes (image: instance norm per layer, LayerNorm of the average; text/audio: instance norm
    per layer only), a padded text batch, the CLS token regressed or not."""
    cfg = TargetConfig(average_top_k_layers=2, instance_norm_target_layer=True,
                       layer_norm_targets=modality == "image")
    d = perturbed(Distiller(teacher(modality), student_depth=3, student_init="random"))
    found = measured_gradient_free(d, modality, cfg, include_extra_tokens)
    assert found == set(gradient_free_parameters(d, cfg))
    assert found == {"student_blocks.2.norm2.weight", "student_blocks.2.norm2.bias", "student_blocks.2.mlp.fc2.bias"}


def test_a_regression_head_trains_every_student_parameter():
    cfg = TargetConfig(average_top_k_layers=2)
    d = perturbed(Distiller(teacher(), student_depth=2, student_init="random", prediction="head"))
    assert measured_gradient_free(d, "image", cfg) == set() == set(gradient_free_parameters(d, cfg))


def test_multimodal_student_frees_only_what_no_modality_trains():
    """One student stack for an image and a text teacher: a parameter is gradient-free only if it is for both."""
    image, text = teacher("image"), teacher("text", seed=1)
    d = MultimodalDistiller({"image": image, "text": text}, student_depth=2)
    perturbed(d)
    recipes = {"image": TargetConfig(average_top_k_layers=2, instance_norm_target_layer=True),
               "text": TargetConfig(average_top_k_layers=2, instance_norm_target_layer=False,
                                       layer_norm_target_layer=True)}
    measured = {m: measured_gradient_free(d.view(m), m, recipes[m]) for m in recipes}
    assert measured["image"] != measured["text"]  # the text recipe's LayerNorm spreads the bias: it learns there
    assert set(d.gradient_free_parameters(recipes)) == measured["image"] & measured["text"]
