"""One student, several teachers: a multimodal data2vec distilled from image, text and audio teachers at once.

The design data2vec2 itself has for several modalities: a modality encoder per modality in front of one stack
of transformer blocks. Here each teacher's modality encoder is frozen and shared (it feeds that teacher's
frozen blocks, which make the targets, and the one trainable student stack), and the student blocks are
modality-agnostic: what differs per modality (extra tokens, padding, ALiBi bias) comes from the encoder in
front of them, through the ``EncoderOutput`` every encoder returns.

``MultimodalDistiller`` holds the per-modality parts in ``ModuleDict`` s keyed by modality and one student;
``view(modality)`` is that modality's :class:`~fairseq_mmkd.distill.Distiller` sharing the student, so the
single-modality forward, loss and feature code serves every modality unchanged. Nothing here imports fairseq.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..d2v.model import D2vModel
from .distiller import (PREDICTIONS, Distiller, bias_layers, build_student, gradient_free_parameters,
                        teacher_block_indices)
from ..modules.targets import TargetConfig

MODALITY_ORDER = ("image", "text", "audio")


def student_inits(modalities) -> tuple:
    return ("random",) + tuple(f"{m}_{how}" for m in modalities for how in ("first", "spread"))


def check_compatible(teachers: Mapping[str, D2vModel], paths: Optional[Mapping[str, str]] = None) -> None:
    """One student stack serves every teacher: their widths, head counts and block layout must agree."""
    paths = paths or {}

    def listing(attr):
        return ", ".join(f"{m} teacher{' ' + str(paths[m]) if m in paths else ''}: {getattr(t.cfg, attr)}"
                         for m, t in teachers.items())

    for attr, what in (("embed_dim", "embed_dim"), ("num_heads", "num_heads"),
                       ("layer_norm_first", "layer_norm_first (pre-LN)")):
        if len({getattr(t.cfg, attr) for t in teachers.values()}) > 1:
            raise ValueError(f"the teachers' {what} differ ({listing(attr)}); one student stack needs them equal "
                             "(every released base model: 768 wide, 12 heads, post-LN)")


class MultimodalDistiller(nn.Module):
    """Frozen shared encoders and teacher blocks per modality, one trainable student stack.

    Args:
        teachers: modality -> frozen data2vec2 model (from ``load_d2v``), in the order the modalities train.
        student_depth: number of student blocks.
        student_init: ``random``, or ``<modality>_first`` / ``<modality>_spread`` to copy the blocks of that
            teacher (first N, or N spread over its depth).
        prediction: ``layer_average`` or ``head`` (one linear head per modality: the targets of different
            teachers live in different spaces).
        drop_path: stochastic depth of the student, rising linearly over its blocks.
        keep_teacher_blocks: False for inference without the teachers (trained checkpoints).

    The student's block settings (LayerNorm eps, MLP ratio, targets mode) are those of the teacher named in
    ``student_init``, else of the first teacher; with one teacher this is exactly ``Distiller``.
    """

    def __init__(self, teachers: Mapping[str, D2vModel], student_depth: int = 6, student_init: str = "random",
                 prediction: str = "layer_average", drop_path: float = 0.0, keep_teacher_blocks: bool = True):
        super().__init__()
        if not teachers:
            raise ValueError("at least one teacher is needed")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if student_init not in student_inits(teachers):
            raise ValueError(f"student_init must be one of {student_inits(teachers)}, got {student_init!r}")
        check_compatible(teachers)
        self.modalities = list(teachers)
        self.prediction = prediction
        # student_init <modality>_<how> copies that teacher's blocks as Distiller's teacher_<how> would
        source, how = student_init.rsplit("_", 1) if student_init != "random" else (self.modalities[0], None)
        single_init = f"teacher_{how}" if how else "random"
        self.student_source = source
        self.cfgs = {m: t.cfg for m, t in teachers.items()}
        self.shared_encoders = nn.ModuleDict({m: t.encoder.requires_grad_(False) for m, t in teachers.items()})
        self.teacher_blocks = (nn.ModuleDict({m: t.blocks.requires_grad_(False) for m, t in teachers.items()})
                               if keep_teacher_blocks else None)
        ref = self.cfgs[source]
        self.student_blocks, self.student_norm, heads = build_student(ref, student_depth, prediction, drop_path,
                                                                      heads=len(self.modalities))
        self.heads = nn.ModuleDict(dict(zip(self.modalities, heads))) if heads else None
        if keep_teacher_blocks and how:
            for s, t in enumerate(teacher_block_indices(single_init, student_depth, ref.depth)):
                self.student_blocks[s].load_state_dict(teachers[source].blocks[t].state_dict())
        # per modality, the teacher layer whose ALiBi scale a student block uses (per-layer scales only)
        self.bias_layers = {m: bias_layers(single_init if m == source else "random", student_depth, cfg.depth)
                            for m, cfg in self.cfgs.items()}
        self._views = {}
        self.frozen_modules().eval()

    def frozen_modules(self) -> nn.ModuleList:
        return nn.ModuleList([m for m in (self.shared_encoders, self.teacher_blocks) if m is not None])

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen_modules().eval()
        return self

    def view(self, modality: str) -> Distiller:
        """``modality``'s distiller: its encoder and teacher blocks with the shared student (no copies)."""
        if modality not in self.shared_encoders:
            raise ValueError(f"no {modality} teacher in this model (it has {', '.join(self.modalities)})")
        if modality not in self._views:
            self._views[modality] = Distiller.assemble(
                self.cfgs[modality], self.shared_encoders[modality],
                self.teacher_blocks[modality] if self.teacher_blocks is not None else None,
                self.student_blocks, self.student_norm, self.heads[modality] if self.heads is not None else None,
                self.prediction, self.bias_layers[modality])
        view = self._views[modality]
        view.training = self.training
        return view

    def gradient_free_parameters(self, target_cfgs: Mapping[str, TargetConfig]) -> list:
        """The student parameters no modality's loss gives a gradient (``distill.gradient_free_parameters`` of
        every modality in ``target_cfgs``, modality -> its target recipe, intersected)."""
        per_modality = [set(gradient_free_parameters(self.view(m), cfg)) for m, cfg in target_cfgs.items()]
        common = set.intersection(*per_modality) if per_modality else set()
        return [n for n, _ in self.named_parameters() if n in common]

    def loss(self, modality: str, source: torch.Tensor, target_cfg, include_extra_tokens: bool = True,
             padding_mask: Optional[torch.Tensor] = None) -> dict:
        return self.view(modality).loss(source, target_cfg, include_extra_tokens, padding_mask)
