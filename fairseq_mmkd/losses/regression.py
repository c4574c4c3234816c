"""The distillation objective: regress data2vec2 targets built from the teacher's layers, at all timesteps.

Kept apart from fairseq so the loss can be tested and benchmarked on its own; the fairseq criterion is
a thin wrapper around :func:`distillation_loss`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..modules.targets import TargetConfig, at_least_fp32, make_targets


def regressed(layer_results, num_extra_tokens: int, include_extra_tokens: bool):
    """Drop the extra (CLS) tokens unless they are regressed too."""
    n = 0 if include_extra_tokens else num_extra_tokens
    return [y[:, n:] for y in layer_results]


def regressed_mask(padding_mask: Optional[torch.Tensor], num_extra_tokens: int, include_extra_tokens: bool):
    """The padding mask of the regressed positions (None when nothing is padded)."""
    if padding_mask is None:
        return None
    return padding_mask[:, 0 if include_extra_tokens else num_extra_tokens:]


def student_prediction(distiller, out: dict, target_cfg: TargetConfig, include_extra_tokens: bool) -> torch.Tensor:
    """``layer_average``: the student's layers through the target recipe (top-k capped at its depth);
    ``head``: a linear head on the last student block."""
    n = 0 if include_extra_tokens else distiller.num_extra_tokens
    if distiller.prediction == "head":
        return at_least_fp32(distiller.head(out["student_x"][:, n:]))
    layers = regressed(out["student_layer_results"], distiller.num_extra_tokens, include_extra_tokens)
    k = min(target_cfg.average_top_k_layers, len(layers))
    mask = regressed_mask(out.get("padding_mask"), distiller.num_extra_tokens, include_extra_tokens)
    return make_targets(layers, replace(target_cfg, average_top_k_layers=k), mask)


def feature_std(y: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """data2vec's collapse monitor: mean over channels of the std over all (sample, token) positions
    (valid ones only when a ``[B, T, 1]`` float ``valid`` mask is given)."""
    if valid is None:
        y = y.reshape(-1, y.shape[-1]).float()
        return torch.sqrt(y.var(dim=0) + 1e-6).mean()
    count = valid.sum((0, 1))
    mean = (y * valid).sum((0, 1)) / count
    var = ((y - mean).pow(2) * valid).sum((0, 1)) / (count - 1).clamp_min(1)
    return torch.sqrt(var + 1e-6).mean()


def distillation_loss(distiller, out: dict, target_cfg: TargetConfig, include_extra_tokens: bool = True,
                      per_sample: bool = False) -> dict:
    """Sum of squared errors over every regressed timestep and channel, with what to normalise it by.

    Padded positions (``out["padding_mask"]``, text and audio batches) take no part: not in the targets'
    normalisation, the loss, the count or the variances.

    Returns a dict with ``loss_sum`` (differentiable, fp32), ``sample_size`` (number of regressed
    elements: loss_sum / sample_size is the MSE; a 0-d tensor for padded batches, so no device sync here),
    ``target_var`` and ``pred_var`` (detached 0-d tensors). Targets are computed in fp32 without autograd. With
    ``per_sample``, also ``sample_mse`` ``[B]``: each sample's mean squared error over its own regressed elements
    (differentiable; what a loss averaged over samples, not elements, sums).
    """
    mask = regressed_mask(out.get("padding_mask"), distiller.num_extra_tokens, include_extra_tokens)
    with torch.no_grad():
        teacher = regressed(out["teacher_layer_results"], distiller.num_extra_tokens, include_extra_tokens)
        target = make_targets(teacher, target_cfg, mask)
    pred = student_prediction(distiller, out, target_cfg, include_extra_tokens)
    if per_sample:
        loss_sum = None  # below, from the per-sample squares
        valid = None if mask is None else (~mask).unsqueeze(-1).to(pred.dtype)
        sample_size = pred.numel() if mask is None else valid.sum() * pred.shape[-1]
    elif mask is None:
        loss_sum = (pred - target).pow(2).sum()
        sample_size, valid = pred.numel(), None
    else:
        valid = (~mask).unsqueeze(-1).to(pred.dtype)
        loss_sum = ((pred - target).pow(2) * valid).sum()
        sample_size = valid.sum() * pred.shape[-1]
    extra = {}
    if per_sample:  # from the same squares (one saved difference tensor for backward, not two)
        squares = (pred - target).pow(2) if valid is None else (pred - target).pow(2) * valid
        counts = (torch.full((pred.shape[0],), float(pred[0].numel()), device=pred.device) if valid is None
                  else valid.sum((1, 2)) * pred.shape[-1])
        per_item = squares.sum((1, 2))
        extra["sample_mse"] = per_item / counts.clamp_min(1)
        loss_sum = per_item.sum()
    with torch.no_grad():
        return {
            **extra,
            "loss_sum": loss_sum,
            "sample_size": sample_size,
            "target_var": feature_std(target, valid),
            "pred_var": feature_std(pred.detach(), valid),
        }
