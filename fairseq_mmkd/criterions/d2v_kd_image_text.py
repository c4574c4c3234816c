"""fairseq criterion ``d2v_kd_image_text``: the image-text contrastive term over the pairs of every GPU, plus each
modality's data2vec regression against its teacher.

The objective of a step is ``contrastive_weight * C + image_regression_weight * R_image + text_regression_weight *
R_text``: ``C`` CLIP's symmetric InfoNCE over the global batch of ``G`` pairs (``losses.contrastive``), ``R_m`` the
mean over the batch's pairs of each pair's mean squared error against its teacher's targets (``losses.regression``).
fairseq divides the summed gradients of all workers by the summed ``sample_size``: each worker reports its ``B_r``
pairs and backpropagates ``G * w_c * C + sum over its pairs of w_m * mse``, which makes that quotient the gradient of
the objective whatever the number of workers; the logged ``loss`` (``B_r * w_c * C`` in place of ``G * w_c * C``)
sums over workers to ``G`` times the objective, so the log shows the objective itself.
"""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.logging import metrics

from ..losses.contrastive import contrastive_loss
from .d2v_kd import D2vKDCriterion, D2vKDCriterionConfig, resolve_target_config

MODALITIES = ("image", "text")


@dataclass
class D2vKDImageTextCriterionConfig(D2vKDCriterionConfig):
    contrastive_weight: float = field(default=1.0, metadata={
        "help": "weight of the image-text contrastive term (0: the two regressions alone, no alignment)"})
    image_regression_weight: float = field(default=1.0, metadata={
        "help": "weight of the image data2vec regression (per pair: its mean squared error)"})
    text_regression_weight: float = field(default=1.0, metadata={
        "help": "weight of the text data2vec regression (per pair: its mean squared error over valid tokens)"})


@register_criterion("d2v_kd_image_text", dataclass=D2vKDImageTextCriterionConfig)
class D2vKDImageTextCriterion(D2vKDCriterion):
    def __init__(self, cfg: D2vKDImageTextCriterionConfig, task):
        super().__init__(cfg, task)
        for name in ("contrastive_weight", "image_regression_weight", "text_regression_weight"):
            if not getattr(cfg, name) >= 0:
                raise ValueError(f"criterion.{name}={getattr(cfg, name)} must be >= 0")
        if cfg.contrastive_weight + cfg.image_regression_weight + cfg.text_regression_weight == 0:
            raise ValueError("every criterion weight is 0: nothing would train")

    def target_configs(self, model) -> dict:
        weights = {"image": self.cfg.image_regression_weight, "text": self.cfg.text_regression_weight}
        return {m: resolve_target_config(self.cfg, model.target_config(m)) for m in MODALITIES if weights[m] > 0}

    def forward(self, model, sample, reduce=True):
        targets = {m: resolve_target_config(self.cfg, model.target_config(m)) for m in MODALITIES}
        out = model({m: sample[m]["net_input"] for m in MODALITIES}, targets=targets,
                    include_extra_tokens=self.cfg.include_extra_tokens)
        image, text = out["image"]["embedding"], out["text"]["embedding"]
        if sample.get("dummy"):  # fairseq's stand-in batch of a worker without data: it brings no negatives
            image, text = image[:0], text[:0]
        c = contrastive_loss(image, text, model.alignment.logit_scale, gather=model.training)
        pairs = sample["nsamples"]
        w = {"image": self.cfg.image_regression_weight, "text": self.cfg.text_regression_weight}
        regression = {m: out[m]["sample_mse"].sum() for m in MODALITIES}
        weighted = sum(w[m] * regression[m] for m in MODALITIES)
        loss = weighted + c["batch"] * self.cfg.contrastive_weight * c["loss"]
        logged = weighted.detach() + pairs * self.cfg.contrastive_weight * c["loss"].detach()
        log = {"loss": logged, "sample_size": pairs, "nsentences": pairs,
               "ntokens": sample["text"].get("ntokens", pairs), "contrastive": c["loss"].detach() * pairs,
               "contrastive_accuracy": c["accuracy"] * pairs, "temperature": pairs / c["scale"]}
        for m in MODALITIES:
            log[f"regression_{m}"] = regression[m].detach()
            log[f"target_var_{m}"] = out[m]["target_var"] * pairs
            log[f"pred_var_{m}"] = out[m]["pred_var"] * pairs
        log["target_var"] = sum(log[f"target_var_{m}"] for m in MODALITIES) / 2
        log["pred_var"] = sum(log[f"pred_var_{m}"] for m in MODALITIES) / 2
        if "num_replaced" in sample["image"]:
            log["bad_images"] = sample["image"]["num_replaced"]
        return loss, pairs, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = lambda key: sum(float(log.get(key, 0)) for log in logging_outputs)  # noqa: E731
        pairs = total("sample_size")
        metrics.log_scalar("loss", total("loss") / pairs if pairs else float("nan"), pairs, round=4)
        if not pairs:
            return
        metrics.log_scalar("contrastive", total("contrastive") / pairs, pairs, round=4)
        metrics.log_scalar("contrastive_accuracy", total("contrastive_accuracy") / pairs, pairs, round=3)
        metrics.log_scalar("temperature", total("temperature") / pairs, pairs, round=4)
        for m in MODALITIES:
            metrics.log_scalar(f"regression_{m}", total(f"regression_{m}") / pairs, pairs, round=4)
            metrics.log_scalar(f"target_var_{m}", total(f"target_var_{m}") / pairs, pairs, round=3)
            metrics.log_scalar(f"pred_var_{m}", total(f"pred_var_{m}") / pairs, pairs, round=3)
        metrics.log_scalar("target_var", total("target_var") / pairs, pairs, round=3)
        metrics.log_scalar("pred_var", total("pred_var") / pairs, pairs, round=3)
        bad = total("bad_images")
        if bad:
            metrics.log_scalar_sum("bad_images", bad, round=0)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
