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
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from . import guards, kd_data, save_dir
from .checkpoint import CheckpointError
from .distill import block_index
from .retrieval import evaluate_retrieval, evaluation_protocol, load_cifar, load_image_folder_pair
from .retrieval.cli import write_json
from .retrieval.examples import save_examples
from .retrieval.image_folder import folder_set_name

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
            from .kd_model import load_teacher

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
                    f"keep their initial values (README, architecture notes): {', '.join(names)}")


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


def check_retrieval_settings(cfg: D2vKDTaskConfig) -> None:
    """Retrieval settings that are wrong whatever the model (checked before the teacher is loaded)."""
    if cfg.knn_k < 0:
        raise ValueError(f"task.knn_k={cfg.knn_k}: use the number of neighbours that vote (DINO: 20), or 0 for no "
                         "k-NN metrics")
    if cfg.knn_k and not cfg.knn_temperature > 0:
        raise ValueError(f"task.knn_temperature={cfg.knn_temperature} must be positive (DINO: 0.07)")
    if cfg.retrieval_layer > -1:
        raise ValueError(f"task.retrieval_layer={cfg.retrieval_layer}: use -1 for the last block or -k for the k-th "
                         "from last")


def check_retrieval_model(cfg: D2vKDTaskConfig, model) -> None:
    """Retrieval settings the model cannot serve: a layer deeper than the student (or the evaluated teacher),
    CLS pooling without a CLS token."""
    distiller = model.distiller
    stacks = [("student", distiller.student_blocks)]
    if cfg.retrieval_teacher and distiller.teacher_blocks is not None:
        stacks.append(("teacher", distiller.teacher_blocks))
    for who, blocks in stacks:
        if -cfg.retrieval_layer > len(blocks):
            raise ValueError(f"task.retrieval_layer={cfg.retrieval_layer}, but the {who} has {len(blocks)} blocks; "
                             f"use a layer between -{len(blocks)} and -1")
    reads_first = model.num_extra_tokens > 0 or model.modality == "text"  # text: the <s> token RoBERTa heads read
    if str(cfg.retrieval_pooling) in ("cls", "cls+mean") and not reads_first:
        raise ValueError(f"task.retrieval_pooling={cfg.retrieval_pooling}, but the teacher's encoder has no extra "
                         "(CLS) token; use task.retrieval_pooling=mean (or auto)")


def fit_retrieval_sets(sets: dict, cfg, model) -> None:
    """Fit text and audio retrieval sets to the teacher (dictionary size, positions, receptive field, audio
    normalisation: ``task.normalize`` or the teacher's own), once it is loaded."""
    from .retrieval import fit_teacher, teacher_facts

    facts = teacher_facts(model.distiller.cfg, getattr(model, "teacher_task_cfg", None))
    if cfg.normalize is not None and facts["modality"] == "audio":
        facts["normalize"] = bool(cfg.normalize)
    for name, data in sets.items():
        fit_teacher(data, what=f"retrieval set {name}", **facts)


_IMAGES = object()


def feature_function(model, layer: int, teacher: bool):
    """What ``evaluate_retrieval`` embeds with: images -> features; text and audio ``(source, padding_mask)`` ->
    ``(features, padding mask at sequence resolution)``; the student's, or with ``teacher`` the teacher's."""
    def features(source, padding_mask=_IMAGES):
        if padding_mask is _IMAGES:
            return (model.teacher_features if teacher else model.forward_features)(source, layer=layer)
        return model.distiller.features(source, padding_mask, layer=layer, teacher=teacher)

    return features


def retrieval_progress(setting) -> bool:
    """``task.retrieval_progress``: auto shows the bar only when stderr (where tqdm draws) is a terminal."""
    value = str(setting).strip().lower()
    if value == "auto":
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"task.retrieval_progress={setting!r}: use auto (a bar only on a terminal), true or false")


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


def load_retrieval_sets(cfg: D2vKDTaskConfig, modality: str = "image") -> dict:
    """Read every configured retrieval set into memory now, so missing files fail before training."""
    limit = cfg.retrieval_limit or None
    sets = {}
    cifar = [name for name in ("cifar10", "cifar100") if getattr(cfg, f"{name}_root")]
    if modality != "image":
        if cifar:
            raise ValueError(f"task.{cifar[0]}_root is a retrieval set of images, but task.data holds {modality}; set "
                             f"task.{cifar[0]}_root=null and give a labelled {modality} folder as task.retrieval_folder")
        if not cfg.retrieval_folder:
            raise ValueError(f"task.retrieval=true but no retrieval data is configured: set task.retrieval_folder to a "
                             f"labelled {modality} folder, or turn validation retrieval off with task.retrieval=false")
        from .retrieval import load_retrieval_folder

        folder = os.path.expanduser(cfg.retrieval_folder)
        data = load_retrieval_folder(folder, limit=limit)  # data errors now; fitted to the teacher in build_model
        if data.modality != modality:
            raise ValueError(f"task.retrieval_folder={cfg.retrieval_folder} holds {data.modality} items, but the "
                             f"training data is {modality}: give a labelled {modality} folder")
        sets[folder_set_name(folder)] = data
        return sets
    for name in cifar:
        sets[name] = load_cifar(os.path.expanduser(getattr(cfg, f"{name}_root")), name, limit=limit)
    if cfg.retrieval_folder:
        folder = os.path.expanduser(cfg.retrieval_folder)
        sets[folder_set_name(folder)] = load_image_folder_pair(folder, limit=limit)
    if not sets:
        raise ValueError("task.retrieval=true but no retrieval data is configured: set task.cifar10_root and/or "
                         "task.cifar100_root (download with scripts/prepare_data.py --cifar DIR) or "
                         "task.retrieval_folder, or turn validation retrieval off with task.retrieval=false")
    return sets
