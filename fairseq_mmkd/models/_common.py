"""What both fairseq models share: the teacher architecture as JSON in checkpoints, the teacher blocks kept out of
checkpoints and restored on load, and the check that a teacher file is the one a student was distilled from.
"""

import dataclasses
import json

import torch

from ..d2v.loading import CheckpointError
from ..d2v.model import D2vConfig, D2vModel
from ..modules.targets import TargetConfig

TEACHER_PREFIX = "distiller.teacher_blocks."


GRADIENT_FREE_HELP = (
    "keep the student parameters that the loss gives no gradient by construction "
    "(distill.distiller.gradient_free_parameters: with layer_average, the last block's closing LayerNorm and its "
    "FFN output bias) in the optimizer, as runs started before they were frozen did; only for resuming such a run exactly (false: they keep their initial "
    "values, which Adam and weight decay would otherwise move with rounding noise)")


def arch_to_json(cfg: D2vConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def arch_from_json(text: str) -> D2vConfig:
    from ..encoders import get_encoder_class

    d = json.loads(text)
    d["encoder"] = get_encoder_class(d["modality"]).Config(**d["encoder"])
    d["targets"] = TargetConfig(**d["targets"])
    return D2vConfig(**d)


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


def teacher_data_settings(task_cfg: dict) -> dict:
    """What of the teacher's pretraining ``cfg.task`` the data side needs later (audio: ``normalize``); it
    travels in the student's checkpoints, so evaluating them needs no teacher file."""
    return {k: task_cfg[k] for k in ("normalize",) if k in task_cfg}
