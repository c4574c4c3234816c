"""fairseq model ``d2v_kd``: a frozen data2vec2 teacher and a trainable student sharing one encoder.

Thin fairseq glue around :class:`fairseq_mmkd.distill.Distiller`. What it adds:
- loads the teacher from ``teacher_checkpoint``; its architecture travels in the checkpoint's
  ``task_state`` (see ``D2vKDTask.state_dict``), so a trained checkpoint rebuilds without the teacher file;
- keeps the teacher blocks out of checkpoints (state-dict hook) and forgives exactly those keys on load;
- keeps the frozen parts in eval mode although fairseq calls ``model.train()`` every step.
"""

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model

from ..d2v.loading import CheckpointError, load_d2v
from ..d2v.model import D2vModel
from ..distill.distiller import Distiller, gradient_free_parameters
from ..modules.targets import TargetConfig
from ._common import (
    GRADIENT_FREE_HELP,
    arch_from_json,
    arch_to_json,
    check_same_teacher,
    drop_teacher_blocks,
    teacher_data_settings,
    with_teacher_blocks,
)


@dataclass
class D2vKDModelConfig(FairseqDataclass):
    teacher_checkpoint: str = field(
        default="", metadata={"help": "path of the data2vec2 teacher checkpoint (e.g. base_imagenet.pt)"})
    teacher_weights: ChoiceEnum(["model", "ema"]) = field(
        default="model", metadata={"help": "teacher weights: 'model' (online weights, what fairseq feature "
                                           "extraction uses) or 'ema' (the EMA teacher stored in _ema)"})
    trust_teacher_checkpoint: bool = field(
        default=False, metadata={"help": "allow arbitrary pickled objects in the teacher file (only for files "
                                         "you trust; the default safe load accepts fairseq's own checkpoints)"})
    modality: str = field(default="auto", metadata={
        "help": "modality of the teacher (image, text, audio; fairseq_mmkd.encoders); auto: the teacher checkpoint's "
                "own (a multimodal file needs one named)"})
    student_depth: int = field(default=6, metadata={"help": "number of student transformer blocks"})
    student_init: ChoiceEnum(["teacher_first", "teacher_spread", "random"]) = field(
        default="teacher_first", metadata={"help": "teacher_first: copy the teacher's first N blocks; "
                                                   "teacher_spread: N blocks evenly spaced over the teacher; "
                                                   "random: fresh initialisation"})
    prediction: ChoiceEnum(["layer_average", "head"]) = field(
        default="layer_average", metadata={"help": "layer_average: student layers normalised and averaged like "
                                                   "the targets; head: linear head on the last student block"})
    drop_path: float = field(default=0.0, metadata={"help": "student stochastic depth (linear up to this rate)"})
    optimize_gradient_free: bool = field(default=False, metadata={"help": GRADIENT_FREE_HELP})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the forward pass and loss as one graph: 1.7x the KD updates/s of eager mode on an "
                "H200 (BENCHMARKS.md), after ~35 s of compilation; off by default (no gain for short CPU runs)"})


@register_model("d2v_kd", dataclass=D2vKDModelConfig)
class D2vKDModel(BaseFairseqModel):
    def __init__(self, cfg: D2vKDModelConfig, teacher: D2vModel, keep_teacher_blocks: bool = True):
        super().__init__()
        self.cfg = cfg
        self.distiller = Distiller(teacher, student_depth=cfg.student_depth, student_init=str(cfg.student_init),
                                   prediction=str(cfg.prediction), drop_path=cfg.drop_path,
                                   keep_teacher_blocks=keep_teacher_blocks)
        self._register_state_dict_hook(drop_teacher_blocks)
        self._loss = torch.compile(self.distiller.loss) if cfg.compile else self.distiller.loss

    @classmethod
    def build_model(cls, cfg: D2vKDModelConfig, task=None):
        """Load the teacher; or, when fairseq rebuilds a trained checkpoint for inference, only the
        architecture the task restored from the checkpoint (the weights come from the checkpoint)."""
        arch = getattr(task, "inference_teacher_arch", None)
        if arch:
            model = cls(cfg, D2vModel(arch_from_json(arch)), keep_teacher_blocks=False)
            model.teacher_task_cfg = dict(getattr(task, "teacher_task_cfg", None) or {})
            return model
        teacher = load_teacher(cfg)
        model = cls(cfg, teacher)
        model.teacher_task_cfg = teacher_data_settings(getattr(teacher, "fairseq_task_cfg", {}))
        return model

    @property
    def modality(self) -> str:
        return self.distiller.cfg.modality

    @property
    def teacher_arch(self) -> str:
        """The teacher's architecture as JSON (what a checkpoint needs to rebuild this model)."""
        return arch_to_json(self.distiller.cfg)

    @property
    def num_extra_tokens(self) -> int:
        return self.distiller.num_extra_tokens

    @property
    def input_size(self):
        """The image size (images only; None for text and audio)."""
        return getattr(self.distiller.cfg.encoder, "input_size", None)

    @property
    def target_config(self) -> TargetConfig:
        return self.distiller.cfg.targets

    def attach_teacher(self, teacher: D2vModel, path: str) -> None:
        """Give a model rebuilt from a checkpoint (no teacher blocks) its teacher's blocks back, for the validation
        loss; refused when ``teacher`` is not the model this student was distilled from."""
        check_same_teacher(self.distiller.cfg, self.distiller.shared_encoder, teacher, path)
        self.distiller.teacher_blocks = teacher.blocks.requires_grad_(False).eval()
        self.distiller.teacher_blocks.to(next(self.distiller.student_blocks.parameters()).device)

    def freeze_gradient_free(self, target_cfg: TargetConfig) -> list:
        """Take the student parameters the loss gives no gradient with ``target_cfg`` out of training; their names."""
        names = gradient_free_parameters(self.distiller, target_cfg)
        for name in names:
            self.distiller.get_parameter(name).requires_grad_(False)
        return [f"distiller.{n}" for n in names]

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                targets: Optional[TargetConfig] = None, include_extra_tokens: bool = True, **unused) -> dict:
        """Without ``targets``: teacher and student layer outputs. With ``targets`` (what the criterion
        passes): the distillation loss dict of ``kd_loss.distillation_loss``, computed in the same call so
        that fairseq's DDP wrapper sees the forward and ``model.compile`` can fuse it with the model.
        ``padding_mask`` (text tokens, audio samples; True at padding) is passed on to the shared encoder."""
        if targets is None:
            return self.distiller(source, padding_mask)
        return self._loss(source, targets, include_extra_tokens, padding_mask)

    def forward_features(self, source: torch.Tensor, layer: int = -1,
                         padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.distiller.forward_features(source, padding_mask, layer=layer)

    def teacher_features(self, source: torch.Tensor, layer: int = -1,
                         padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.distiller.teacher_features(source, padding_mask, layer=layer)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Checkpoints carry no teacher blocks: take them from the loaded teacher, check the rest strictly."""
        return super().load_state_dict(with_teacher_blocks(state_dict, self.distiller.teacher_blocks), strict=strict,
                                       model_cfg=model_cfg, args=args)


def load_teacher(cfg: D2vKDModelConfig) -> D2vModel:
    if not cfg.teacher_checkpoint:
        raise CheckpointError("model.teacher_checkpoint is not set; pass the data2vec2 teacher, e.g. "
                              "model.teacher_checkpoint=/path/to/base_imagenet.pt")
    modality = None if str(cfg.modality) in ("", "auto") else str(cfg.modality)
    return load_d2v(os.path.expanduser(cfg.teacher_checkpoint), modality=modality,
                    weights=str(cfg.teacher_weights), trust_checkpoint=cfg.trust_teacher_checkpoint)
