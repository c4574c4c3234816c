"""fairseq model ``d2v_kd``: a frozen data2vec2 teacher and a trainable student sharing one encoder.

Thin fairseq glue around :class:`fairseq_mmkd.distill.Distiller`. What it adds:
- loads the teacher from ``teacher_checkpoint``; its architecture travels in the checkpoint's
  ``task_state`` (see ``D2vKDTask.state_dict``), so a trained checkpoint rebuilds without the teacher file;
- keeps the teacher blocks out of checkpoints (state-dict hook) and forgives exactly those keys on load;
- keeps the frozen parts in eval mode although fairseq calls ``model.train()`` every step.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model

from .checkpoint import CheckpointError, load_d2v
from .d2v_model import D2vConfig, D2vModel
from .distill import Distiller, gradient_free_parameters
from .targets import TargetConfig

TEACHER_PREFIX = "distiller.teacher_blocks."
GRADIENT_FREE_HELP = (
    "keep the student parameters that the loss gives no gradient by construction (distill.gradient_free_parameters: "
    "with layer_average, the last block's closing LayerNorm and its FFN output bias) in the optimizer, as runs "
    "started before they were frozen did; only for resuming such a run exactly (false: they keep their initial "
    "values, which Adam and weight decay would otherwise move with rounding noise)")


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


def arch_to_json(cfg: D2vConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def arch_from_json(text: str) -> D2vConfig:
    from .encoders import get_encoder_class

    d = json.loads(text)
    d["encoder"] = get_encoder_class(d["modality"]).Config(**d["encoder"])
    d["targets"] = TargetConfig(**d["targets"])
    return D2vConfig(**d)


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


def check_same_teacher(cfg: D2vConfig, shared_encoder, teacher: D2vModel, path: str) -> None:
    """``teacher`` (read from ``path``) has the architecture and the modality encoder the student was trained with."""
    if arch_to_json(teacher.cfg) != arch_to_json(cfg):
        raise CheckpointError(f"{path} is not the teacher this student was distilled from (another architecture)")
    mine = shared_encoder.state_dict()
    theirs = teacher.encoder.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine):
        raise CheckpointError(f"{path} is not the teacher this student was distilled from (its modality encoder "
                              "holds other weights)")


def with_teacher_blocks(state_dict, teacher_blocks):
    """A checkpoint's state dict completed with the loaded teacher blocks (checkpoints never hold them)."""
    if teacher_blocks is None:
        return state_dict
    state_dict = dict(state_dict)
    for k, v in teacher_blocks.state_dict(prefix=TEACHER_PREFIX).items():
        state_dict.setdefault(k, v)
    return state_dict


def drop_teacher_blocks(module, state_dict, prefix, local_metadata):
    """State-dict hook: the frozen teacher blocks stay out of checkpoints (the teacher file has them)."""
    for k in [k for k in state_dict if k.startswith(prefix + TEACHER_PREFIX)]:
        del state_dict[k]
    return state_dict


def load_teacher(cfg: D2vKDModelConfig) -> D2vModel:
    if not cfg.teacher_checkpoint:
        raise CheckpointError("model.teacher_checkpoint is not set; pass the data2vec2 teacher, e.g. "
                              "model.teacher_checkpoint=/path/to/base_imagenet.pt")
    modality = None if str(cfg.modality) in ("", "auto") else str(cfg.modality)
    return load_d2v(os.path.expanduser(cfg.teacher_checkpoint), modality=modality,
                    weights=str(cfg.teacher_weights), trust_checkpoint=cfg.trust_teacher_checkpoint)


def teacher_data_settings(task_cfg: dict) -> dict:
    """What of the teacher's pretraining ``cfg.task`` the data side needs later (audio: ``normalize``); it
    travels in the student's checkpoints, so evaluating them needs no teacher file."""
    return {k: task_cfg[k] for k in ("normalize",) if k in task_cfg}


STUDENT_MODELS = ("d2v_kd", "d2v_kd_multimodal")


def load_student(path, device="cpu", trust_checkpoint: bool = False):
    """A trained ``d2v_kd`` (or ``d2v_kd_multimodal``) checkpoint as an eval-mode model (no teacher file needed).

    Reads the file with the plugin's safe loader, then lets fairseq rebuild the task and model exactly as
    ``checkpoint_utils.load_model_ensemble_and_task`` would. A multimodal student is a ``D2vKDMultimodalModel``:
    ``modalities``, and ``modality_model(m)`` for what the single-modality code reads of one of them.
    """
    from fairseq import tasks
    from omegaconf import OmegaConf

    from .checkpoint import read_checkpoint

    state = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    cfg = state.get("cfg") if isinstance(state, dict) else None
    name = (cfg or {}).get("model", {}).get("_name") if isinstance(cfg, dict) else None
    if name not in STUDENT_MODELS:
        raise CheckpointError(f"{path}: is not a d2v_kd student checkpoint (nor d2v_kd_multimodal; model "
                              f"{name!r}); for a data2vec2 teacher checkpoint or an exported student use --teacher / "
                              "load_d2v")
    if name == "d2v_kd_multimodal":
        from . import kd_multimodal  # noqa: F401  (registers the task and model; imports this module)
    cfg = OmegaConf.create(cfg, flags={"allow_objects": True})
    task = tasks.setup_task(cfg.task, from_checkpoint=True)
    task.load_state_dict(state.get("task_state") or {})
    model = task.build_model(cfg.model, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    return model.eval().requires_grad_(False).to(device)
