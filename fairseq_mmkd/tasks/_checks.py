"""Checks and small decisions of the d2v_kd tasks, made before or at the start of training: the teacher fits its
data, the learning-rate schedule can finish, data workers fit the cores, the parameters the loss gives no gradient
leave the optimizer, and the precision line of the first update.
"""

import logging
import os

import torch
from fairseq.logging import metrics

from ..d2v.loading import CheckpointError

logger = logging.getLogger(__name__)


def freeze_gradient_free(model, criterion) -> None:
    """fairseq builds the model, then the criterion, then the optimizer from the parameters that require a gradient
    (fairseq_cli/train.py): here, between the last two, the criterion's target recipe is known, and the student
    parameters it gives no gradient leave training (``model.optimize_gradient_free`` keeps them)."""
    if model.cfg.optimize_gradient_free:
        logger.info("model.optimize_gradient_free=true: the student parameters the loss gives no gradient stay in "
                    "the optimizer")
        return
    names = model.freeze_gradient_free(criterion.target_configs(model))
    if names:
        logger.info(f"{len(names)} student parameter tensors receive no gradient from the loss by construction and "
                    f"keep their initial values (docs/architecture.md): {', '.join(names)}")


def check_teacher(model, path) -> None:
    """Refuse teachers that would train silently wrong: non-finite weights, or an input size that is not a
    whole number of patches (the patch embedding would drop the remainder of every image)."""
    enc = model.distiller.cfg.encoder
    patch = getattr(enc, "patch_size", None)
    if patch and enc.input_size % patch:
        raise CheckpointError(f"{path}: input_size {enc.input_size} is not a multiple of patch_size {patch} in its "
                              f"cfg.model, so the last {enc.input_size % patch} pixel rows and columns of every image "
                              "would be dropped; this is not a valid data2vec 2.0 image checkpoint")
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensors contain NaN/inf (e.g. {bad[0]}); the teacher "
                              "checkpoint is corrupt, fetch it again")


def precision_line(model) -> str:
    """What each part of the model computes in (fairseq casts the whole model for ``common.bf16``/``fp16``, the
    frozen teacher blocks included, so that they take half the memory), logged at the first update."""
    parts = {}
    for name, p in model.named_parameters():
        part = ("frozen teacher blocks" if ".teacher_blocks." in name else
                "frozen encoders" if ".shared_encoder" in name else "student")
        n, dtypes = parts.get(part, (0, set()))
        parts[part] = (n + p.numel(), dtypes | {str(p.dtype).replace("torch.", "")})
    return "precision: " + ", ".join(f"{part} {'/'.join(sorted(d))} ({n / 1e6:.2f}M)" for part, (n, d) in parts.items())


def check_schedule(root) -> None:
    """Learning-rate schedules fairseq accepts but that fail at the end of the run (the full config ``root``)."""
    sched, opt = root.get("lr_scheduler") or {}, root.optimization
    if sched.get("_name") != "cosine" or (sched.get("lr_period_updates") or 0) > 0:
        return
    warmup = sched.get("warmup_updates") or 0
    updates = sched.get("max_update", opt.get("max_update")) or 0  # the schedule's length: optimization's by default
    if updates and warmup == updates:
        key = "optimization" if updates == opt.get("max_update") else "lr_scheduler"
        raise ValueError(f"lr_scheduler.warmup_updates={warmup} equals {key}.max_update={updates}: fairseq's "
                         "cosine schedule then decays over zero updates and fails at the last update, before its "
                         "checkpoint is saved; use fewer warmup updates (the seed recipe: 3000 of 30000) or more "
                         "updates")


def fit_workers(requested: int) -> int:
    """DataLoader workers capped at the CPU cores this training process may use, one kept for itself.

    ``dataset.num_workers`` is per training process; asking for more workers than cores (e.g. the seed's
    12 on a small node, or 8 GPUs sharing 32 cores) only adds contention, so it is lowered, with a warning.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    cap = per_process - 1
    if requested > cap:
        logger.warning("dataset.num_workers=%d but this process has %d CPU cores: using %d data workers",
                       requested, per_process, cap)
        return cap
    return requested


def completed_updates() -> int:
    """The trainer's update counter (it logs ``num_updates`` to fairseq's always-active default meters)."""
    meter = metrics.get_meter("default", "num_updates")
    return int(meter.val) if meter is not None and meter.val is not None else 0
