"""fairseq model ``d2v_kd_multimodal``: frozen image, text and audio teachers and one student stack
(``distill.multimodal.MultimodalDistiller``); see ``tasks/d2v_kd_multimodal.py`` for the run.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model

from ..d2v.loading import CheckpointError, load_d2v
from ..d2v.model import D2vModel
from ..distill.multimodal import MODALITY_ORDER, MultimodalDistiller, check_compatible, student_inits
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
class D2vKDMultimodalModelConfig(FairseqDataclass):
    image_teacher: str = field(default="", metadata={"help": "data2vec 2.0 image teacher (base_imagenet.pt); "
                                                             "empty: no image modality"})
    text_teacher: str = field(default="", metadata={"help": "data2vec 2.0 text teacher (nlp_base.pt); empty: no "
                                                            "text modality"})
    audio_teacher: str = field(default="", metadata={"help": "data2vec 2.0 audio teacher (base_libri.pt); empty: "
                                                             "no audio modality"})
    teacher_weights: ChoiceEnum(["model", "ema"]) = field(default="model", metadata={
        "help": "every teacher's weights: 'model' (online) or 'ema' (the EMA teacher stored in _ema)"})
    trust_teacher_checkpoint: bool = field(default=False, metadata={
        "help": "allow arbitrary pickled objects in the teacher files (only for files you trust)"})
    student_depth: int = field(default=6, metadata={"help": "number of student transformer blocks"})
    student_init: str = field(default="random", metadata={
        "help": "random, or <modality>_first / <modality>_spread: copy that teacher's first N blocks / N blocks "
                "spread over its depth (e.g. image_first)"})
    prediction: ChoiceEnum(["layer_average", "head"]) = field(default="layer_average", metadata={
        "help": "layer_average: student layers normalised and averaged like the targets; head: a linear head per "
                "modality on the last student block"})
    drop_path: float = field(default=0.0, metadata={"help": "student stochastic depth (linear up to this rate)"})
    optimize_gradient_free: bool = field(default=False, metadata={"help": GRADIENT_FREE_HELP})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each modality's forward pass and loss (not yet measured for multimodal runs)"})


@register_model("d2v_kd_multimodal", dataclass=D2vKDMultimodalModelConfig)
class D2vKDMultimodalModel(BaseFairseqModel):
    def __init__(self, cfg: D2vKDMultimodalModelConfig, teachers: Dict[str, D2vModel],
                 keep_teacher_blocks: bool = True):
        super().__init__()
        self.cfg = cfg
        self.distiller = MultimodalDistiller(teachers, student_depth=cfg.student_depth,
                                             student_init=str(cfg.student_init), prediction=str(cfg.prediction),
                                             drop_path=cfg.drop_path, keep_teacher_blocks=keep_teacher_blocks)
        self.teacher_task_cfgs: Dict[str, dict] = {}
        self._register_state_dict_hook(drop_teacher_blocks)
        self._losses = self._build_losses()

    def _build_losses(self) -> dict:
        return {m: (torch.compile(self.distiller.view(m).loss) if self.cfg.compile else self.distiller.view(m).loss)
                for m in self.distiller.modalities}

    def attach_teachers(self, teachers: Dict[str, D2vModel], paths: Dict[str, str]) -> None:
        """Give a model rebuilt from a checkpoint (no teacher blocks) every teacher's blocks back, for the validation
        loss; refused when a teacher is not the model its modality was distilled from."""
        d = self.distiller
        for m in d.modalities:
            check_same_teacher(d.cfgs[m], d.shared_encoders[m], teachers[m], paths[m])
        device = next(d.student_blocks.parameters()).device
        d.teacher_blocks = nn.ModuleDict({m: teachers[m].blocks.requires_grad_(False).eval() for m in d.modalities})
        d.teacher_blocks.to(device)
        d._views = {}  # the views hold the teacher blocks they were made with
        self._losses = self._build_losses()

    @classmethod
    def build_model(cls, cfg: D2vKDMultimodalModelConfig, task=None):
        archs = getattr(task, "inference_teacher_archs", None)
        if archs:
            model = cls(cfg, {m: D2vModel(arch_from_json(a)) for m, a in archs.items()}, keep_teacher_blocks=False)
            model.teacher_task_cfgs = dict(getattr(task, "teacher_task_cfgs", None) or {})
            return model
        paths = {m: os.path.expanduser(getattr(cfg, f"{m}_teacher", "")) for m in MODALITY_ORDER
                 if getattr(cfg, f"{m}_teacher", "")}  # a subclass's config may name fewer modalities
        if not paths:
            raise CheckpointError("no teacher is set: pass at least one of model.image_teacher, model.text_teacher and "
                                  "model.audio_teacher (an empty one switches its modality off)")
        if str(cfg.student_init) not in student_inits(paths):
            raise ValueError(f"model.student_init={cfg.student_init} must be one of {student_inits(paths)} (a modality "
                             "whose teacher is set)")
        teachers = {m: load_d2v(p, weights=str(cfg.teacher_weights), trust_checkpoint=cfg.trust_teacher_checkpoint,
                                modality=m) for m, p in paths.items()}
        check_compatible(teachers, paths)
        model = cls(cfg, teachers)
        model.teacher_task_cfgs = {m: teacher_data_settings(getattr(t, "fairseq_task_cfg", {}))
                                   for m, t in teachers.items()}
        return model

    @property
    def modalities(self) -> list:
        return list(self.distiller.modalities)

    @property
    def teacher_archs(self) -> Dict[str, str]:
        return {m: arch_to_json(cfg) for m, cfg in self.distiller.cfgs.items()}

    def modality_model(self, modality: str):
        """What the single-modality data and retrieval code reads of a model, for ``modality``."""
        return _ModalityModel(self, modality)

    def target_config(self, modality: str):
        return self.distiller.cfgs[modality].targets

    def freeze_gradient_free(self, target_cfgs: Dict[str, TargetConfig]) -> list:
        """Take the student parameters that no modality's loss gives a gradient out of training; their names."""
        names = self.distiller.gradient_free_parameters(target_cfgs)
        for name in names:
            self.distiller.get_parameter(name).requires_grad_(False)
        return [f"distiller.{n}" for n in names]

    def forward(self, modalities: dict, targets: Optional[dict] = None, include_extra_tokens: bool = True,
                **unused) -> dict:
        """``modalities``: modality -> its ``net_input`` (``source``, optional ``padding_mask``). With ``targets``
        (modality -> ``TargetConfig``): each modality's loss dict; without: each modality's layer outputs."""
        out = {}
        for m, net_input in modalities.items():
            if targets is None:
                out[m] = self.distiller.view(m)(net_input["source"], net_input.get("padding_mask"))
            else:
                out[m] = self._losses[m](net_input["source"], targets[m], include_extra_tokens,
                                         net_input.get("padding_mask"))
        return out

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Checkpoints carry no teacher blocks: take them from the loaded teachers, check the rest strictly."""
        return super().load_state_dict(with_teacher_blocks(state_dict, self.distiller.teacher_blocks), strict=strict,
                                       model_cfg=model_cfg, args=args)


class _ModalityModel:
    """A multimodal model seen as one modality's single-modality model (``input_size``, ``modality``,
    ``distiller``, ``teacher_task_cfg``, ``num_extra_tokens``)."""

    def __init__(self, model: D2vKDMultimodalModel, modality: str):
        self.modality = modality
        self.distiller = model.distiller.view(modality)
        self.teacher_task_cfg = model.teacher_task_cfgs.get(modality, {})
        self.input_size = getattr(self.distiller.cfg.encoder, "input_size", None)
        self.num_extra_tokens = self.distiller.num_extra_tokens
        self._model = model

    def parameters(self):
        return self._model.parameters()

    def forward_features(self, source, layer: int = -1):
        return self.distiller.forward_features(source, layer=layer)

    def teacher_features(self, source, layer: int = -1):
        return self.distiller.teacher_features(source, layer=layer)

    def named_parameters(self):
        return self.distiller.named_parameters()
