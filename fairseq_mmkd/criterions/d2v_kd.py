"""fairseq criterion ``d2v_kd``: MSE between the student's prediction and data2vec2 teacher targets.

Target settings default to the teacher checkpoint's own (``None`` here means "as the teacher was
trained"); each can be overridden. The loss is returned as a sum with the number of regressed elements as
``sample_size``, so fairseq's gradient normalisation yields the mean over all timesteps and channels of
the whole (possibly multi-GPU, multi-step) batch.
"""

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from ..modules.targets import TargetConfig

_TEACHER_DEFAULT = "default: the teacher checkpoint's own setting"


@dataclass
class D2vKDCriterionConfig(FairseqDataclass):
    include_extra_tokens: bool = field(
        default=True, metadata={"help": "regress the extra (CLS) tokens too; target normalisation and the MSE "
                                        "then cover all timesteps"})
    average_top_k_layers: Optional[int] = field(
        default=None, metadata={"help": f"average the teacher's top k layers ({_TEACHER_DEFAULT})"})
    instance_norm_target_layer: Optional[bool] = field(
        default=None, metadata={"help": f"instance-norm each layer over tokens ({_TEACHER_DEFAULT})"})
    layer_norm_target_layer: Optional[bool] = field(
        default=None, metadata={"help": f"layer-norm each layer over channels ({_TEACHER_DEFAULT})"})
    batch_norm_target_layer: Optional[bool] = field(
        default=None, metadata={"help": f"batch-norm each layer ({_TEACHER_DEFAULT})"})
    layer_norm_targets: Optional[bool] = field(
        default=None, metadata={"help": f"layer-norm the averaged target ({_TEACHER_DEFAULT})"})
    instance_norm_targets: Optional[bool] = field(
        default=None, metadata={"help": f"instance-norm the averaged target ({_TEACHER_DEFAULT})"})
    max_consecutive_nonfinite: int = field(
        default=10, metadata={"help": "an update whose loss or gradients are NaN/inf is skipped (logged as "
                                      "nonfinite_skipped); after this many in a row the run stops"})
    min_pred_var: float = field(
        default=0.01, metadata={"help": "warn when the student's prediction variance (pred_var) falls below this: "
                                        "representation collapse (data2vec's threshold; 0: never)"})


def resolve_target_config(cfg, teacher_targets: TargetConfig) -> TargetConfig:
    """The teacher's target settings with every non-None criterion override applied."""
    overrides = {f.name: getattr(cfg, f.name) for f in fields(TargetConfig) if getattr(cfg, f.name, None) is not None}
    return replace(teacher_targets, **overrides)


@register_criterion("d2v_kd", dataclass=D2vKDCriterionConfig)
class D2vKDCriterion(FairseqCriterion):
    def __init__(self, cfg: D2vKDCriterionConfig, task):
        super().__init__(task)
        self.cfg = cfg

    def target_configs(self, model) -> TargetConfig:
        """The target recipe this criterion trains ``model`` with (what ``model.freeze_gradient_free`` takes)."""
        return resolve_target_config(self.cfg, model.target_config)

    def forward(self, model, sample, reduce=True):
        # under distributed training ``model`` is fairseq's wrapper, which forwards attribute access to the
        # plugin's model (``model.module`` would be the inner DDP object, not the plugin's model)
        target_cfg = resolve_target_config(self.cfg, model.target_config)
        result = model(**sample["net_input"], targets=target_cfg, include_extra_tokens=self.cfg.include_extra_tokens)
        nsamples = sample["nsamples"]
        sample_size = result["sample_size"]
        if torch.is_tensor(sample_size):  # padded batches count their valid positions on the device
            sample_size = int(sample_size)
        logging_output = {
            "loss": result["loss_sum"].detach(),
            "sample_size": sample_size,
            "nsentences": nsamples,
            # fairseq's wps/wpb: images (every image counts as one), real text tokens, or audio samples
            "ntokens": sample.get("ntokens", nsamples),
            "target_var": result["target_var"] * nsamples,
            "pred_var": result["pred_var"] * nsamples,
        }
        if "num_replaced" in sample:
            logging_output["bad_images"] = sample["num_replaced"]
        logging_output.update(sample.get("bad_files", {}))
        return result["loss_sum"], sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = lambda key: sum(float(log.get(key, 0)) for log in logging_outputs)  # noqa: E731
        sample_size = total("sample_size")
        nsamples = total("nsentences")
        # a step whose batches were all skipped as non-finite logs NaN with weight 0: the interval's average
        # is unchanged, and fairseq does not log its -1 placeholder for a missing loss
        metrics.log_scalar("loss", total("loss") / sample_size if sample_size else math.nan, sample_size, round=4)
        if nsamples:
            metrics.log_scalar("target_var", total("target_var") / nsamples, nsamples, round=3)
            metrics.log_scalar("pred_var", total("pred_var") / nsamples, nsamples, round=3)
        for name in sorted({k for log in logging_outputs for k in log if k.startswith("bad_")}):
            bad = total(name)
            if bad:
                metrics.log_scalar_sum(name, bad, round=0)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
