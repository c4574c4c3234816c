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

import torch
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

    def weights(self) -> dict:
        return {"image": self.cfg.image_regression_weight, "text": self.cfg.text_regression_weight}

    def modality_part(self, model, sample, modality: str) -> tuple:
        """One modality's forward: ``(weighted regression sum over the pairs, embedding [B, P], logging outputs)``."""
        target = {modality: resolve_target_config(self.cfg, model.target_config(modality))}
        out = model({modality: sample[modality]["net_input"]}, targets=target,
                    include_extra_tokens=self.cfg.include_extra_tokens)[modality]
        pairs = sample["nsamples"]
        regression = out["sample_mse"].sum()
        log = {f"regression_{modality}": regression.detach(), f"target_var_{modality}": out["target_var"] * pairs,
               f"pred_var_{modality}": out["pred_var"] * pairs}
        return self.weights()[modality] * regression, out["embedding"], log

    def contrastive_part(self, model, sample, image, text) -> tuple:
        """``(G * contrastive_weight * C, its logged share, logging outputs)`` from this worker's embeddings."""
        if sample.get("dummy"):  # fairseq's stand-in batch of a worker without data: it brings no negatives
            image, text = image[:0], text[:0]
        c = contrastive_loss(image, text, model.alignment.logit_scale, gather=model.training)
        pairs, w = sample["nsamples"], self.cfg.contrastive_weight
        log = {"contrastive": c["loss"].detach() * pairs, "contrastive_accuracy": c["accuracy"] * pairs,
               "temperature": pairs / c["scale"]}
        return c["batch"] * w * c["loss"], pairs * w * c["loss"].detach(), log

    def logging(self, sample, logged, parts: list) -> dict:
        pairs = sample["nsamples"]
        log = {"loss": logged, "sample_size": pairs, "nsentences": pairs,
               "ntokens": sample["text"].get("ntokens", pairs)}
        for part in parts:
            log.update(part)
        log["target_var"] = sum(log[f"target_var_{m}"] for m in MODALITIES) / 2
        log["pred_var"] = sum(log[f"pred_var_{m}"] for m in MODALITIES) / 2
        if "num_replaced" in sample["image"]:
            log["bad_images"] = sample["image"]["num_replaced"]
        return log

    def forward(self, model, sample, reduce=True):
        """Both modalities and the contrastive term in one pass (validation; the task's training step computes the
        same gradient holding one modality's activations at a time)."""
        text_reg, text, text_log = self.modality_part(model, sample, "text")  # captions first, as in training
        image_reg, image, image_log = self.modality_part(model, sample, "image")
        contrastive, share, c_log = self.contrastive_part(model, sample, image, text)
        loss = image_reg + text_reg + contrastive
        logged = image_reg.detach() + text_reg.detach() + share
        return loss, sample["nsamples"], self.logging(sample, logged, [image_log, text_log, c_log])

    def backward_in_turns(self, model, sample, backward, ignore_grad: bool = False) -> tuple:
        """The training step's forward and backward with one modality's activations alive at a time: the captions'
        embeddings first without autograd, the images' pass with the contrastive term (its gradient with respect
        to the caption embeddings kept), then the captions' pass, whose backward takes that gradient. The same
        gradient as ``forward`` (tested); one more forward of the captions through the student. ``backward``:
        the optimizer's (``optimizer.backward``: loss scaling included)."""
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        with torch.no_grad():  # the student alone: the teacher's targets are not needed for the embedding
            text_ahead = model.embed("text", sample["text"]["net_input"]["source"],
                                     sample["text"]["net_input"].get("padding_mask"))
        text_leaf = text_ahead.detach().requires_grad_(True)
        image_reg, image, image_log = self.modality_part(model, sample, "image")
        contrastive, share, c_log = self.contrastive_part(model, sample, image, text_leaf)
        scale = 0.0 if ignore_grad else 1.0
        first = (image_reg + contrastive) * scale
        backward(first)
        text_grad = text_leaf.grad
        torch.set_rng_state(rng[0])  # the captions' pass draws what the look-ahead drew (drop path, dropout)
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        text_reg, text, text_log = self.modality_part(model, sample, "text")
        second = text_reg * scale
        if text_grad is not None:
            second = second + (text * text_grad.to(text.dtype) / self.loss_scale(backward)).sum()
        backward(second)
        loss = (image_reg + contrastive + text_reg).detach()
        logged = image_reg.detach() + text_reg.detach() + share
        return loss, sample["nsamples"], self.logging(sample, logged, [image_log, text_log, c_log])

    @staticmethod
    def loss_scale(backward) -> float:
        """The loss scale ``backward`` multiplies by (fairseq's fp16 optimizers), which the cached gradient carries."""
        owner = getattr(backward, "__self__", None)
        scaler = getattr(owner, "scaler", None)
        return float(scaler.loss_scale) if scaler is not None else 1.0

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
