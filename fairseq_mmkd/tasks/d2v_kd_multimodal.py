"""fairseq task, model and criterion ``d2v_kd_multimodal``: one student distilled from image, text and audio
teachers at once (``config/kd_multimodal.yaml``).

Each teacher given (``model.image_teacher``, ``model.text_teacher``, ``model.audio_teacher``; an empty one
switches its modality off) brings its frozen modality encoder and blocks; one student stack learns from all
(``multimodal.MultimodalDistiller``). Every update sees one batch of every active modality
(``kd_data.StepDataset``: each modality's data runs through its own epochs, shuffles and augmentation seeds,
exactly as it would alone, so a resumed run continues every modality where it stopped). The losses are summed,
weighted by ``task.modality_weights`` (default: every regressed element counts the same, whatever its
modality), into one optimizer step. Validation runs each modality's zero-shot retrieval under the metric
names of the single-modality task, with the teachers' once per run.

With a single teacher the run is the single-modality ``d2v_kd`` run with the same settings: the same batches,
initialisation, loss and updates (tested).
"""

import ast
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task

from ..d2v.loading import load_d2v
from ..distill.multimodal import MODALITY_ORDER
from ..retrieval import evaluate_retrieval
from ..runtime import save_dir
from . import _data as kd_data
from ._checks import check_schedule, check_teacher
from ._retrieval import (
    check_retrieval_model,
    check_retrieval_settings,
    feature_function,
    fit_retrieval_sets,
    load_retrieval_sets,
    retrieval_progress,
)
from .d2v_kd import D2vKDTask, D2vKDTaskConfig

logger = logging.getLogger(__name__)


# Fields of the single-modality task that name one modality's data: replaced by per-modality ones here.
SINGLE_MODALITY_FIELDS = ("data", "retrieval_folder", "retrieval_examples")


@dataclass
class _MultimodalFields:
    image_data: str = field(default="", metadata={
        "help": "training images (ImageFolder layout or a list file); empty: no image modality"})
    text_data: str = field(default="", metadata={
        "help": "training text (fairseq-preprocess output with the text teacher's dictionary; DIR1:DIR2 shards); "
                "empty: no text modality"})
    audio_data: str = field(default="", metadata={
        "help": "training audio (a wav2vec manifest folder of 16 kHz files); empty: no audio modality"})
    image_batch_size: Optional[int] = field(default=256, metadata={"help": "images per GPU and update"})
    text_batch_size: Optional[int] = field(default=64, metadata={"help": "text blocks per GPU and update"})
    text_max_tokens: Optional[int] = field(default=None, metadata={"help": "or: text tokens per GPU and update"})
    audio_batch_size: Optional[int] = field(default=None, metadata={"help": "audio clips per GPU and update"})
    audio_max_tokens: Optional[int] = field(default=1000000, metadata={
        "help": "or: audio samples per GPU and update (data2vec 2.0: 1,000,000)"})
    # Any, not Dict[str, float]: fairseq's argparse tools cannot type a dict (there it is a string, parsed here)
    modality_weights: Any = field(default_factory=dict, metadata={
        "help": "weight of each modality's summed squared error, e.g. {image: 1, text: 0.5} (fairseq-train: "
                "--modality-weights \"{'image': 1, 'text': 0.5}\"); missing: 1, so by default every regressed element "
                "counts the same whatever its modality"})
    image_retrieval_folder: Optional[str] = field(default=None, metadata={
        "help": "an image retrieval set of your own (train/ and test/ in ImageFolder layout), besides CIFAR"})
    text_retrieval_folder: Optional[str] = field(default=None, metadata={
        "help": "labelled text for retrieval: a sentence-classification folder as RoBERTa's GLUE preprocessing "
                "writes it (input0/, label/)"})
    audio_retrieval_folder: Optional[str] = field(default=None, metadata={
        "help": "labelled audio for retrieval: train.tsv/valid.tsv manifests with train.label/valid.label"})


def _copy(f: dataclasses.Field):
    kw = {"metadata": f.metadata}
    if f.default is not dataclasses.MISSING:
        kw["default"] = f.default
    else:
        kw["default_factory"] = f.default_factory
    return f.name, f.type, field(**kw)


# The multimodal task takes every setting of the single-modality one (crops, blocks, clips, retrieval, k-NN,
# loaders; same meaning, same defaults) except the data paths, which it has per modality.
D2vKDMultimodalTaskConfig = dataclasses.make_dataclass(
    "D2vKDMultimodalTaskConfig",
    [_copy(f) for f in dataclasses.fields(_MultimodalFields)]
    + [_copy(f) for f in dataclasses.fields(D2vKDTaskConfig) if f.name not in SINGLE_MODALITY_FIELDS],
    bases=(FairseqDataclass,))


D2vKDMultimodalTaskConfig.__module__ = __name__


def parse_modality_weights(value) -> dict:
    """``task.modality_weights`` as a dict: a mapping (Hydra), or its Python literal (fairseq's argparse tools)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else {}
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, dict):
            raise ValueError("task.modality_weights must map modalities to weights, e.g. {'image': 1, 'text': 0.5}")
    return dict(value or {})


class ModalityView:
    """One modality's part of the multimodal task config, read as the single-modality task's config (``data``,
    ``retrieval_folder``; CIFAR only for images), for the data and retrieval code."""

    def __init__(self, cfg, modality: str):
        self._cfg, self._modality = cfg, modality

    def __getattr__(self, name):
        m = self._modality
        if name == "data":
            return getattr(self._cfg, f"{m}_data")
        if name == "retrieval_folder":
            return getattr(self._cfg, f"{m}_retrieval_folder")
        if name in ("cifar10_root", "cifar100_root") and m != "image":
            return None
        return getattr(self._cfg, name)


@register_task("d2v_kd_multimodal", dataclass=D2vKDMultimodalTaskConfig)
class D2vKDMultimodalTask(D2vKDTask):
    """The single-modality task's machinery (save-dir claim, numerical guards, retrieval, metrics) over
    several modalities: per-modality data and retrieval sets, steps that hold a batch of each."""

    def __init__(self, cfg, data: Optional[Dict[str, kd_data.TrainingData]] = None, retrieval_sets=None):
        super().__init__(cfg, data=None, retrieval_sets=None)
        self.modality_data = data or {}
        self.modality_sets = retrieval_sets or {}
        self.retrieval_sets = {name: s for sets in self.modality_sets.values() for name, s in sets.items()}
        self.teacher_archs = None
        self.teacher_task_cfgs = None
        self.inference_teacher_archs = None
        self.streams = None

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
        for m, w in parse_modality_weights(cfg.modality_weights).items():
            if m not in MODALITY_ORDER or not float(w) >= 0:
                raise ValueError(f"task.modality_weights: {m}={w}; use image, text or audio with a weight >= 0")
        data, sets = {}, {}
        for m in MODALITY_ORDER:
            view = ModalityView(cfg, m)
            if not view.data:
                continue
            data[m] = kd_data.training_data(view)
            if data[m].modality != m:
                raise kd_data.DataModalityError(f"task.{m}_data={view.data} holds {kd_data.KINDS[data[m].modality]}, "
                                                f"not {kd_data.KINDS[m]}")
            if cfg.retrieval:
                sets[m] = load_retrieval_sets(view, m)
        if not data:
            raise ValueError("no training data is set: pass task.image_data, task.text_data and/or task.audio_data "
                             "for the modalities whose teachers you give")
        names = [n for s in sets.values() for n in s]
        clash = {n for n in names if names.count(n) > 1}
        if clash:
            raise ValueError(f"retrieval sets of different modalities have the same name {sorted(clash)}: metric names "
                             "would collide; rename one of the folders")
        return cls(cfg, data=data, retrieval_sets=sets)

    def state_dict(self):
        if not self.teacher_archs:
            return {}
        return {"teacher_archs": dict(self.teacher_archs), "teacher_task_cfgs": dict(self.teacher_task_cfgs or {})}

    def load_state_dict(self, state_dict):
        self.teacher_archs = state_dict.get("teacher_archs") or self.teacher_archs
        self.teacher_task_cfgs = state_dict.get("teacher_task_cfgs") or self.teacher_task_cfgs

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
        teachers, data = set(model.modalities), set(self.modality_data)
        if teachers != data:
            extra = sorted(teachers - data)
            missing = sorted(data - teachers)
            raise ValueError("each modality needs a teacher and training data: "
                             + "; ".join([f"model.{m}_teacher is set but task.{m}_data is not" for m in extra]
                                         + [f"task.{m}_data is set but model.{m}_teacher is not" for m in missing]))
        for m in model.modalities:
            view = model.modality_model(m)
            check_teacher(view, getattr(cfg, f"{m}_teacher"))
            self.modality_data[m].configure(view)
            if self.modality_sets.get(m):
                fit_retrieval_sets(self.modality_sets[m], ModalityView(self.cfg, m), view)
                check_retrieval_model(self.cfg, view)
        return model

    def checkpoint_validation(self, split: str):
        """``fairseq-validate --path CKPT`` of a multimodal checkpoint: every modality's retrieval sets, and the
        distillation batches where every modality's training data and teacher file can still be read."""
        model = self.checkpoint_model
        if model is None or split == "train":
            raise ValueError(f"a d2v_kd_multimodal task rebuilt from a checkpoint only validates (asked for {split!r})")
        self.writes_files = False
        check_retrieval_settings(self.cfg)
        if self.cfg.retrieval:
            self.modality_sets = {m: load_retrieval_sets(ModalityView(self.cfg, m), m) for m in model.modalities}
            for m, sets in self.modality_sets.items():
                fit_retrieval_sets(sets, ModalityView(self.cfg, m), model.modality_model(m))
            self.retrieval_sets = {name: s for sets in self.modality_sets.values() for name, s in sets.items()}
        try:
            data = {m: kd_data.training_data(ModalityView(self.cfg, m)) for m in model.modalities}
            paths = {m: os.path.expanduser(getattr(model.cfg, f"{m}_teacher")) for m in model.modalities}
            model.attach_teachers({m: load_d2v(p, weights=str(model.cfg.teacher_weights), modality=m,
                                               trust_checkpoint=model.cfg.trust_teacher_checkpoint)
                                   for m, p in paths.items()}, paths)
            for m, d in data.items():
                d.configure(model.modality_model(m))
        except (OSError, ValueError) as e:
            logger.warning(f"validating retrieval only, without the distillation loss: {e} (pass every modality's "
                           "training data and teacher to get it: --image-data DIR ... --model-overrides "
                           "\"{'image_teacher': 'PATH', ...}\")")
            return kd_data.ValidRound([None], 1, lambda items: {"nsamples": 0})
        return kd_data.MultiValidRound({m: d.valid(self.cfg.valid_kd_images) for m, d in data.items()})

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        if not self.modality_data:  # rebuilt from a checkpoint: fairseq-validate
            self.datasets[split] = self.checkpoint_validation(split)
        elif split == "train":
            if self.streams is None:
                c = self.cfg
                sizes = {"image": (None, c.image_batch_size), "text": (c.text_max_tokens, c.text_batch_size),
                         "audio": (c.audio_max_tokens, c.audio_batch_size)}
                for m in self.modality_data:
                    if sizes[m] == (None, None) or (sizes[m][0] is None and not sizes[m][1]):
                        raise ValueError(f"task.{m}_batch_size (or task.{m}_max_tokens) must be set")
                self.streams = {m: kd_data.ModalityStream(d, *sizes[m], seed=self.cfg.seed)
                                for m, d in self.modality_data.items()}
            self.datasets[split] = kd_data.StepDataset(self.streams, epoch)
        else:
            self.datasets[split] = kd_data.MultiValidRound(
                {m: d.valid(self.cfg.valid_kd_images) for m, d in self.modality_data.items()})
        return self.datasets[split]

    def has_sharded_data(self, split):
        return split == "train"  # a new StepDataset per epoch (its steps come from the modalities' epochs)

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, *args, **kwargs):
        if dataset is self.datasets.get("train") and (max_sentences != 1 or max_tokens is not None):
            raise ValueError(f"dataset.batch_size={max_sentences}, dataset.max_tokens={max_tokens}: a multimodal step "
                             "is one item (its batches are sized per modality by task.<modality>_batch_size / "
                             "_max_tokens); set dataset.batch_size=1 and dataset.max_tokens=null")
        return super().get_batch_iterator(dataset, max_tokens, max_sentences, *args, **kwargs)  # caps the workers

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if sample and "modalities" in sample and "image" in sample["modalities"] and self.streams:
            stream = self.streams["image"]
            step = int(sample["id"][0])
            epoch, _ = stream.locate(step)
            image = self.modality_data["image"].prepare_batch(sample["modalities"]["image"], model,
                                                              stream.dataset(epoch))
            sample = {**sample, "modalities": {**sample["modalities"], "image": image}}
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad=ignore_grad)

    def valid_step(self, sample, model, criterion):
        """The distillation loss of every modality's validation batch, then every modality's retrieval (the
        student's each round, the teachers' once per run), under the single-modality metric names."""
        if "modalities" in sample:
            loss, sample_size, logging_output = FairseqTask.valid_step(self, sample, model, criterion)
        else:  # retrieval only (a checkpoint validated without its teachers or training data)
            loss, sample_size, logging_output = torch.zeros(()), 0, {}
        if not self.retrieval_sets:
            return loss, sample_size, logging_output
        with_teacher = self.cfg.retrieval_teacher and model.distiller.teacher_blocks is not None
        student, teacher = {}, {}
        with torch.inference_mode():
            for m, sets in self.modality_sets.items():
                view = model.modality_model(m)
                kwargs = dict(progress=retrieval_progress(self.cfg.retrieval_progress),
                              **self.evaluation_settings(view))
                layer = self.cfg.retrieval_layer
                student.update(evaluate_retrieval(feature_function(view, layer, False), sets, **kwargs))
                if with_teacher and self.teacher_metrics is None:
                    teacher.update(evaluate_retrieval(feature_function(view, layer, True), sets, **kwargs))
        if with_teacher and self.teacher_metrics is None:
            self.teacher_metrics = teacher
        self.write_protocol(lambda: {"modalities": {m: self.protocol_record(model.modality_model(m), sets, with_teacher)
                                                    for m, sets in self.modality_sets.items()}})
        self.log_retrieval(logging_output, student)
        return loss, sample_size, logging_output

    def forward_backward(self, sample, model, criterion, optimizer, update_num, ignore_grad):
        """One forward and backward per modality, gradients accumulating into the step's one optimizer update:
        only one modality's activations are held at a time (a single summed backward would hold all three)."""
        if not sample or "modalities" not in sample:
            return super().forward_backward(sample, model, criterion, optimizer, update_num, ignore_grad)
        total_loss, total_size, logs = 0.0, 0, {}
        for m, batch in sample["modalities"].items():
            part = {"modalities": {m: batch}, "nsamples": batch["nsamples"]}
            loss, size, log = super().forward_backward(part, model, criterion, optimizer, update_num, ignore_grad)
            total_loss, total_size = total_loss + loss.detach(), total_size + size
            for k, v in log.items():
                logs[k] = logs[k] + v if k in logs else v
        return total_loss, total_size, logs

    @property
    def modality_weights(self) -> Dict[str, float]:
        weights = parse_modality_weights(self.cfg.modality_weights)
        return {m: float(weights.get(m, 1.0)) for m in MODALITY_ORDER}
