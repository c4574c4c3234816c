"""fairseq criterion ``d2v_kd_multimodal``: the sum over modalities of each modality's squared error, one optimizer
step for all.
"""

import torch
from fairseq.criterions import register_criterion
from fairseq.logging import metrics

from ..distill.multimodal import MODALITY_ORDER
from .d2v_kd import D2vKDCriterion, D2vKDCriterionConfig, resolve_target_config


@register_criterion("d2v_kd_multimodal", dataclass=D2vKDCriterionConfig)
class D2vKDMultimodalCriterion(D2vKDCriterion):
    """The sum over modalities of each modality's squared error (weighted by ``task.modality_weights``), with the
    number of regressed elements of all modalities as ``sample_size``: one optimizer step for all."""

    def target_configs(self, model) -> dict:
        """Each trained modality's target recipe (a modality of weight 0 trains nothing)."""
        weights = self.task.modality_weights
        return {m: resolve_target_config(self.cfg, model.target_config(m)) for m in model.modalities if weights[m] > 0}

    def forward(self, model, sample, reduce=True):
        batches = sample["modalities"]
        targets = {m: resolve_target_config(self.cfg, model.target_config(m)) for m in batches}
        results = model({m: b["net_input"] for m, b in batches.items()}, targets=targets,
                        include_extra_tokens=self.cfg.include_extra_tokens)
        weights = self.task.modality_weights
        total, sample_size, nsamples, ntokens = 0.0, 0, 0, 0
        logging_output = {}
        for m, r in results.items():
            n = batches[m]["nsamples"]
            size = int(r["sample_size"]) if torch.is_tensor(r["sample_size"]) else r["sample_size"]
            total = total + weights[m] * r["loss_sum"]
            sample_size += size
            nsamples += n
            ntokens += batches[m].get("ntokens", n)
            logging_output.update({f"loss_{m}": r["loss_sum"].detach(), f"sample_size_{m}": size, f"nsamples_{m}": n,
                                   f"target_var_{m}": r["target_var"] * n, f"pred_var_{m}": r["pred_var"] * n})
            if "num_replaced" in batches[m]:
                logging_output["bad_images"] = logging_output.get("bad_images", 0) + batches[m]["num_replaced"]
            for k, v in batches[m].get("bad_files", {}).items():
                logging_output[k] = logging_output.get(k, 0) + v
        logging_output.update({
            "loss": total.detach(), "sample_size": sample_size, "nsentences": nsamples, "ntokens": ntokens,
            "target_var": sum(logging_output[f"target_var_{m}"] for m in results),
            "pred_var": sum(logging_output[f"pred_var_{m}"] for m in results),
        })
        return total, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        D2vKDCriterion.reduce_metrics(logging_outputs)
        total = lambda key: sum(float(log.get(key, 0)) for log in logging_outputs)  # noqa: E731
        for m in MODALITY_ORDER:
            size, n = total(f"sample_size_{m}"), total(f"nsamples_{m}")
            if size:
                metrics.log_scalar(f"loss_{m}", total(f"loss_{m}") / size, size, round=4)
            if n:
                metrics.log_scalar(f"target_var_{m}", total(f"target_var_{m}") / n, n, round=3)
                metrics.log_scalar(f"pred_var_{m}", total(f"pred_var_{m}") / n, n, round=3)
