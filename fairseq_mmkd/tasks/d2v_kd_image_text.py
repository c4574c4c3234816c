"""fairseq task ``d2v_kd_image_text``: one student over the frozen image and text encoders, trained on image-caption
pairs to align them (``config/kd_image_text.yaml``, docs/image_text.md).

Every step holds ``dataset.batch_size`` pairs per GPU: each image (augmented as the image task does, crop scale
``task.crop_scale_min``) with one of its captions (tokenised for the text teacher, ``data.captions``). The loss
(``criterions/d2v_kd_image_text.py``) is a symmetric image-text contrastive term over the pairs of every GPU plus each
modality's data2vec regression against its teacher. Validation adds to the image task's unimodal CIFAR retrieval and
k-NN: zero-shot image<->text retrieval on ``task.valid_pairs`` (R@1/5/10 both ways, ``<set>_rmean``) and zero-shot
CIFAR classification through the text side (``cifar10_zeroshot_top1`` ...), with the unaligned teachers' figures
once per run (``teacher_`` prefix).
"""
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task

from ..retrieval import evaluate_retrieval
from ..retrieval.evaluate import pool_features
from ..retrieval.cross_modal import (CIFAR_TEMPLATES, embed_captions, embed_images, image_text_retrieval,
                                     zero_shot_classification)
from ..retrieval.sets.cifar import cifar_class_names
from ..runtime import save_dir
from ._checks import check_schedule, check_teacher, fit_workers
from ._data import ValidRound
from ._pairs import PairData
from ._retrieval import (check_retrieval_model, check_retrieval_settings, feature_function, fit_retrieval_sets,
                         load_retrieval_sets, retrieval_progress)
from .d2v_kd import D2vKDTaskConfig
from .d2v_kd_multimodal import D2vKDMultimodalTask

logger = logging.getLogger(__name__)

# The single-modality task's fields that are about training data of one modality; pairs replace them.
NOT_FOR_PAIRS = ("data", "tokens_per_sample", "max_sample_size", "min_sample_size", "normalize",
                 "max_bad_audio_fraction")


@dataclass
class _PairFields:
    pairs: str = field(default="", metadata={
        "help": "training pairs: a JSON list of {image, caption} (ALBEF/BLIP) or Karpathy's dataset_coco.json / "
                "dataset_flickr30k.json (its train and restval splits)"})
    image_root: Optional[str] = field(default=None, metadata={
        "help": "folder the training pairs' image paths are relative to (default: the file's folder)"})
    valid_pairs: str = field(default="", metadata={
        "help": "held-out pairs for zero-shot image<->text retrieval (either format; empty: none)"})
    valid_image_root: Optional[str] = field(default=None, metadata={
        "help": "folder the validation pairs' image paths are relative to (default: that file's folder)"})
    valid_split: str = field(default="test", metadata={
        "help": "the split of a Karpathy validation file (test: the 5k COCO / 1k Flickr30k test images)"})
    text_dict: str = field(default="", metadata={
        "help": "folder with the text teacher's dict.txt (nlp_base.pt: RoBERTa's)"})
    bpe_encoder_json: Optional[str] = field(default=None, metadata={
        "help": "GPT-2 BPE encoder.json (local path) the text teacher's data was encoded with; null: whitespace words"})
    bpe_vocab: Optional[str] = field(default=None, metadata={
        "help": "GPT-2 BPE vocab.bpe (local path), with the above"})
    max_caption_tokens: int = field(default=40, metadata={
        "help": "longest caption in tokens, <s> and </s> included (longer ones are cut)"})
    zeroshot: bool = field(default=True, metadata={
        "help": "zero-shot CIFAR classification through the text side (class names from the CIFAR meta files, "
                "CLIP's 18 templates) for every CIFAR root set"})


def _copy(f: dataclasses.Field):
    kw = {"metadata": f.metadata}
    if f.default is not dataclasses.MISSING:
        kw["default"] = f.default
    else:
        kw["default_factory"] = f.default_factory
    return f.name, f.type, field(**kw)


D2vKDImageTextTaskConfig = dataclasses.make_dataclass(
    "D2vKDImageTextTaskConfig",
    [_copy(f) for f in dataclasses.fields(_PairFields)]
    + [_copy(f) for f in dataclasses.fields(D2vKDTaskConfig) if f.name not in NOT_FOR_PAIRS],
    bases=(FairseqDataclass,))
D2vKDImageTextTaskConfig.__module__ = __name__


@register_task("d2v_kd_image_text", dataclass=D2vKDImageTextTaskConfig)
class D2vKDImageTextTask(D2vKDMultimodalTask):
    """The multimodal task's machinery (teacher archs in checkpoints, frozen teachers, unimodal image retrieval,
    protocol, checkpoint validation) over image-caption pairs."""

    def __init__(self, cfg, pairs: Optional[PairData] = None, retrieval_sets=None, class_names=None):
        super().__init__(cfg, data=None, retrieval_sets=retrieval_sets)
        self.pairs = pairs
        self.class_names = class_names or {}

    @classmethod
    def setup_task(cls, cfg, from_checkpoint: bool = False, **kwargs):
        if from_checkpoint:
            return cls(cfg)
        root = save_dir.full_config(cfg)
        if root is not None:
            save_dir.claim(root)
            check_schedule(root)
        retrieval_progress(cfg.retrieval_progress)
        check_retrieval_settings(cfg)
        pairs = PairData(cfg)
        if root is not None:
            follow_rmean(root, pairs)
        sets = load_retrieval_sets(cfg, "image") if cfg.retrieval else {}
        names = {n: cifar_class_names(getattr(cfg, f"{n}_root"), n) for n in ("cifar10", "cifar100")
                 if cfg.retrieval and cfg.zeroshot and getattr(cfg, f"{n}_root")}
        return cls(cfg, pairs=pairs, retrieval_sets={"image": sets} if sets else {}, class_names=names)

    def build_model(self, cfg, from_checkpoint: bool = False):
        self.inference_teacher_archs = self.teacher_archs if from_checkpoint else None
        try:
            model = FairseqTask.build_model(self, cfg, from_checkpoint=from_checkpoint)
        finally:
            self.inference_teacher_archs = None
        self.teacher_archs = model.teacher_archs
        self.teacher_task_cfgs = dict(model.teacher_task_cfgs)
        self.teacher_weights = str(getattr(cfg, "teacher_weights", "model"))
        if from_checkpoint:
            self.checkpoint_model = model
            return model
        self.trained_model = model
        for m in ("image", "text"):
            check_teacher(model.modality_model(m), getattr(cfg, f"{m}_teacher"))
        if model.distiller.cfgs["image"].modality != "image" or model.distiller.cfgs["text"].modality != "text":
            raise ValueError("model.image_teacher must be an image model and model.text_teacher a text model")
        self.pairs.configure(model.modality_model("image"), model.distiller.cfgs["text"].encoder.vocab_size,
                            model.distiller.cfgs["text"].encoder.max_source_positions)
        if self.modality_sets.get("image"):
            view = model.modality_model("image")
            fit_retrieval_sets(self.modality_sets["image"], self.cfg, view)
            check_retrieval_model(self.cfg, view)
        return model

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        if self.pairs is None:  # rebuilt from a checkpoint: fairseq-validate
            self.datasets[split] = self.checkpoint_validation(split)
        elif split == "train":
            self.datasets[split] = self.pairs.train(epoch)
        else:
            self.datasets[split] = self.pairs.valid(self.cfg.valid_kd_images)
        return self.datasets[split]

    def checkpoint_validation(self, split: str):
        """``fairseq-validate --path CKPT``: the checkpoint config's validation pairs and CIFAR sets, retrieval only
        (the losses need the training pairs' teachers and data: train to get them)."""
        model = self.checkpoint_model
        if model is None or split == "train":
            raise ValueError(f"a d2v_kd_image_text task rebuilt from a checkpoint only validates (asked for {split!r})")
        self.writes_files = False
        check_retrieval_settings(self.cfg)
        self.pairs = PairData(self.cfg, train=False)
        self.pairs.configure(model.modality_model("image"), model.distiller.cfgs["text"].encoder.vocab_size,
                            model.distiller.cfgs["text"].encoder.max_source_positions)
        sets = load_retrieval_sets(self.cfg, "image") if self.cfg.retrieval else {}
        if sets:
            fit_retrieval_sets(sets, self.cfg, model.modality_model("image"))
        self.modality_sets, self.retrieval_sets = ({"image": sets}, dict(sets)) if sets else ({}, {})
        self.class_names = {n: cifar_class_names(getattr(self.cfg, f"{n}_root"), n) for n in ("cifar10", "cifar100")
                            if sets and self.cfg.zeroshot and getattr(self.cfg, f"{n}_root")}
        logger.warning("validating retrieval only: the losses of an image-text checkpoint are measured in training")
        return ValidRound([None], 1, lambda items: {"nsamples": 0})

    def has_sharded_data(self, split):
        return False

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, *args, **kwargs):
        if dataset is self.datasets.get("train") and (max_sentences is None or max_sentences < 1):
            raise ValueError(f"dataset.batch_size={max_sentences}: set it to the number of pairs per GPU and step "
                             "(the contrastive batch is that times the number of GPUs)")
        if "num_workers" in kwargs:
            kwargs["num_workers"] = fit_workers(kwargs["num_workers"])
        if isinstance(dataset, ValidRound) and "required_batch_size_multiple" in kwargs:
            kwargs["required_batch_size_multiple"] = 1
        itr = FairseqTask.get_batch_iterator(self, dataset, max_tokens, max_sentences, *args, **kwargs)
        if dataset is self.datasets.get("train"):
            # The epoch's order is the dataset's per-epoch permutation (ordered_indices, rebuilt every epoch); fairseq's
            # shuffle of whole batches on top would make a step's pairs depend on the batch size per GPU, so that two
            # GPUs of B pairs would not see the B x 2 pairs that one GPU of 2B sees: it is turned off.
            if not self.cfg.rebuild_batches:
                raise ValueError("task.rebuild_batches=false: image-text pairs are reshuffled by rebuilding the "
                                 "batches every epoch; leave it true")
            ordered = itr.ordered_batches
            itr.ordered_batches = lambda epoch, fix_batches_to_gpus, shuffle: ordered(epoch, fix_batches_to_gpus, False)
        return itr

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if ignore_grad and sample:  # fairseq's dummy batch of a worker whose data ran out: no negatives from it
            sample = {**sample, "dummy": True}
        from .d2v_kd import D2vKDTask

        return D2vKDTask.train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad)

    def forward_backward(self, sample, model, criterion, optimizer, update_num, ignore_grad):
        """The criterion's step in turns (``backward_in_turns``): the gradient of the one-pass loss, with the peak
        memory of the larger modality's pass rather than of both."""
        model.train()
        model.set_num_updates(update_num)
        return criterion.backward_in_turns(model, sample, optimizer.backward, ignore_grad)

    @property
    def metric_prefixes(self) -> tuple:
        names = list(self.retrieval_sets) + ([self.pairs.valid_pairs.name] if self.pairs and self.pairs.valid_pairs
                                             else [])
        return tuple(f"{p}{name}_" for name in names for p in ("", "teacher_"))

    def _embedders(self, model, teacher: bool):
        """(image embed fn, caption embed fn): the student's aligned embeddings, or the teachers' own features pooled
        the same way and normalised (no heads: the unaligned baseline)."""
        align = model.alignment

        def embed(modality, source, padding_mask=None):
            if not teacher:
                return model.embed(modality, source, padding_mask)
            view = model.distiller.view(modality)
            features, mask = view.features(source, padding_mask, teacher=True)
            return torch.nn.functional.normalize(
                pool_features(features.float(), view.num_extra_tokens, align.pooling[modality], mask), dim=-1)

        return embed

    def cross_modal_metrics(self, model, teacher: bool) -> dict:
        """Zero-shot retrieval on the validation pairs and zero-shot CIFAR classification (student or teachers)."""
        embed = self._embedders(model, teacher)
        param = next(model.parameters())
        settings = dict(batch_size=self.cfg.retrieval_batch_size, device=param.device)
        size, tok = model.modality_model("image").input_size, self.pairs.tokenizer
        out = {}
        if self.pairs.valid_pairs is not None:
            pairs = self.pairs.valid_pairs
            image = embed_images(embed, self.pairs.valid_images(), size, dtype=param.dtype, **settings)
            text = embed_captions(embed, self.pairs.valid_tokens, tok.pad, **settings)
            out.update(image_text_retrieval(image, text, pairs.caption_image, pairs.name))
        for name, classes in self.class_names.items():
            data = self.retrieval_sets[name]
            out.update(zero_shot_classification(embed, lambda p: tok.encode(p, f"zero-shot prompt {p!r}"), tok.pad,
                                                classes, data.test_images, data.test_labels, size, name,
                                                dtype=param.dtype, **settings))
        return out

    def valid_step(self, sample, model, criterion):
        if sample and "image" in sample:
            loss, sample_size, logging_output = FairseqTask.valid_step(self, sample, model, criterion)
        else:
            loss, sample_size, logging_output = torch.zeros(()), 0, {}
        if not self.cfg.retrieval:
            return loss, sample_size, logging_output
        with_teacher = self.cfg.retrieval_teacher and model.distiller.teacher_blocks is not None
        student, teacher = {}, {}
        with torch.inference_mode():
            view = model.modality_model("image")
            kwargs = dict(progress=retrieval_progress(self.cfg.retrieval_progress), **self.evaluation_settings(view))
            if self.retrieval_sets:
                student.update(evaluate_retrieval(feature_function(view, self.cfg.retrieval_layer, False),
                                                  self.retrieval_sets, **kwargs))
            student.update(self.cross_modal_metrics(model, teacher=False))
            if with_teacher and self.teacher_metrics is None:
                if self.retrieval_sets:
                    teacher.update(evaluate_retrieval(feature_function(view, self.cfg.retrieval_layer, True),
                                                      self.retrieval_sets, **kwargs))
                teacher.update(self.cross_modal_metrics(model, teacher=True))
                self.teacher_metrics = teacher
        self.write_protocol(lambda: self.protocol(model, with_teacher))
        self.log_retrieval(logging_output, student)
        return loss, sample_size, logging_output

    def protocol(self, model, with_teacher: bool) -> dict:
        """``eval_protocol.json``: the unimodal image record, and how the cross-modal figures are computed."""
        record = {"image": self.protocol_record(model.modality_model("image"), self.retrieval_sets, with_teacher)
                  if self.retrieval_sets else None}
        pairs = self.pairs.valid_pairs
        record["cross_modal"] = {
            "similarity": "cosine of L2-normalised embeddings",
            "embedding": {m: f"{model.alignment.pooling[m]} pooling of the student's last block"
                             + (f", projected to {model.alignment.embed_dim}" if model.alignment.heads is not None
                                else "") for m in ("image", "text")},
            "image_to_text": "an image's rank is the best rank among its captions; ties count against it",
            "text_to_image": "a caption's rank is that of its one image; ties count against it",
            "recall_at": [1, 5, 10], "rmean": "mean of the six recalls",
            "pairs": None if pairs is None else {"file": pairs.source, "split": self.cfg.valid_split,
                                                 "images": len(pairs.images), "captions": len(pairs.captions)},
            "images": f"resized to {int(model.modality_model('image').input_size / 0.875)} px, centre crop "
                      f"{model.modality_model('image').input_size}, ImageNet-normalised",
            "captions": self.pairs.tokenizer.describe(),
            "zero_shot": {name: {"classes": len(c), "templates": list(CIFAR_TEMPLATES),
                                 "prototype": "mean of the normalised template embeddings, renormalised",
                                 "queries": "the test images", "top_k": [1, 5]}
                          for name, c in self.class_names.items()},
            "teacher": "the unaligned teachers: each teacher's last block, pooled the same way, no heads"
            if with_teacher else None,
        }
        return {"modalities": record}


def follow_rmean(root, pairs: PairData) -> None:
    """``checkpoint.best_checkpoint_metric=rmean`` (the config's default) names the validation pairs' summary, whose
    name comes from their file: ``<stem>_rmean``."""
    from omegaconf import open_dict

    if str(root.checkpoint.get("best_checkpoint_metric")) != "rmean":
        return
    if pairs.valid_pairs is None or not pairs.cfg.retrieval:
        raise ValueError("checkpoint.best_checkpoint_metric=rmean follows the zero-shot retrieval of task.valid_pairs: "
                         "set task.valid_pairs, or another metric (e.g. checkpoint.best_checkpoint_metric=loss "
                         "checkpoint.maximize_best_checkpoint_metric=false)")
    name = f"{pairs.valid_pairs.name}_rmean"
    with open_dict(root.checkpoint):
        root.checkpoint.best_checkpoint_metric = name
    logger.info(f"checkpoint.best_checkpoint_metric=rmean: checkpoint_best.pt follows {name}")


