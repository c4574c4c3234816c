"""fairseq task ``d2v_kd``: label-free distillation on images, text or audio, validated by zero-shot retrieval.

The modality comes from the teacher checkpoint, and ``task.data`` must hold that kind of data (recognised
from its files, ``kd_data.py``): images (a folder in ImageFolder layout, labels ignored, or a text file of
paths) augmented as in data2vec2 image pretraining; text (fairseq-preprocess output) cut into blocks as
data2vec2's text pretraining does; audio (a wav2vec manifest of 16 kHz clips) cropped as data2vec2's audio
pretraining does. Validation is one "batch" per round: the distillation loss on a fixed batch of training
samples and the zero-shot retrieval and k-NN metrics of the student (plus the teacher's, computed once per
run and logged with a ``teacher_`` prefix). How they are computed is written to ``SAVE_DIR/eval_protocol.json``
at the first validation.

Everything a user can get wrong (data path, retrieval data, sizes) is checked in ``setup_task``, before
the teacher is loaded or the trainer starts, and what depends on the teacher right after it is loaded.
First of all the task claims ``checkpoint.save_dir`` (:mod:`fairseq_mmkd.save_dir`): a rerun of a finished
run exits there, and a folder another live run is using is refused.
"""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from ..distill.distiller import block_index
from ..retrieval import evaluate_retrieval, evaluation_protocol
from ..files import write_json
from ..retrieval.examples import save_examples
from ..runtime import guards, save_dir
from . import _data as kd_data
from ._checks import check_schedule, check_teacher, completed_updates, fit_workers, freeze_gradient_free, precision_line
from ._retrieval import (
    check_retrieval_model,
    check_retrieval_settings,
    feature_function,
    fit_retrieval_sets,
    load_retrieval_sets,
    retrieval_progress,
)

logger = logging.getLogger(__name__)


guards.install_checkpoint_file_guards()  # fairseq copies checkpoint_last.pt in place: make it atomic


@dataclass
class D2vKDTaskConfig(FairseqDataclass):
    data: str = field(default="", metadata={
        "help": "training data of the teacher's modality: images (a folder in ImageFolder layout, labels ignored, "
                "or a text file with one image path per line), text (fairseq-preprocess output: a folder with "
                "dict.txt and train.bin/.idx, or DIR1:DIR2 shards, one per epoch) or audio (a wav2vec manifest: "
                "a folder with train.tsv)",
        # fairseq's argparse tools take it as the optional positional DATA (fairseq-validate reads the checkpoint's)
        "argparse_const": ""})
    input_size: Optional[int] = field(default=None, metadata={
        "help": "crop size; default (and the only valid value): the teacher's input size, since data2vec2 "
                "position tables are fixed"})
    crop_scale_min: float = field(default=0.2, metadata={
        "help": "RandomResizedCrop minimum area fraction (data2vec2 image pretraining: 0.2)"})
    max_bad_image_fraction: float = field(default=0.01, metadata={
        "help": "stop with an error when more than this fraction of the images read so far is unreadable"})
    gpu_decode: str = field(default="auto", metadata={
        "help": "decode training JPEGs in the training process on its device (nvjpeg on a GPU), batched, with the "
                "crop, flip and normalisation there; DataLoader workers then only read files (other formats are "
                "still decoded by the workers). auto: on when training on a GPU; true: also on CPU; false: off"})
    # Fields that follow a fairseq setting carry "doc", not "help": fairseq's argparse tools then skip them (their
    # flags, --cpu, --seed, --save-dir, are fairseq's own), and the interpolation fills them in.
    cpu: bool = field(default=II("common.cpu"), metadata={
        "doc": "fairseq's common.cpu: training on CPU (gpu_decode=auto is then off)"})
    tokens_per_sample: int = field(default=512, metadata={
        "help": "text: tokens per training block, <s> included (data2vec 2.0 text pretraining: 512)"})
    max_sample_size: int = field(default=320000, metadata={
        "help": "audio: longest crop in samples; every batch is cropped to its shortest clip up to this "
                "(data2vec 2.0 audio pretraining: 320000, 20 s at 16 kHz)"})
    min_sample_size: int = field(default=32000, metadata={
        "help": "audio: clips shorter than this many samples are skipped and counted (data2vec 2.0: 32000, 2 s)"})
    normalize: Optional[bool] = field(default=None, metadata={
        "help": "audio: zero mean / unit variance per clip; default: as the teacher was trained (its task.normalize, "
                "true for base_libri.pt)"})
    max_bad_audio_fraction: float = field(default=0.01, metadata={
        "help": "audio: stop with an error when more than this fraction of the clips read so far is unreadable"})
    seed: int = field(default=II("common.seed"), metadata={"doc": "augmentation seed (fairseq's common.seed)"})
    valid_kd_images: int = field(default=64, metadata={
        "help": "validation distillation loss is measured on this many training samples (images: centre crops; "
                "text blocks; audio clips cropped from their start)"})
    retrieval: bool = field(default=True, metadata={
        "help": "run zero-shot retrieval (CIFAR-10/100 and/or retrieval_folder) at every validation"})
    cifar10_root: Optional[str] = field(default=None, metadata={
        "help": "folder containing cifar-10-batches-py/ (scripts/prepare_data.py --cifar DIR)"})
    cifar100_root: Optional[str] = field(default=None, metadata={
        "help": "folder containing cifar-100-python/ (scripts/prepare_data.py --cifar DIR)"})
    retrieval_folder: Optional[str] = field(default=None, metadata={
        "help": "optional labelled retrieval set of your own: a folder with train/ and test/ in ImageFolder "
                "layout; its metrics are prefixed with the folder name"})
    retrieval_limit: int = field(default=0, metadata={
        "help": "use only the first N images of each retrieval split (0: all) for quick runs"})
    retrieval_pooling: ChoiceEnum(["auto", "cls", "mean", "cls+mean"]) = field(default="auto", metadata={
        "help": "cls: the extra (CLS) token; mean: mean of patch tokens (extra tokens excluded); cls+mean: both "
                "concatenated (DINO's ViT-B linear probe); auto: cls when the encoder has one"})
    retrieval_layer: int = field(default=-1, metadata={
        "help": "block whose output retrieval and k-NN embed, for student and teacher alike: -1 the last, -k the "
                "k-th from last (layer scans as in MIM-Refiner)"})
    retrieval_standardize: bool = field(default=False, metadata={
        "help": "standardise embeddings per dimension with the memory bank's mean and std before L2 "
                "normalisation (MIM-Refiner's k-NN); off: plain cosine (DINO)"})
    knn_k: int = field(default=20, metadata={
        "help": "k of the k-NN accuracies <set>_knn<k> (DINO-weighted) and <set>_knn<k>_uniform (majority vote), "
                "train split as memory, test split as queries; 0: off"})
    knn_temperature: float = field(default=0.07, metadata={
        "help": "T of the weighted k-NN vote, sum of exp(cosine / T) per class (DINO, DINOv2, MIM-Refiner: 0.07)"})
    retrieval_batch_size: int = field(default=256, metadata={"help": "images per retrieval embedding batch"})
    retrieval_teacher: bool = field(default=True, metadata={
        "help": "also evaluate the teacher once per run and log it with a teacher_ prefix"})
    retrieval_progress: str = field(default="auto", metadata={
        "help": "progress bar while embedding the retrieval sets: auto (only when stderr is a terminal, so never "
                "in log files or CI), true or false"})
    retrieval_examples: int = field(default=8, metadata={
        "help": "at each validation draw this many fixed test queries of the first retrieval set with their "
                "top-3 neighbours to SAVE_DIR/retrieval_examples.png (and one file per update); 0: off"})
    save_dir: str = field(default=II("checkpoint.save_dir"), metadata={
        "doc": "where validation pictures go (fairseq's checkpoint.save_dir)"})
    reuse_dataloader: bool = field(default=False, metadata={
        "help": "fairseq: keep one DataLoader across epochs. Off so workers see each epoch's augmentation seed"})
    persistent_workers: bool = field(default=True, metadata={"help": "fairseq: keep DataLoader workers alive"})
    rebuild_batches: bool = field(default=True, metadata={
        "help": "fairseq: draw a new shuffle for every epoch (seeded by seed + epoch), so a resumed run sees "
                "exactly the batches an uninterrupted one would"})


@register_task("d2v_kd", dataclass=D2vKDTaskConfig)
class D2vKDTask(FairseqTask):
    cfg: D2vKDTaskConfig

    def __init__(self, cfg: D2vKDTaskConfig, data: Optional[kd_data.TrainingData] = None, retrieval_sets=None):
        super().__init__(cfg)
        self.data = data
        self.retrieval_sets = retrieval_sets or {}
        self.teacher_metrics = None
        self.teacher_arch = None  # saved in checkpoints (task_state): rebuilds the model without the teacher
        self.teacher_task_cfg = None  # ... and what the data side needs of the teacher's own task (normalize)
        self.inference_teacher_arch = None  # set only while fairseq rebuilds a trained checkpoint
        self.guard = None  # guards.TrainingGuard, configured by the criterion (build_criterion)
        self.precision_logged = False  # the dtypes of teacher, encoders and student: logged at the first update
        self.teacher_weights = None  # model.teacher_weights, for the evaluation protocol record
        self.protocol_written = False
        self.trained_model = None  # the model built for training, whose gradient-free parameters build_criterion freezes
        self.checkpoint_model = None  # the model rebuilt from a checkpoint (fairseq-validate validates it)
        self.writes_files = True  # eval_protocol.json and the pictures: not when validating someone's checkpoint

    @property
    def input_size(self):
        return self.data.input_size if self.data is not None else self.cfg.input_size

    @classmethod
    def setup_task(cls, cfg: D2vKDTaskConfig, from_checkpoint: bool = False, **kwargs):
        """Validate user inputs before anything expensive; skipped when fairseq rebuilds a trained
        checkpoint for inference (its data may be gone by then)."""
        if from_checkpoint:
            return cls(cfg)
        root = save_dir.full_config(cfg)
        if root is not None:  # a finished run exits here; a folder in use by another run is refused
            save_dir.claim(root)
            check_schedule(root)
        retrieval_progress(cfg.retrieval_progress)
        check_retrieval_settings(cfg)
        data = kd_data.training_data(cfg)
        return cls(cfg, data=data, retrieval_sets=load_retrieval_sets(cfg, data.modality) if cfg.retrieval else {})

    def state_dict(self):
        if not self.teacher_arch:
            return {}
        return {"teacher_arch": self.teacher_arch, "teacher_task_cfg": dict(self.teacher_task_cfg or {})}

    def load_state_dict(self, state_dict):
        self.teacher_arch = state_dict.get("teacher_arch") or self.teacher_arch
        self.teacher_task_cfg = state_dict.get("teacher_task_cfg") or self.teacher_task_cfg

    def build_model(self, cfg, from_checkpoint: bool = False):
        self.inference_teacher_arch = self.teacher_arch if from_checkpoint else None
        try:
            model = super().build_model(cfg, from_checkpoint=from_checkpoint)
        finally:
            self.inference_teacher_arch = None
        self.teacher_arch = model.teacher_arch
        self.teacher_task_cfg = dict(getattr(model, "teacher_task_cfg", None) or {})
        if from_checkpoint:
            self.checkpoint_model = model
        else:
            self.trained_model = model
            check_teacher(model, cfg.teacher_checkpoint)
        if self.data is not None:
            kd_data.check_modality(self.data.modality, self.cfg.data, model.modality, cfg.teacher_checkpoint)
            self.data.configure(model)
        self.teacher_weights = str(getattr(cfg, "teacher_weights", "model"))
        if self.retrieval_sets:
            fit_retrieval_sets(self.retrieval_sets, self.cfg, model)
            check_retrieval_model(self.cfg, model)
        return model

    def build_criterion(self, cfg, from_checkpoint: bool = False):
        self.guard = guards.TrainingGuard.from_config(cfg)  # validates its settings before training starts
        criterion = super().build_criterion(cfg, from_checkpoint=from_checkpoint)
        if self.trained_model is not None and not from_checkpoint:
            freeze_gradient_free(self.trained_model, criterion)
        return criterion

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, *args, **kwargs):
        unlimited = max_tokens is None and (max_sentences is None or max_sentences < 1)
        if unlimited and dataset is self.datasets.get("train"):
            image = self.data.modality == "image"
            what = ("dataset.batch_size to the number of images per GPU (the seed recipe: 256)" if image else
                    "dataset.batch_size (sequences or clips per GPU) or dataset.max_tokens (tokens or samples per GPU)")
            raise ValueError(f"dataset.batch_size={max_sentences}: fairseq reads it as 'no limit' and would put all "
                             f"{len(dataset)} training {'images' if image else 'samples'} into one batch; set {what}")
        if "num_workers" in kwargs:
            kwargs["num_workers"] = fit_workers(kwargs["num_workers"])
        if isinstance(dataset, kd_data.ValidRound) and "required_batch_size_multiple" in kwargs:
            kwargs["required_batch_size_multiple"] = 1  # one item by design; a multiple of 8 (fairseq's) drops it
        return super().get_batch_iterator(dataset, max_tokens, max_sentences, *args, **kwargs)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's forward/backward, then the numerical guard: a NaN/inf loss or gradient on any worker
        zeroes the gradients and marks the update to be skipped in ``optimizer_step``. A batch of still
        encoded JPEGs (``task.gpu_decode``) is decoded and augmented on the model's device first."""
        sample = self.data.prepare_batch(sample, model, self.datasets.get("train")) if self.data else sample
        loss, sample_size, logging_output = self.forward_backward(sample, model, criterion, optimizer, update_num,
                                                                  ignore_grad)
        if self.guard is None:
            self.guard = guards.TrainingGuard.from_config(getattr(criterion, "cfg", None))
        if not self.precision_logged:
            self.precision_logged = True
            logger.info(precision_line(model))
        if not guards.uses_loss_scaler(optimizer) and self.guard.check(loss, logging_output, model, update_num):
            optimizer.zero_grad()
            return loss, 0, guards.skipped_logging_output(logging_output)
        return loss, sample_size, logging_output

    def forward_backward(self, sample, model, criterion, optimizer, update_num, ignore_grad):
        """fairseq's own forward and backward of one batch."""
        return FairseqTask.train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=ignore_grad)

    def optimizer_step(self, optimizer, model, update_num):
        if self.guard is not None and self.guard.end_update(update_num):
            metrics.log_scalar_sum("nonfinite_skipped", 1, round=0)  # counts updates, in the train log
            return  # skipped: parameters and optimizer state stay as they were
        super().optimizer_step(optimizer, model, update_num)

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        if self.data is None:  # rebuilt from a checkpoint: fairseq-validate
            self.datasets[split] = self.checkpoint_validation(split)
        elif split == "train":
            self.datasets[split] = self.data.train(epoch)
        else:
            self.datasets[split] = self.data.valid(self.cfg.valid_kd_images)
        return self.datasets[split]

    def checkpoint_validation(self, split: str):
        """The validation round of a task rebuilt from a checkpoint (``fairseq-validate --path CKPT``): the retrieval
        sets of the checkpoint's config (command-line overrides applied), read now, and the distillation batch where
        the training data and the teacher file can still be read (else retrieval alone, with one line saying why).
        Nothing is written into the training run's folder."""
        model = self.checkpoint_model
        if model is None or split == "train":
            raise ValueError(f"a d2v_kd task rebuilt from a checkpoint only validates (asked for split {split!r})")
        self.writes_files = False
        check_retrieval_settings(self.cfg)
        if self.cfg.retrieval:
            self.retrieval_sets = load_retrieval_sets(self.cfg, model.modality)
            fit_retrieval_sets(self.retrieval_sets, self.cfg, model)
        try:
            data = kd_data.training_data(self.cfg)
            kd_data.check_modality(data.modality, self.cfg.data, model.modality, model.cfg.teacher_checkpoint)
            from ..models.d2v_kd import load_teacher

            model.attach_teacher(load_teacher(model.cfg), model.cfg.teacher_checkpoint)
            data.configure(model)
        except (OSError, ValueError) as e:
            logger.warning(f"validating retrieval only, without the distillation loss: {e} (pass the training data as "
                           "DATA and the teacher with --model-overrides \"{'teacher_checkpoint': 'PATH'}\" to get it)")
            return kd_data.ValidRound([None], 1, lambda items: {"nsamples": 0})
        if self.cfg.retrieval:
            check_retrieval_model(self.cfg, model)
        return data.valid(self.cfg.valid_kd_images)

    @property
    def metric_prefixes(self) -> tuple:
        return tuple(f"{p}{name}_" for name in self.retrieval_sets for p in ("", "teacher_"))

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def pooling(self, model) -> str:
        pooling = str(self.cfg.retrieval_pooling)
        if pooling == "auto":
            return "cls" if model.num_extra_tokens > 0 else "mean"
        return pooling

    def evaluation_settings(self, model) -> dict:
        """The arguments of ``evaluate_retrieval`` (and ``evaluation_protocol``) for ``model``."""
        param = next(model.parameters())
        return dict(input_size=model.input_size, num_extra_tokens=model.num_extra_tokens,
                    pooling=self.pooling(model), batch_size=self.cfg.retrieval_batch_size, device=param.device,
                    dtype=param.dtype, knn_k=self.cfg.knn_k, knn_temperature=self.cfg.knn_temperature,
                    standardize=self.cfg.retrieval_standardize)

    def _evaluate(self, model, teacher: bool, on_embedded=None):
        return evaluate_retrieval(feature_function(model, self.cfg.retrieval_layer, teacher), self.retrieval_sets,
                                  progress=retrieval_progress(self.cfg.retrieval_progress), on_embedded=on_embedded,
                                  **self.evaluation_settings(model))

    def protocol_record(self, model, sets: dict, with_teacher: bool) -> dict:
        """How the student's (and the teacher's) metrics on ``sets`` are computed (``evaluation_protocol``)."""
        settings, layer = self.evaluation_settings(model), self.cfg.retrieval_layer
        distiller = model.distiller

        def record(who, blocks, weights, final_norm):
            return evaluation_protocol(sets, **settings, layer=layer, weights=weights, model=who,
                                       blocks=len(blocks), block=block_index(layer, len(blocks)) + 1,
                                       final_norm=final_norm)

        return {
            "student": record("student", distiller.student_blocks, "student", distiller.student_norm is not None),
            "teacher": record("teacher", distiller.teacher_blocks, self.teacher_weights or "model", False)
            if with_teacher else None,
        }

    def write_protocol(self, records) -> None:
        """``SAVE_DIR/eval_protocol.json``: how this run's validation metrics are computed (``records()``, from
        ``protocol_record``), once per run, on rank 0 only."""
        if self.protocol_written or not self.writes_files:
            return
        self.protocol_written = True
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if not rank0 or not self.cfg.save_dir:
            return
        write_json(Path(self.cfg.save_dir) / "eval_protocol.json", {
            "written_at_update": completed_updates(),
            "metrics": "valid_<name> in fairseq's log; the teacher's with a teacher_ prefix",
            **records(),
        })

    def log_retrieval(self, logging_output: dict, student: dict) -> None:
        """The student's retrieval metrics of this round and the teacher's (computed once) into the valid log."""
        logging_output.update({k: float(v) for k, v in student.items()})
        logging_output.update({f"teacher_{k}": float(v) for k, v in (self.teacher_metrics or {}).items()})
        logging_output["retrieval_rounds"] = 1

    def _example_writer(self, step):
        """Draws the first retrieval set's fixed queries and neighbours (rank 0 only) from embeddings the
        evaluation computes anyway."""
        first = next(iter(self.retrieval_sets))
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if self.cfg.retrieval_examples <= 0 or not rank0 or not self.cfg.save_dir or not self.writes_files \
                or self.retrieval_sets[first].modality != "image":  # pictures of images only
            return None

        def write(name, data, train, test):
            if name == first:
                folder = Path(self.cfg.save_dir)
                path = save_examples(folder / "retrieval_examples" / f"update_{step:06d}.png", name, data, train,
                                     test, count=self.cfg.retrieval_examples, step=step)
                shutil.copyfile(path, folder / "retrieval_examples.png")

        return write

    def valid_step(self, sample, model, criterion):
        if "net_input" in sample:
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        else:  # retrieval only (a checkpoint validated without its teacher or training data)
            loss, sample_size, logging_output = torch.zeros(()), 0, {}
        if self.retrieval_sets:  # ``model`` may be fairseq's distributed wrapper: it forwards attributes
            with torch.inference_mode():
                student = self._evaluate(model, teacher=False, on_embedded=self._example_writer(completed_updates()))
                with_teacher = self.cfg.retrieval_teacher and model.distiller.teacher_blocks is not None
                if with_teacher and self.teacher_metrics is None:
                    self.teacher_metrics = self._evaluate(model, teacher=True)
            self.write_protocol(lambda: self.protocol_record(model, self.retrieval_sets, with_teacher))
            self.log_retrieval(logging_output, student)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        if any("loss" in log for log in logging_outputs):  # not when only retrieval was validated
            super().reduce_metrics(logging_outputs, criterion)
        rounds = sum(log.get("retrieval_rounds", 0) for log in logging_outputs)
        if not rounds:
            return
        names = sorted({k for log in logging_outputs for k, v in log.items() if k.startswith(self.metric_prefixes)})
        for name in names:
            value = sum(float(log.get(name, 0.0)) for log in logging_outputs) / rounds
            metrics.log_scalar(name, value, weight=1, priority=300 if name.startswith("teacher_") else 250, round=2)
