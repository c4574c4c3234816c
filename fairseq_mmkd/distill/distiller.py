"""Teacher-student module for data2vec 2.0 distillation, free of fairseq so it can be benchmarked alone.

The teacher's modality encoder becomes the *shared encoder*: frozen, always in eval mode, run once per
batch without autograd. Its output feeds both the frozen teacher blocks (targets) and the trainable
student blocks. Only the student blocks (and the optional regression head) have ``requires_grad``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..d2v.model import D2vConfig, D2vModel
from ..encoders import EncoderOutput
from ..modules.targets import TargetConfig

STUDENT_INITS = ("teacher_first", "teacher_spread", "random")
PREDICTIONS = ("layer_average", "head")


def teacher_block_indices(student_init: str, student_depth: int, teacher_depth: int) -> list[int]:
    """Which teacher blocks initialise the student (empty for ``random``)."""
    if student_init == "random":
        return []
    if student_depth > teacher_depth:
        raise ValueError(f"student_depth={student_depth} exceeds the teacher's {teacher_depth} shared blocks, so "
                         f"student_init={student_init} cannot copy them; lower student_depth or use student_init=random")
    if student_init == "teacher_first":
        return list(range(student_depth))
    if student_init == "teacher_spread":  # evenly spaced, last block included
        return spread_indices(student_depth, teacher_depth)
    raise ValueError(f"student_init must be one of {STUDENT_INITS}, got {student_init!r}")


def spread_indices(count: int, depth: int) -> list[int]:
    """``count`` block indices evenly spaced over ``depth`` blocks, first and last included."""
    return torch.linspace(0, depth - 1, count).round().long().tolist()


def bias_layers(student_init: str, student_depth: int, teacher_depth: int) -> list[int]:
    """The teacher layer whose ALiBi bias scale each student block uses when the encoder scales its bias per
    layer (``learned_alibi_scale_per_layer``): the block it was copied from, else spread over the teacher."""
    if student_init != "random" and student_depth <= teacher_depth:
        return teacher_block_indices(student_init, student_depth, teacher_depth)
    return spread_indices(student_depth, teacher_depth)


def build_student(cfg: D2vConfig, depth: int, prediction: str, drop_path: float = 0.0, heads: int = 1):
    """The trainable part of a distiller, randomly initialised: ``(blocks, final norm or None, [head, ...])``.

    ``depth`` blocks of the teacher's block type (stochastic depth rising linearly to ``drop_path``), the final
    LayerNorm of pre-LN models, and ``heads`` linear regression heads when ``prediction == "head"``.
    """
    if depth < 1:
        raise ValueError(f"student_depth must be >= 1, got {depth}")
    rates = torch.linspace(0, drop_path, depth).tolist()
    blocks = nn.ModuleList(cfg.make_block(r, preln_upstream_quirk=False) for r in rates)
    norm = (nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
            if cfg.layer_norm_first else None)
    head_list = [nn.Linear(cfg.embed_dim, cfg.embed_dim) for _ in range(heads)] if prediction == "head" else []
    init_random_(blocks)
    for head in head_list:
        init_random_(head)
    return blocks, norm, head_list


def init_random_(module: nn.Module) -> None:
    """ViT/MAE-style init: truncated-normal linear weights (std 0.02), zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def removes_channel_constants(cfg: TargetConfig) -> bool:
    """Whether the target recipe cancels a per-channel constant added to a layer's output: the per-layer batch or
    instance norm subtract each channel's mean over the tokens; without them, a per-layer or averaged LayerNorm
    (over channels, per token) would spread the constant, and an instance norm of the average would cancel it."""
    if cfg.batch_norm_target_layer or cfg.instance_norm_target_layer:
        return True
    if cfg.layer_norm_target_layer or cfg.layer_norm_targets:
        return False
    return bool(cfg.instance_norm_targets)


def gradient_free_parameters(distiller: "Distiller", target_cfg: TargetConfig) -> list[str]:
    """Names (as ``distiller.named_parameters()`` gives them) of the student parameters that the distillation loss
    gives no gradient by construction, whatever the batch.

    With ``prediction="layer_average"`` the loss reads the student's per-layer targets (FFN outputs, or block
    outputs with ``end_of_block_targets``), never the last block's residual output nor the final norm:
      - the final LayerNorm of a pre-LN student, and, with FFN targets, the last post-LN block's ``norm2``, take no
        part in the loss (autograd leaves their gradient ``None``);
      - when the recipe cancels per-channel constants (``removes_channel_constants``), the bias that adds one to
        the last block's target (``mlp.fc2.bias``; ``norm2.bias`` for post-LN end-of-block targets) gets an exact
        gradient of 0 (in floats: rounding residue, which Adam's normalisation would turn into full-size steps).
    A bias of an earlier block also reaches the later blocks through the residual stream, so it learns. With
    ``prediction="head"`` every student parameter learns. ``tests/training/test_gradient_free.py`` measures the
    gradients of a sweep of recipes and block types against this rule.
    """
    if distiller.prediction != "layer_average":
        return []
    last = len(distiller.student_blocks) - 1
    block = distiller.student_blocks[last]
    unused = [("student_norm", distiller.student_norm)] if distiller.student_norm is not None else []
    if block.ffn_targets and not block.layer_norm_first:
        unused.append((f"student_blocks.{last}.norm2", block.norm2))
    names = [f"{prefix}.{n}" for prefix, module in unused for n, _ in module.named_parameters()]
    if removes_channel_constants(target_cfg):
        post_ln_block_output = not block.ffn_targets and not block.layer_norm_first
        bias = f"student_blocks.{last}.{'norm2' if post_ln_block_output else 'mlp.fc2'}.bias"
        if bias not in names and bias in dict(distiller.named_parameters()):
            names.append(bias)
    return names


class Distiller(nn.Module):
    """Shared encoder + frozen teacher blocks + trainable student blocks.

    Args:
        teacher: the frozen data2vec2 model (from ``load_d2v`` or built from a stored architecture).
        student_depth: number of student blocks (>= 1).
        student_init: ``teacher_first`` | ``teacher_spread`` | ``random``.
        prediction: ``layer_average`` (student per-layer outputs normalised and averaged like the targets)
            or ``head`` (a linear regression head on the last student block).
        drop_path: stochastic-depth rate of the student, rising linearly to this value over its blocks.
        keep_teacher_blocks: False builds an inference-only model without the teacher blocks (the
            shared encoder and student are all a trained checkpoint needs).
    """

    def __init__(self, teacher: D2vModel, student_depth: int = 6, student_init: str = "teacher_first",
                 prediction: str = "layer_average", drop_path: float = 0.0, keep_teacher_blocks: bool = True):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        cfg: D2vConfig = teacher.cfg
        self.cfg = cfg
        self.prediction = prediction
        self.shared_encoder = teacher.encoder.requires_grad_(False)
        self.teacher_blocks = teacher.blocks.requires_grad_(False) if keep_teacher_blocks else None
        self.student_blocks, self.student_norm, heads = build_student(cfg, student_depth, prediction, drop_path)
        self.head = heads[0] if heads else None
        if keep_teacher_blocks:
            for s, t in enumerate(teacher_block_indices(student_init, student_depth, cfg.depth)):
                self.student_blocks[s].load_state_dict(teacher.blocks[t].state_dict())
        elif student_init not in STUDENT_INITS:
            raise ValueError(f"student_init must be one of {STUDENT_INITS}, got {student_init!r}")
        self.student_bias_layers = bias_layers(student_init, student_depth, cfg.depth)
        self.frozen_modules().eval()

    @classmethod
    def assemble(cls, cfg: D2vConfig, shared_encoder, teacher_blocks, student_blocks, student_norm, head,
                 prediction: str, student_bias_layers) -> "Distiller":
        """A distiller made of existing modules (no copies, no initialisation): how a multimodal student
        serves each modality with the single-modality code (``multimodal.MultimodalDistiller.view``)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.cfg, self.prediction, self.student_bias_layers = cfg, prediction, list(student_bias_layers)
        self.shared_encoder, self.teacher_blocks = shared_encoder, teacher_blocks
        self.student_blocks, self.student_norm, self.head = student_blocks, student_norm, head
        return self

    def frozen_modules(self) -> nn.ModuleList:
        return nn.ModuleList([m for m in (self.shared_encoder, self.teacher_blocks) if m is not None])

    def train(self, mode: bool = True):
        """fairseq calls ``model.train()`` every step: keep the frozen parts in eval (no dropout/drop path)."""
        super().train(mode)
        self.frozen_modules().eval()
        return self

    @property
    def num_extra_tokens(self) -> int:
        return self.shared_encoder.num_extra_tokens

    @property
    def input_size(self) -> int:
        return self.cfg.encoder.input_size

    def encode(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> EncoderOutput:
        """The shared encoder's output (sequence, padding mask, attention bias); never tracked by autograd."""
        with torch.no_grad():
            return self.shared_encoder(source, padding_mask)

    def run_teacher(self, enc: EncoderOutput) -> list[torch.Tensor]:
        """Teacher per-layer outputs (what targets are built from), without autograd."""
        if self.teacher_blocks is None:
            raise RuntimeError("this model was loaded for inference without the teacher blocks")
        layer_results, x, masks = [], enc.x, enc.masks(self.cfg.num_heads)
        with torch.no_grad():
            for i, blk in enumerate(self.teacher_blocks):
                x, target = blk(x, masks(i))
                layer_results.append(target)
        return layer_results

    def run_student(self, enc: EncoderOutput) -> dict:
        layer_results, x, masks = [], enc.x, enc.masks(self.cfg.num_heads)
        for blk, layer in zip(self.student_blocks, self.student_bias_layers):
            x, target = blk(x, masks(layer))
            layer_results.append(target)
        if self.student_norm is not None:
            x = self.student_norm(x)
        return {"layer_results": layer_results, "x": x}

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> dict:
        enc = self.encode(source, padding_mask)
        student = self.run_student(enc)
        return {
            "teacher_layer_results": self.run_teacher(enc),
            "student_layer_results": student["layer_results"],
            "student_x": student["x"],
            "padding_mask": enc.padding_mask,
        }

    def loss(self, source: torch.Tensor, target_cfg, include_extra_tokens: bool = True,
             padding_mask: Optional[torch.Tensor] = None) -> dict:
        """Forward and distillation loss in one function: the unit ``torch.compile`` fuses best (the
        target normalisations fuse with the last matmuls; see BENCHMARKS.md)."""
        from ..losses.regression import distillation_loss

        return distillation_loss(self, self(source, padding_mask), target_cfg, include_extra_tokens)

    def forward_features(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                         layer: int = -1) -> torch.Tensor:
        """Student features ``[B, T, D]`` (extra tokens first) after block ``layer`` (-1: the last, -k: the
        k-th from last), through the final norm of a pre-LN student: what retrieval embeds."""
        return self.features(source, padding_mask, layer)[0]

    def features(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, layer: int = -1,
                 teacher: bool = False) -> tuple:
        """``(features [B, T, D], padding_mask [B, T] or None)`` of the student (or, with ``teacher``, the teacher)
        after block ``layer``: ``forward_features`` / ``teacher_features`` together with the padding mask at
        sequence resolution (tokens, audio frames; True at padding) that padding-aware pooling needs."""
        enc = self.encode(source, padding_mask)
        if teacher:
            if self.teacher_blocks is None:
                raise RuntimeError("this model was loaded for inference without the teacher blocks")
            with torch.no_grad():
                x = block_features(self.teacher_blocks, enc, self.cfg.num_heads, layer)
        else:
            x = block_features(self.student_blocks, enc, self.cfg.num_heads, layer, self.student_norm,
                               self.student_bias_layers)
        return x, enc.padding_mask

    def teacher_features(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                         layer: int = -1) -> torch.Tensor:
        """Teacher features ``[B, T, D]`` after block ``layer`` (for the teacher's retrieval baseline)."""
        return self.features(source, padding_mask, layer, teacher=True)[0]


def block_index(layer: int, depth: int) -> int:
    """0-based index of block ``layer`` (-1: the last, -k: the k-th from last) in a stack of ``depth`` blocks."""
    if not -depth <= layer <= -1:
        raise ValueError(f"layer={layer}: use -1 for the last block or -k for the k-th from last, with k at most "
                         f"{depth} (the number of blocks)")
    return depth + layer


def block_features(blocks, enc: EncoderOutput, num_heads: int, layer: int = -1, norm=None,
                   mask_layers=None) -> torch.Tensor:
    """Run ``blocks`` on an encoder output up to and including block ``layer``, then ``norm`` (if any).

    Block i gets the attention mask of layer ``mask_layers[i]`` (default i) of ``enc`` (padding, ALiBi bias).
    """
    masks, x = enc.masks(num_heads), enc.x
    mask_layers = list(range(len(blocks))) if mask_layers is None else mask_layers
    for i in range(block_index(layer, len(blocks)) + 1):
        x, _ = blocks[i](x, masks(mask_layers[i]))
    return norm(x) if norm is not None else x
