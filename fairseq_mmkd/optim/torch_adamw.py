"""fairseq optimizer ``torch_adamw``: PyTorch's AdamW with its fused kernels, for fairseq's trainer.

Why: without NVIDIA apex (the usual install of fairseq-fixed), fairseq's ``adam`` runs its own Python loop
over the parameters, about ten tensor operations each, and its gradient clipping computes one norm per
parameter. With ``common.bf16`` fairseq keeps fp32 master weights per parameter (it does not flatten them
in bf16), so for the seed student (6 ViT-B blocks, 74 tensors) that is about a thousand small kernel
launches per update on the training thread. ``torch.optim.AdamW(fused=True)`` does the whole update in a
few multi-tensor kernels, and the clipping here uses PyTorch's multi-tensor norm. ``scripts/bench_trainer.py``
measures both against fairseq's path on CPU; the GPU gain is measured by ``scripts/bench_gpu_e2e.sh``.

Same update as fairseq's ``adam``, to float precision (tested): decoupled weight decay on every parameter
(fairseq's ``adam`` is AdamW, as its docstring says), the same betas, epsilon and weight decay fields, and
fairseq's epsilon placement. PyTorch adds epsilon to the bias-corrected root second moment, fairseq (and
apex's FusedAdam, which the published data2vec runs used) to the raw one, so the epsilon handed to PyTorch
at update ``t`` is ``eps / sqrt(1 - beta2^t)``; ``t`` is counted here, in the parameter groups (so it is
saved in checkpoints), because reading PyTorch's own step counter from the GPU would cost a sync per update.
Clipping: fairseq's formula (``grads * min(1, max_norm / (norm + 1e-6))``) with a multi-tensor norm.
"""

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf


@dataclass
class TorchAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for Adam (as fairseq's adam)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for Adam (as fairseq's adam)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (as fairseq's adam)"})
    implementation: ChoiceEnum(["auto", "fused", "foreach"]) = field(default="auto", metadata={
        "help": "fused: one fused kernel set (CUDA, and CPU for fp32); foreach: multi-tensor ops; auto: fused "
                "where PyTorch supports it for these parameters, else foreach"})
    lr: List[float] = II("optimization.lr")


def _betas(value) -> tuple:
    if isinstance(value, str):
        value = [float(v) for v in value.strip("()[] ").split(",")]
    elif not isinstance(value, (tuple, list)):
        value = OmegaConf.to_container(value)
    return tuple(float(v) for v in value)


def fused_supported(params) -> bool:
    """Whether ``AdamW(fused=True)`` accepts these parameters (floating point, on one supported device)."""
    devices = {p.device.type for p in params}
    return (len(devices) == 1 and devices <= {"cuda", "cpu", "xpu", "mps"}
            and all(p.is_floating_point() for p in params))


@register_optimizer("torch_adamw", dataclass=TorchAdamWConfig)
class TorchAdamW(FairseqOptimizer):
    """``torch.optim.AdamW`` (fused) behind fairseq's optimizer interface (LR schedule, checkpoints, fp16/bf16
    wrappers, gradient clipping)."""

    def __init__(self, cfg: TorchAdamWConfig, params):
        super().__init__(cfg)
        params = list(params)
        flat = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
        kind = str(cfg.implementation)
        fused = kind == "fused" or (kind == "auto" and fused_supported(flat))
        self.implementation = "fused" if fused else "foreach"
        self._optimizer = torch.optim.AdamW(params, **self.optimizer_config, fused=fused or None,
                                            foreach=None if fused else True)

    @property
    def optimizer_config(self) -> dict:
        """What fairseq may override from a checkpoint's stored optimizer arguments (e.g. a new LR)."""
        return {
            "lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
            "betas": _betas(self.cfg.adam_betas),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
        }

    @property
    def supports_flat_params(self) -> bool:
        return True

    def step(self, closure=None, scale=1.0, groups=None):
        """One AdamW update with fairseq's epsilon placement (see the module docstring)."""
        for group in self.param_groups:
            t = int(group.get("fairseq_step", 0)) + 1
            group["fairseq_step"] = t
            group["eps"] = self.cfg.adam_eps / math.sqrt(1.0 - group["betas"][1] ** t)
        super().step(closure, scale=scale, groups=groups)

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        """A checkpoint's optimizer state, refused in one line when it was written for other parameters (PyTorch's
        own message would not say why)."""
        saved = [len(g["params"]) for g in state_dict.get("param_groups", [])]
        current = [len(g["params"]) for g in self.param_groups]
        if saved != current:
            raise ValueError(
                f"the checkpoint's optimizer state is for {sum(saved)} parameter tensors, this run trains "
                f"{sum(current)}: the model's trained parameters changed. A run started before the student parameters "
                "that the loss gives no gradient were frozen resumes exactly with model.optimize_gradient_free=true")
        super().load_state_dict(state_dict, optimizer_overrides)

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        """fairseq's clipping formula with PyTorch's multi-tensor norm instead of one norm per parameter."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).float()
        if aggregate_norm_fn is not None:
            total = aggregate_norm_fn(total)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, float(max_norm), total, foreach=True)
        return total
