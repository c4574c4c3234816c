"""What the evaluation command lines share: their arguments, loading a checkpoint as a frozen feature function,
reading the labelled sets (CIFAR, and a ``--folder`` of any modality: images, GLUE-style text, labelled audio),
fitting them to the model, and writing JSON results.

Used by ``python -m fairseq_mmkd.retrieval`` and ``python -m fairseq_mmkd.probe``. The checkpoint loaders are
imported inside ``load_encoder``, so this module (like the rest of the package) imports nothing of fairseq.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional

import torch

from ..files import write_json
from .evaluate import POOLINGS
from .sets.base import RetrievalSet
from .sets.cifar import load_cifar
from .sets.folders import KINDS, fit_teacher, load_retrieval_folder, teacher_facts
from .sets.image_folder import folder_set_name

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
DATA_HINT = "get CIFAR with `python scripts/prepare_data.py --cifar DIR`"


class UsageError(Exception):
    """A combination of arguments that cannot work, reported as one line."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def negative_int(text: str) -> int:
    value = int(text)
    if value > -1:
        raise argparse.ArgumentTypeError(f"must be -1 (the last block) or -k (the k-th from last), got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, default_pooling: Optional[str] = None) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--teacher", action="store_true",
                   help="the checkpoint is a data2vec 2.0 model (data2vec_multi, any modality), not a student of "
                        "this plugin")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="teacher only: online weights or the EMA teacher stored in the checkpoint")
    p.add_argument("--modality", choices=("image", "text", "audio"),
                   help="which modality of a multimodal checkpoint: an exported multimodal student or teacher "
                        "(--teacher), or a d2v_kd_multimodal training checkpoint (default: the checkpoint's own)")
    p.add_argument("--pooling", choices=("auto",) + POOLINGS, default=default_pooling,
                   help="embedding: the CLS token (text: the <s> token), the mean of the other tokens (padding left "
                        "out), both concatenated, or auto (cls when the model has a CLS token, else mean); default: "
                        "cls for images, mean for text and audio")
    p.add_argument("--layer", type=negative_int, default=-1,
                   help="block whose output is embedded: -1 the last (default), -k the k-th from last")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cifar10", metavar="DIR", help="directory holding cifar-10-batches-py/")
    p.add_argument("--cifar100", metavar="DIR", help="directory holding cifar-100-python/")
    p.add_argument("--folder", "--custom", dest="folder", metavar="DIR",
                   help="a labelled set of the model's modality: image folders DIR/train/<class>/*, "
                        "DIR/test/<class>/*; "
                        "a GLUE-style text folder DIR/input0, DIR/label (fairseq-preprocess output, train and valid); "
                        "or an audio folder DIR/train.tsv, valid.tsv (wav2vec manifests) with train.label, valid.label")
    p.add_argument("--folder-name", "--custom-name", dest="folder_name",
                   help="metric prefix of the --folder set (default: the folder's name, as task.retrieval_folder)")
    p.add_argument("--folder-size", "--custom-size", dest="folder_size", type=positive_int, default=224,
                   help="square size the --folder images are stored at after decoding")
    p.add_argument("--max-length", type=positive_int,
                   help="text/audio: cut longer items to this many tokens or samples (default: text, the model's "
                        "positions; audio, the teacher's pretraining crop max_sample_size when it is known)")
    p.add_argument("--normalize", choices=("auto", "true", "false"), default="auto",
                   help="audio: normalise each clip to zero mean and unit variance (auto: as the teacher was trained, "
                        "task.normalize)")
    p.add_argument("--limit", type=positive_int,
                   help="use only N items of each split, evenly spaced (CIFAR: the first N; quick checks)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype; default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--json", metavar="OUT", help="also write the results and their protocol to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_sets(args) -> Dict[str, RetrievalSet]:
    """The sets named on the command line, read into memory (before any model is loaded)."""
    from .evaluate import SET_NAME

    if not (args.cifar10 or args.cifar100 or args.folder):
        raise UsageError(f"pass at least one of --cifar10 DIR, --cifar100 DIR (or --folder DIR); {DATA_HINT}")
    folder_name = None
    if args.folder:
        folder_name = args.folder_name or folder_set_name(args.folder)
        if not SET_NAME.fullmatch(folder_name):
            raise UsageError(f"--folder-name {folder_name!r} prefixes metric names: use letters, digits, '_' or '-'")
        if folder_name in ("cifar10", "cifar100") and getattr(args, folder_name):
            raise UsageError(f"--folder would be named {folder_name!r} like the CIFAR set; pass --folder-name NAME")
    sets = {}
    if args.cifar10:
        sets["cifar10"] = load_cifar(args.cifar10, "cifar10", limit=args.limit)
    if args.cifar100:
        sets["cifar100"] = load_cifar(args.cifar100, "cifar100", limit=args.limit)
    if args.folder:
        # Read now without the model's facts (errors in the data before a large checkpoint is loaded); fit_sets
        # checks the modality and fits text and audio sets once the model is known.
        sets[folder_name] = load_retrieval_folder(args.folder, limit=args.limit, image_size=args.folder_size)
    return sets


def _set_option(name: str) -> str:
    return f"--{name}" if name in ("cifar10", "cifar100") else "--folder"


def fit_sets(sets: Dict[str, object], encoder: "Encoder", args) -> None:
    """Check every set against the model's modality and fit text and audio sets to it (dictionary, positions,
    receptive field, normalisation); one-line errors."""
    for name, data in sets.items():
        if data.modality != encoder.modality:
            if name in ("cifar10", "cifar100") and not (args.folder and name == args.folder_name):
                given, hint = f"--{name} is an image set", "--cifar10/--cifar100 evaluate image models only; "
            else:
                given, hint = f"--folder {args.folder} is {KINDS[data.modality]}", ""
            raise UsageError(f"{given}, but {args.checkpoint} is a {encoder.modality} model; {hint}give "
                             f"{KINDS[encoder.modality]} with --folder DIR")
        fit_teacher(data, what=_set_option(name), **encoder.facts)


def resolve_device(args) -> tuple:
    """(device, dtype name) from ``--device`` and ``--dtype``."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but PyTorch sees no CUDA device; use --device cpu")
    return device, args.dtype or ("bfloat16" if device == "cuda" else "float32")


@dataclass
class Encoder:
    """A checkpoint's encoder as evaluation sees it."""

    # images: normalised images -> [B, T, D] tokens of the chosen block; text/audio: (source, padding_mask) ->
    # ([B, T, D] tokens, [B, T] padding mask or None)
    feature_fn: Callable
    input_size: Optional[int]  # images only
    num_extra_tokens: int
    depth: int  # blocks after the shared encoder (the teacher's shared blocks or the student's)
    model: str  # "teacher" or "student"
    weights: str  # "model" / "ema" (teacher) or "student"
    final_norm: bool  # whether a final LayerNorm follows the chosen block (pre-LN models)
    modality: str = "image"
    facts: Optional[dict] = None  # what a text/audio set must fit (folders.teacher_facts), with the CLI's overrides

    def describe(self, layer: int) -> dict:
        return {"model": self.model, "blocks": self.depth, "block": self.depth + layer + 1,
                "final_norm": self.final_norm}


def load_encoder(args, device) -> Encoder:
    """The checkpoint as a frozen, eval-mode feature function of block ``args.layer``."""
    from ..distill.distiller import block_features, block_index

    if args.teacher:
        from ..d2v.loading import load_d2v
        model = load_d2v(args.checkpoint, weights=args.weights, device=device, trust_checkpoint=args.trust_checkpoint,
                         modality=getattr(args, "modality", None))
        cfg, task_cfg = model.cfg, model.fairseq_task_cfg

        if cfg.modality == "image":
            def feature_fn(x):  # at layer -1 the same as model(x)["x"]
                return block_features(model.blocks, model.encoder(x), cfg.num_heads, args.layer, model.norm)
        else:
            def feature_fn(source, padding_mask):  # at layer -1 the same as model(source, padding_mask)["x"]
                enc = model.encoder(source, padding_mask)
                return block_features(model.blocks, enc, cfg.num_heads, args.layer, model.norm), enc.padding_mask

        encoder = Encoder(feature_fn, None, model.num_extra_tokens, len(model.blocks), "teacher", args.weights,
                          model.norm is not None)
    else:
        from ..models._student import load_student  # imported here: the teacher path does not need the KD model
        model = load_student(args.checkpoint, device=device, trust_checkpoint=args.trust_checkpoint)
        model.eval()
        model = student_of_modality(model, getattr(args, "modality", None), args.checkpoint)
        distiller = model.distiller
        cfg, task_cfg = distiller.cfg, getattr(model, "teacher_task_cfg", None)
        feature_fn = (partial(model.forward_features, layer=args.layer) if cfg.modality == "image" else
                      partial(distiller.features, layer=args.layer))
        encoder = Encoder(feature_fn, None, model.num_extra_tokens, len(distiller.student_blocks), "student",
                          "student", distiller.student_norm is not None)
    encoder.modality = cfg.modality
    encoder.input_size = cfg.encoder.input_size if cfg.modality == "image" else None
    encoder.facts = _facts(args, cfg, task_cfg)
    try:
        block_index(args.layer, encoder.depth)
    except ValueError as e:
        raise UsageError(f"--layer {args.layer}: the {encoder.model} has {encoder.depth} blocks ({e})") from None
    return encoder


def student_of_modality(model, modality: Optional[str], checkpoint):
    """What evaluation reads of a student for ``--modality``: a multimodal student's ``modality_model`` (the option
    is required when it has several), or a single-modality student, which must be of that modality."""
    if hasattr(model, "modality_model"):
        have = list(model.modalities)
        if modality is None and len(have) == 1:
            modality = have[0]
        if modality is None:
            raise UsageError(f"{checkpoint}: is a multimodal student ({', '.join(have)}); choose one with --modality "
                             f"{'|'.join(have)}")
        if modality not in have:
            raise UsageError(f"--modality {modality}: {checkpoint} is a multimodal student of {', '.join(have)}; "
                             f"pass --modality {'|'.join(have)}")
        return model.modality_model(modality)
    own = model.distiller.cfg.modality
    if modality is not None and modality != own:
        raise UsageError(f"--modality {modality}: {checkpoint} is a {own} student; drop --modality or pass {own}")
    return model


def _facts(args, cfg, task_cfg) -> dict:
    """``teacher_facts`` with ``--max-length`` and ``--normalize`` applied."""
    facts = teacher_facts(cfg, task_cfg)
    max_length = getattr(args, "max_length", None)
    if max_length is not None and cfg.modality != "image":
        positions = facts.get("max_length") if cfg.modality == "text" else None
        if positions is not None and max_length > positions:
            raise UsageError(f"--max-length {max_length}: the model has {positions} positions; use at most {positions}")
        facts["max_length"] = max_length
    normalize = getattr(args, "normalize", "auto")
    if cfg.modality == "audio":
        if normalize != "auto":
            facts["normalize"] = normalize == "true"
        elif facts.get("normalize") is None:
            raise UsageError(f"{args.checkpoint} does not say whether its teacher was trained on normalised clips "
                             "(task.normalize); pass --normalize true (data2vec 2.0's released audio models) or false")
    return facts


def resolve_pooling(pooling: Optional[str], encoder: Encoder, checkpoint, sets: Optional[dict] = None) -> str:
    """``--pooling`` for this model and these sets: the default (None) is the sets' ``default_pooling`` (images:
    cls; text and audio: mean), ``auto`` cls when the model has a CLS token; ``cls`` without one is an error except
    for text, whose every sequence starts with ``<s>``."""
    sets = sets or {}
    if pooling is None:
        defaults = {getattr(data, "default_pooling", "cls") for data in sets.values()}
        pooling = defaults.pop() if len(defaults) == 1 else "cls"
    if pooling == "auto":
        return "cls" if encoder.num_extra_tokens > 0 else "mean"
    leading = bool(sets) and all(getattr(data, "leading_token", None) for data in sets.values())
    if pooling in ("cls", "cls+mean") and encoder.num_extra_tokens < 1 and not leading:
        raise UsageError(f"{checkpoint}: the model has no extra (CLS) token; use --pooling mean")
    return pooling


def record_set_sizes(result: dict, sets: Dict[str, RetrievalSet], modality: str) -> None:
    """``<set>_train_images`` / ``<set>_test_images`` (``_items`` for text and audio) into a ``--json`` result."""
    items = "images" if modality == "image" else "items"
    for name, data in sets.items():
        result[f"{name}_train_{items}"] = data.num_train
        result[f"{name}_test_{items}"] = data.num_test


def cli_main(build_parser: Callable[[], argparse.ArgumentParser], run: Callable, argv=None) -> int:
    """Run a CLI (``run`` returns its result, which ``--json`` writes): every problem the user can fix is one
    ``error:`` line and exit status 2, not a traceback."""
    from ..d2v.loading import CheckpointError
    from ..data.image import ImageDataError
    from ..data.pairs import PairsError
    from ..data.text import TextDataError
    from .sets.base import RetrievalDataError

    args = build_parser().parse_args(argv)
    try:
        result = run(args)
        if args.json:
            print(f"wrote {write_json(args.json, result)}")
    # Each of these carries a complete message; OSError covers e.g. an unwritable --json path.
    except (UsageError, CheckpointError, RetrievalDataError, PairsError, TextDataError, ImageDataError, OSError) as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

