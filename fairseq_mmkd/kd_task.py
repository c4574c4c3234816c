"""fairseq task ``d2v_kd``: label-free distillation on a folder of images, validated by zero-shot retrieval.

Training data is any folder of images (ImageFolder layout; labels ignored) or a text file of image paths,
augmented as in data2vec2 image pretraining. Validation is one "batch" per round: the distillation loss
on a fixed batch of training images (centre crops) and the zero-shot CIFAR-10/100 retrieval and k-NN metrics
of the student (plus the teacher's, computed once per run and logged with a ``teacher_`` prefix). How they
are computed is written to ``SAVE_DIR/eval_protocol.json`` at the first validation.

Everything a user can get wrong (data path, retrieval data, sizes) is checked in ``setup_task``, before
the teacher is loaded or the trainer starts. First of all it claims ``checkpoint.save_dir``
(:mod:`fairseq_mmkd.save_dir`): a rerun of a finished run exits there, and a folder another live run is
using is refused.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from . import device_decode, guards, image_data, save_dir
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
        "help": "training images: a folder in ImageFolder layout (class subfolders, labels ignored) or a text "
                "file with one image path per line"})
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
    cpu: bool = field(default=II("common.cpu"), metadata={
        "help": "fairseq's common.cpu: training on CPU (gpu_decode=auto is then off)"})
    seed: int = field(default=II("common.seed"), metadata={"help": "augmentation seed (fairseq's common.seed)"})
    valid_kd_images: int = field(default=64, metadata={
        "help": "validation distillation loss is measured on this many training images (centre crops)"})
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
        "help": "where validation pictures go (fairseq's checkpoint.save_dir)"})
    reuse_dataloader: bool = field(default=False, metadata={
        "help": "fairseq: keep one DataLoader across epochs. Off so workers see each epoch's augmentation seed"})
    persistent_workers: bool = field(default=True, metadata={"help": "fairseq: keep DataLoader workers alive"})
    rebuild_batches: bool = field(default=True, metadata={
        "help": "fairseq: draw a new shuffle for every epoch (seeded by seed + epoch), so a resumed run sees "
                "exactly the batches an uninterrupted one would"})


class ImageFairseqDataset(FairseqDataset):
    """fairseq view of an image dataset: every image counts as one "token", shuffled each epoch."""

    def __init__(self, images):
        self.images = images

    def __getitem__(self, index):
        return self.images[index]

    def __len__(self):
        return len(self.images)

    def collater(self, samples):
        return self.images.collater(samples)

    def num_tokens(self, index):
        return 1

    def size(self, index):
        return 1

    def ordered_indices(self):
        return np.random.permutation(len(self))  # fairseq seeds numpy with (seed + epoch) around this call

    def set_epoch(self, epoch):
        self.images.set_epoch(epoch)


class ValidRound(FairseqDataset):
    """One item whose batch is the fixed validation batch: fairseq then calls ``valid_step`` exactly once per
    validation round, which runs the whole retrieval evaluation. The batch is a real model input, since
    fairseq may reuse it as a dummy batch for workers without data."""

    def __init__(self, images, count: int):
        self.images = images
        self.count = min(count, len(images))

    def __getitem__(self, index):
        return index

    def __len__(self):
        return 1

    def collater(self, samples):
        if not samples:
            return {}
        return self.images.collater([self.images[i] for i in range(self.count)])

    def num_tokens(self, index):
        return 1

    def size(self, index):
        return 1


@register_task("d2v_kd", dataclass=D2vKDTaskConfig)
class D2vKDTask(FairseqTask):
    cfg: D2vKDTaskConfig

    def __init__(self, cfg: D2vKDTaskConfig, image_paths=None, retrieval_sets=None):
        super().__init__(cfg)
        self.image_paths = image_paths
        self.retrieval_sets = retrieval_sets or {}
        self.teacher_metrics = None
        self.input_size = cfg.input_size
        self.teacher_arch = None  # saved in checkpoints (task_state): rebuilds the model without the teacher
        self.inference_teacher_arch = None  # set only while fairseq rebuilds a trained checkpoint
        self.guard = None  # guards.TrainingGuard, configured by the criterion (build_criterion)
        self.teacher_weights = None  # model.teacher_weights, for the evaluation protocol record
        self.protocol_written = False

    @classmethod
    def setup_task(cls, cfg: D2vKDTaskConfig, from_checkpoint: bool = False, **kwargs):
        """Validate user inputs before anything expensive; skipped when fairseq rebuilds a trained
        checkpoint for inference (its data may be gone by then)."""
        if from_checkpoint:
            return cls(cfg)
        root = save_dir.full_config(cfg)
        if root is not None:  # a finished run exits here; a folder in use by another run is refused
            save_dir.claim(root)
        retrieval_progress(cfg.retrieval_progress)
        if cfg.crop_scale_min <= 0 or cfg.crop_scale_min > 1:
            raise ValueError(f"task.crop_scale_min={cfg.crop_scale_min} must be in (0, 1]")
        check_retrieval_settings(cfg)
        gpu_decode_mode(cfg.gpu_decode)
        if not cfg.data:
            raise image_data.ImageDataError("task.data is not set; pass task.data=/path/to/imagenet/train "
                                            "(a folder of images in ImageFolder layout, or a text file of paths)")
        paths = image_data.find_images(os.path.expanduser(cfg.data))
        image_data.probe_images(paths)  # a folder of non-images fails here, in a second
        return cls(cfg, image_paths=paths, retrieval_sets=load_retrieval_sets(cfg) if cfg.retrieval else {})

    def state_dict(self):
        return {"teacher_arch": self.teacher_arch} if self.teacher_arch else {}

    def load_state_dict(self, state_dict):
        self.teacher_arch = state_dict.get("teacher_arch") or self.teacher_arch

    def build_model(self, cfg, from_checkpoint: bool = False):
        self.inference_teacher_arch = self.teacher_arch if from_checkpoint else None
        try:
            model = super().build_model(cfg, from_checkpoint=from_checkpoint)
        finally:
            self.inference_teacher_arch = None
        self.teacher_arch = model.teacher_arch
        if not from_checkpoint:
            check_teacher(model, cfg.teacher_checkpoint)
        teacher_size = model.input_size
        if self.cfg.input_size is not None and self.cfg.input_size != teacher_size:
            raise ValueError(f"task.input_size={self.cfg.input_size} differs from the teacher's input size "
                             f"{teacher_size}; data2vec2 models have a fixed position table, so leave "
                             "task.input_size unset (or null)")
        self.input_size = teacher_size
        self.teacher_weights = str(getattr(cfg, "teacher_weights", "model"))
        if self.retrieval_sets:
            check_retrieval_model(self.cfg, model)
        return model

    def build_criterion(self, cfg, from_checkpoint: bool = False):
        self.guard = guards.TrainingGuard.from_config(cfg)  # validates its settings before training starts
        return super().build_criterion(cfg, from_checkpoint=from_checkpoint)

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, *args, **kwargs):
        if isinstance(dataset, ImageFairseqDataset) and max_tokens is None and \
                (max_sentences is None or max_sentences < 1):
            raise ValueError(f"dataset.batch_size={max_sentences}: fairseq reads it as 'no limit' and would put all "
                             f"{len(dataset)} training images into one batch; set dataset.batch_size to the number "
                             "of images per GPU (the seed recipe: 256)")
        if "num_workers" in kwargs:
            kwargs["num_workers"] = fit_workers(kwargs["num_workers"])
        return super().get_batch_iterator(dataset, max_tokens, max_sentences, *args, **kwargs)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's forward/backward, then the numerical guard: a NaN/inf loss or gradient on any worker
        zeroes the gradients and marks the update to be skipped in ``optimizer_step``. A batch of still
        encoded JPEGs (``task.gpu_decode``) is decoded and augmented on the model's device first."""
        sample = self.decode_sample(sample, model)
        loss, sample_size, logging_output = super().train_step(sample, model, criterion, optimizer, update_num,
                                                               ignore_grad=ignore_grad)
        if self.guard is None:
            self.guard = guards.TrainingGuard.from_config(getattr(criterion, "cfg", None))
        if not guards.uses_loss_scaler(optimizer) and self.guard.check(loss, logging_output, model, update_num):
            optimizer.zero_grad()
            return loss, 0, guards.skipped_logging_output(logging_output)
        return loss, sample_size, logging_output

    def optimizer_step(self, optimizer, model, update_num):
        if self.guard is not None and self.guard.end_update(update_num):
            metrics.log_scalar_sum("nonfinite_skipped", 1, round=0)  # counts updates, in the train log
            return  # skipped: parameters and optimizer state stay as they were
        super().optimizer_step(optimizer, model, update_num)

    def decode_sample(self, sample, model):
        """Turn an ``EncodedBatch`` source into the normalised batch on the model's device and dtype."""
        source = sample.get("net_input", {}).get("source") if sample else None
        if not isinstance(source, device_decode.EncodedBatch):
            return sample
        param = next(model.parameters())
        images = self.datasets["train"].images
        x, replaced = device_decode.decode_batch(source, param.device, images.fallback_crop, dtype=param.dtype)
        images.record_device_decodes(source.num_encoded)
        return {**sample, "net_input": {**sample["net_input"], "source": x},
                "num_replaced": sample.get("num_replaced", 0) + replaced}

    def use_device_decode(self) -> bool:
        """Whether training JPEGs are decoded on the training device (``task.gpu_decode``); decided once."""
        if getattr(self, "_device_decode", None) is None:
            self._device_decode = self._decide_device_decode()
        return self._device_decode

    def _decide_device_decode(self) -> bool:
        mode = gpu_decode_mode(self.cfg.gpu_decode)
        on_gpu = torch.cuda.is_available() and not self.cfg.cpu
        if mode == "false" or (mode == "auto" and not on_gpu):
            return False
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        problem = device_decode.device_decode_works(device)
        if problem is None:
            logger.info(f"decoding training JPEGs on {device} (task.gpu_decode={mode}); data workers only read files")
            return True
        if mode == "true":
            raise RuntimeError(f"task.gpu_decode=true but torchvision cannot decode JPEGs on {device} ({problem}); "
                               "install a torchvision build with image support matching your torch, or set "
                               "task.gpu_decode=false to decode in the data workers")
        logger.warning(f"torchvision cannot decode JPEGs on {device} ({problem}): decoding in the data workers "
                       "(task.gpu_decode=auto)")
        return False

    def _images(self, train: bool):
        if self.input_size is None:
            raise RuntimeError("build the model before loading datasets: the crop size comes from the teacher")
        return image_data.ImageListDataset(self.image_paths, self.input_size, train=train,
                                           scale=(self.cfg.crop_scale_min, 1.0),
                                           max_bad_fraction=self.cfg.max_bad_image_fraction, seed=self.cfg.seed,
                                           device_decode=train and self.use_device_decode())

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        if split == "train":
            self.datasets[split] = ImageFairseqDataset(self._images(train=True))
        else:
            self.datasets[split] = ValidRound(self._images(train=False), self.cfg.valid_kd_images)
        return self.datasets[split]

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

    def _evaluate(self, feature_fn, model, on_embedded=None):
        layer = self.cfg.retrieval_layer
        return evaluate_retrieval(lambda x: feature_fn(x, layer=layer), self.retrieval_sets,
                                  progress=retrieval_progress(self.cfg.retrieval_progress), on_embedded=on_embedded,
                                  **self.evaluation_settings(model))

    def write_protocol(self, model, with_teacher: bool) -> None:
        """``SAVE_DIR/eval_protocol.json``: how this run's validation metrics are computed (rank 0 only)."""
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if not rank0 or not self.cfg.save_dir:
            return
        settings, layer = self.evaluation_settings(model), self.cfg.retrieval_layer
        distiller = model.distiller

        def record(who, blocks, weights, final_norm):
            return evaluation_protocol(self.retrieval_sets, **settings, layer=layer, weights=weights, model=who,
                                       blocks=len(blocks), block=block_index(layer, len(blocks)) + 1,
                                       final_norm=final_norm)

        write_json(Path(self.cfg.save_dir) / "eval_protocol.json", {
            "written_at_update": completed_updates(),
            "metrics": "valid_<name> in fairseq's log; the teacher's with a teacher_ prefix",
            "student": record("student", distiller.student_blocks, "student", distiller.student_norm is not None),
            "teacher": record("teacher", distiller.teacher_blocks, self.teacher_weights or "model", False)
            if with_teacher else None,
        })

    def _example_writer(self, step):
        """Draws the first retrieval set's fixed queries and neighbours (rank 0 only) from embeddings the
        evaluation computes anyway."""
        first = next(iter(self.retrieval_sets))
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if self.cfg.retrieval_examples <= 0 or not rank0 or not self.cfg.save_dir:
            return None

        def write(name, data, train, test):
            if name == first:
                folder = Path(self.cfg.save_dir)
                path = save_examples(folder / "retrieval_examples" / f"update_{step:06d}.png", name, data, train,
                                     test, count=self.cfg.retrieval_examples, step=step)
                shutil.copyfile(path, folder / "retrieval_examples.png")

        return write

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.retrieval_sets:  # ``model`` may be fairseq's distributed wrapper: it forwards attributes
            with torch.inference_mode():
                student = self._evaluate(model.forward_features, model,
                                         on_embedded=self._example_writer(completed_updates()))
                with_teacher = self.cfg.retrieval_teacher and model.distiller.teacher_blocks is not None
                if with_teacher and self.teacher_metrics is None:
                    self.teacher_metrics = self._evaluate(model.teacher_features, model)
            if not self.protocol_written:
                self.write_protocol(model, with_teacher)
                self.protocol_written = True
            logging_output.update({k: float(v) for k, v in student.items()})
            logging_output.update({f"teacher_{k}": float(v) for k, v in (self.teacher_metrics or {}).items()})
            logging_output["retrieval_rounds"] = 1
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        rounds = sum(log.get("retrieval_rounds", 0) for log in logging_outputs)
        if not rounds:
            return
        names = sorted({k for log in logging_outputs for k, v in log.items() if k.startswith(self.metric_prefixes)})
        for name in names:
            value = sum(float(log.get(name, 0.0)) for log in logging_outputs) / rounds
            metrics.log_scalar(name, value, weight=1, priority=300 if name.startswith("teacher_") else 250, round=2)


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
    if str(cfg.retrieval_pooling) in ("cls", "cls+mean") and model.num_extra_tokens < 1:
        raise ValueError(f"task.retrieval_pooling={cfg.retrieval_pooling}, but the teacher's encoder has no extra "
                         "(CLS) token; use task.retrieval_pooling=mean (or auto)")


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


def gpu_decode_mode(value) -> str:
    """``task.gpu_decode`` as ``auto``, ``true`` or ``false`` (Hydra may pass true/false as booleans)."""
    mode = str(value).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"task.gpu_decode={value!r} must be auto (decode on the GPU when training on one), true or "
                         "false")
    return mode


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


def load_retrieval_sets(cfg: D2vKDTaskConfig) -> dict:
    """Read every configured retrieval set into memory now, so missing files fail before training."""
    limit = cfg.retrieval_limit or None
    sets = {}
    for name in ("cifar10", "cifar100"):
        root = getattr(cfg, f"{name}_root")
        if root:
            sets[name] = load_cifar(os.path.expanduser(root), name, limit=limit)
    if cfg.retrieval_folder:
        folder = os.path.expanduser(cfg.retrieval_folder)
        sets[folder_set_name(folder)] = load_image_folder_pair(folder, limit=limit)
    if not sets:
        raise ValueError("task.retrieval=true but no retrieval data is configured: set task.cifar10_root and/or "
                         "task.cifar100_root (download with scripts/prepare_data.py --cifar DIR) or "
                         "task.retrieval_folder, or turn validation retrieval off with task.retrieval=false")
    return sets
