"""Standalone retrieval evaluator for a data2vec 2.0 teacher or a distilled student checkpoint.

    python -m fairseq_mmkd.retrieval --checkpoint base_imagenet.pt --teacher --cifar10 DATA --cifar100 DATA
    python -m fairseq_mmkd.retrieval --checkpoint checkpoints/checkpoint_best.pt --cifar10 DATA --json out.json

It runs ``evaluate_retrieval``, the same function the fairseq task validates with, prints a table and
optionally writes one flat JSON object (metric names as in training logs, plus what was evaluated).
Problems with the inputs end in a single ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..checkpoint import CheckpointError
from .cifar import load_cifar
from .evaluate import POOLINGS, SET_NAME, evaluate_retrieval, metric_names
from .image_folder import load_image_folder_pair
from .search import BACKENDS
from .sets import RetrievalDataError

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """A combination of arguments that cannot work, reported as one line."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_mmkd.retrieval",
        description="Zero-shot retrieval accuracy (top-1/top-3, both directions) on CIFAR-10/100 "
                    "of a data2vec 2.0 teacher (--teacher) or a student checkpoint of this plugin.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--teacher", action="store_true",
                   help="the checkpoint is a data2vec 2.0 model (data2vec_multi), not a student of this plugin")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="teacher only: online weights or the EMA teacher stored in the checkpoint")
    p.add_argument("--cifar10", metavar="DIR", help="directory holding cifar-10-batches-py/")
    p.add_argument("--cifar100", metavar="DIR", help="directory holding cifar-100-python/")
    p.add_argument("--custom", metavar="DIR", help="labelled image folders DIR/train/<class>/*, DIR/test/<class>/*")
    p.add_argument("--custom-name", default="custom", help="metric prefix of the --custom set")
    p.add_argument("--custom-size", type=_positive_int, default=224,
                   help="square size the --custom images are stored at after decoding")
    p.add_argument("--pooling", choices=POOLINGS, default="cls",
                   help="image embedding: the CLS token or the mean of the patch tokens")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--limit", type=_positive_int, help="use only the first N images of each split (quick checks)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype; default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="nearest-neighbour search backend")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _load_sets(args) -> Dict[str, object]:
    sets = {}
    if args.cifar10:
        sets["cifar10"] = load_cifar(args.cifar10, "cifar10", limit=args.limit)
    if args.cifar100:
        sets["cifar100"] = load_cifar(args.cifar100, "cifar100", limit=args.limit)
    if args.custom:
        sets[args.custom_name] = load_image_folder_pair(args.custom, image_size=args.custom_size, limit=args.limit)
    return sets


def _load_model(args, device):
    """(feature_fn, input_size, num_extra_tokens) of the checkpoint's encoder."""
    if args.teacher:
        from ..checkpoint import load_d2v_image
        model = load_d2v_image(args.checkpoint, weights=args.weights, device=device,
                               trust_checkpoint=args.trust_checkpoint)
        return (lambda x: model(x)["x"]), model.cfg.encoder.input_size, model.num_extra_tokens
    from ..kd_model import load_student  # imported here: the teacher path does not need the KD model
    model = load_student(args.checkpoint, device=device, trust_checkpoint=args.trust_checkpoint)
    model.eval()
    return model.forward_features, model.input_size, model.num_extra_tokens


def format_table(metrics: Dict[str, float], sets: Dict[str, object]) -> str:
    names = ["top1", "top3", "inv_top1", "inv_top3"]
    width = max(8, *(len(n) for n in sets))
    lines = [f"{'set':<{width}} {'train':>7} {'test':>7} " + " ".join(f"{n:>8}" for n in names)]
    for set_name, data in sets.items():
        values = [metrics[f"{set_name}_{n}"] for n in names]
        lines.append(f"{set_name:<{width}} {data.num_train:>7} {data.num_test:>7} "
                     + " ".join(f"{v:>8.2f}" for v in values))
    return "\n".join(lines)


def run(args) -> Dict[str, object]:
    if not (args.cifar10 or args.cifar100 or args.custom):
        raise UsageError("pass at least one of --cifar10 DIR, --cifar100 DIR (or --custom DIR); "
                         "get CIFAR with `python scripts/prepare_data.py --cifar DIR`")
    if args.custom and not SET_NAME.fullmatch(args.custom_name):
        raise UsageError(f"--custom-name {args.custom_name!r} prefixes metric names: use letters, digits, '_' or '-'")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but PyTorch sees no CUDA device; use --device cpu")
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")

    sets = _load_sets(args)  # before the model: data errors are found without loading a large checkpoint
    feature_fn, input_size, num_extra_tokens = _load_model(args, device)
    if args.pooling == "cls" and num_extra_tokens < 1:
        raise UsageError(f"{args.checkpoint}: the model has no extra (CLS) token; use --pooling mean")
    start = time.perf_counter()
    metrics = evaluate_retrieval(feature_fn, sets, input_size=input_size, num_extra_tokens=num_extra_tokens,
                                 pooling=args.pooling, batch_size=args.batch_size, device=device,
                                 dtype=DTYPES[dtype_name], backend=args.backend, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(format_table(metrics, sets))

    result: Dict[str, object] = {name: metrics[name] for set_name in sets for name in metric_names(set_name)}
    result.update(checkpoint=str(Path(args.checkpoint).resolve()), model="teacher" if args.teacher else "student",
                  pooling=args.pooling, input_size=int(input_size), device=device, dtype=dtype_name,
                  limit=args.limit, seconds=round(seconds, 2))
    if args.teacher:
        result["weights"] = args.weights
    for set_name, data in sets.items():
        result[f"{set_name}_train_images"] = data.num_train
        result[f"{set_name}_test_images"] = data.num_test
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    # Each of these carries a complete message; OSError covers e.g. an unwritable --json path.
    except (UsageError, CheckpointError, RetrievalDataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
