"""fairseq model ``d2v_kd_image_text``: the frozen image and text teachers of ``d2v_kd_multimodal`` with one student
stack, plus what aligns the two modalities (``distill.alignment.Alignment``: pooling, optional projection heads,
CLIP's learned temperature); see ``tasks/d2v_kd_image_text.py`` for the run.
"""
from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import register_model

from ..d2v.model import D2vModel
from ..distill.alignment import Alignment
from ..modules.targets import TargetConfig
from ._common import GRADIENT_FREE_HELP
from .d2v_kd_multimodal import D2vKDMultimodalModel


@dataclass
class D2vKDImageTextModelConfig(FairseqDataclass):
    image_teacher: str = field(default="", metadata={"help": "data2vec 2.0 image teacher (base_imagenet.pt)"})
    text_teacher: str = field(default="", metadata={"help": "data2vec 2.0 text teacher (nlp_base.pt)"})
    teacher_weights: ChoiceEnum(["model", "ema"]) = field(default="model", metadata={
        "help": "both teachers' weights: 'model' (online) or 'ema' (the EMA teacher stored in _ema)"})
    trust_teacher_checkpoint: bool = field(default=False, metadata={
        "help": "allow arbitrary pickled objects in the teacher files (only for files you trust)"})
    student_depth: int = field(default=6, metadata={"help": "number of student transformer blocks"})
    student_init: str = field(default="image_first", metadata={
        "help": "random, or image_first / image_spread / text_first / text_spread: copy that teacher's first N blocks "
                "/ N blocks spread over its depth"})
    prediction: ChoiceEnum(["layer_average", "head"]) = field(default="layer_average", metadata={
        "help": "the regression terms' prediction: student layers normalised and averaged like the targets, or a "
                "linear head per modality on the last student block"})
    drop_path: float = field(default=0.0, metadata={"help": "student stochastic depth (linear up to this rate)"})
    projection_dim: int = field(default=-1, metadata={
        "help": "a linear projection head per modality (CLIP, ALBEF): -1 of the student's width (measured: "
                "docs/image_text.md), N of width N; 0: none, the pooled student features are the embedding"})
    image_pooling: ChoiceEnum(["cls", "mean"]) = field(default="cls", metadata={
        "help": "the image embedding: the CLS token, or the mean of the patch tokens"})
    text_pooling: ChoiceEnum(["mean", "cls"]) = field(default="mean", metadata={
        "help": "the caption embedding: the mean over its valid tokens, or its <s> token"})
    init_temperature: float = field(default=0.07, metadata={
        "help": "the contrastive temperature the learned logit scale starts from (CLIP: 0.07; clamped at 0.01)"})
    optimize_gradient_free: bool = field(default=False, metadata={"help": GRADIENT_FREE_HELP})
    compile: bool = field(default=False, metadata={"help": "torch.compile each modality's forward and loss "
                                                           "(not measured for image-text runs)"})


@register_model("d2v_kd_image_text", dataclass=D2vKDImageTextModelConfig)
class D2vKDImageTextModel(D2vKDMultimodalModel):
    """``D2vKDMultimodalModel`` over the image and text teachers, with ``alignment``. Checkpoints add the heads and
    the logit scale (``alignment.*``) to the multimodal model's keys."""

    def __init__(self, cfg: D2vKDImageTextModelConfig, teachers: Dict[str, D2vModel],
                 keep_teacher_blocks: bool = True):
        if set(teachers) != {"image", "text"}:
            raise ValueError(f"d2v_kd_image_text needs an image and a text teacher, got {sorted(teachers)}")
        super().__init__(cfg, teachers, keep_teacher_blocks)
        self.alignment = Alignment(self.distiller.cfgs["image"].embed_dim,
                                   projection_dim=cfg.projection_dim,
                                   pooling={"image": str(cfg.image_pooling), "text": str(cfg.text_pooling)},
                                   init_temperature=cfg.init_temperature)

    @classmethod
    def build_model(cls, cfg: D2vKDImageTextModelConfig, task=None):
        for m in ("image", "text"):
            if not getattr(task, "inference_teacher_archs", None) and not getattr(cfg, f"{m}_teacher"):
                raise ValueError(f"model.{m}_teacher is not set: d2v_kd_image_text distils an image and a text "
                                 f"teacher (base_imagenet.pt and nlp_base.pt)")
        return super().build_model(cfg, task)

    def freeze_gradient_free(self, target_cfgs: Dict[str, TargetConfig], contrastive: bool = True) -> list:
        """With the contrastive term the embedding reads the last block's output, so every student parameter learns;
        without it, the regression terms' rule of ``d2v_kd_multimodal``."""
        return [] if contrastive else super().freeze_gradient_free(target_cfgs)

    def embed(self, modality: str, source: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """L2-normalised embeddings ``[B, P]`` of images (normalised ``[B, 3, H, W]``) or captions (token ids
        ``[B, T]`` with their padding mask)."""
        view = self.distiller.view(modality)
        features, mask = view.features(source, padding_mask)
        return self.alignment.embed(modality, features, mask, view.num_extra_tokens)

    def forward(self, modalities: dict, targets=None, include_extra_tokens: bool = True, **unused) -> dict:
        """``modalities``: modality -> its ``net_input``. With ``targets`` (modality -> ``TargetConfig``): per
        modality, the regression loss dict (``per_sample``, ``sample_mse`` included) and ``embedding``, from one
        forward pass; without: each modality's embedding."""
        from ..losses.regression import distillation_loss

        out = {}
        for m, net_input in modalities.items():
            if targets is None:
                out[m] = {"embedding": self.embed(m, net_input["source"], net_input.get("padding_mask"))}
                continue
            view = self.distiller.view(m)
            layers = view(net_input["source"], net_input.get("padding_mask"))
            result = distillation_loss(view, layers, targets[m], include_extra_tokens, per_sample=True)
            result["embedding"] = self.alignment.embed(m, layers["student_x"], layers["padding_mask"],
                                                       view.num_extra_tokens)
            out[m] = result
        return out
