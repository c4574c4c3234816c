"""data2vec 2.0 contextualised targets: normalise the top-k per-layer outputs, average, normalise again.

Same recipe and order as fairseq's ``Data2VecMultiModel.make_targets``; always computed in fp32. Norms
use eps 1e-5 and no affine parameters, as upstream.

Padded batches (text, audio) are where this departs from fairseq on purpose: given a padding mask, the
instance and batch norms take their statistics over valid positions only, and the targets are 0 at pads.
fairseq's pretraining includes the pads in those statistics (its audio batches are never padded and its
text blocks rarely are), so a padded sequence gets the targets it would get alone; without padding both
are the same computation.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass
class TargetConfig:
    """How targets are built from per-layer outputs (defaults: data2vec2's base image recipe)."""

    average_top_k_layers: int = 10
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    batch_norm_target_layer: bool = False
    layer_norm_targets: bool = True
    instance_norm_targets: bool = False

    @classmethod
    def from_fairseq(cls, model_cfg: dict) -> "TargetConfig":
        """Read the settings a data2vec_multi checkpoint was trained with (fairseq defaults if absent)."""
        upstream_defaults = dict(average_top_k_layers=8, instance_norm_target_layer=False,
                                 layer_norm_targets=False)
        kw = {}
        for f in fields(cls):
            default = upstream_defaults.get(f.name, False)
            kw[f.name] = type(default)(model_cfg.get(f.name, default))
        return cls(**kw)


def at_least_fp32(y: torch.Tensor) -> torch.Tensor:
    """``y`` in fp32, or in its own dtype when that is wider (float64 stays float64: exact gradient checks)."""
    return y.to(torch.promote_types(y.dtype, torch.float32))


def _masked_norm(y: torch.Tensor, valid: torch.Tensor, dims: tuple) -> torch.Tensor:
    """``(y - mean) / sqrt(var + 1e-5)`` with biased mean/var over ``dims`` at valid positions only (the
    statistics of ``F.instance_norm`` / ``F.batch_norm`` on the valid tokens alone); 0 at padding."""
    count = valid.sum(dims, keepdim=True).clamp_min(1)
    mean = (y * valid).sum(dims, keepdim=True) / count
    var = ((y - mean).pow(2) * valid).sum(dims, keepdim=True) / count
    return (y - mean) * torch.rsqrt(var + 1e-5) * valid


def make_targets(layer_results: Sequence[torch.Tensor], cfg: TargetConfig,
                 padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Average of the last ``cfg.average_top_k_layers`` normalised layer outputs.

    Args:
        layer_results: per-layer tensors ``[B, T, C]`` (the caller chooses which tokens to include).
        cfg: the normalisation recipe.
        padding_mask: optional bool ``[B, T]``, True at padding: statistics over valid positions only, and
            0 at padding (see the module docstring).

    Returns:
        fp32 tensor ``[B, T, C]`` (float64 for float64 inputs). Differentiable: the same recipe turns a student's per-layer outputs
        into its prediction (``layer_average``); callers wrap teacher targets in ``torch.no_grad``.
    """
    k = cfg.average_top_k_layers
    if not 1 <= k <= len(layer_results):
        raise ValueError(f"average_top_k_layers={k} must be between 1 and the number of layers ({len(layer_results)})")
    ys = [at_least_fp32(y) for y in layer_results[-k:]]
    if padding_mask is not None:
        valid = (~padding_mask).unsqueeze(-1).to(ys[0].dtype)  # [B, T, 1]
        if cfg.batch_norm_target_layer:
            ys = [_masked_norm(y, valid, (0, 1)) for y in ys]
        if cfg.instance_norm_target_layer:
            ys = [_masked_norm(y, valid, (1,)) for y in ys]
    elif cfg.batch_norm_target_layer or cfg.instance_norm_target_layer:
        ys = [y.transpose(1, 2) for y in ys]  # BTC -> BCT: normalise each channel over tokens
        if cfg.batch_norm_target_layer:
            ys = [F.batch_norm(y, None, None, training=True) for y in ys]
        if cfg.instance_norm_target_layer:
            ys = [F.instance_norm(y) for y in ys]
        ys = [y.transpose(1, 2) for y in ys]
    if cfg.layer_norm_target_layer:
        ys = [F.layer_norm(y, y.shape[-1:]) for y in ys]
    target = sum(ys[1:], ys[0]) / len(ys)  # running sum: one extra [B, T, C] buffer, not k
    if cfg.layer_norm_targets:
        target = F.layer_norm(target, target.shape[-1:])
    if cfg.instance_norm_targets:
        if padding_mask is not None:
            target = _masked_norm(target, valid, (1,))
        else:
            target = F.instance_norm(target.transpose(1, 2)).transpose(1, 2)
    if padding_mask is not None:
        target = target * valid
    return target
