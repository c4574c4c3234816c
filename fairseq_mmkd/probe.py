"""Linear probe of a data2vec 2.0 teacher or a distilled student on CIFAR-10/100 and labelled folders (images;
for text and audio models a GLUE-style text folder or a labelled audio folder, embedded as retrieval embeds them).

    python -m fairseq_mmkd.probe --checkpoint base_imagenet.pt --teacher --cifar10 DATA --cifar100 DATA
    python -m fairseq_mmkd.probe --checkpoint checkpoints/kd_image/checkpoint_best.pt --cifar10 DATA --json out.json

Recipe: the frozen encoder embeds every train and test image once (eval mode, no augmentation, the retrieval
evaluation's preprocessing: resize to the model's input size, ImageNet normalisation); the features are
standardised with the train split's per-dimension mean and std; a multinomial logistic-regression head is
trained full-batch with L-BFGS on the device (``retrieval.linear``), its L2 strength picked from a small grid
by top-1 on a seeded 10% of the train split held out, then refitted on the whole train split and evaluated on
the test split: ``<set>_linear_top1``. Deterministic for a given ``--seed``.

This is a logistic regression on frozen, un-augmented features (like DINOv3's ``log_regression.py``), not the
MAE/DINO linear-probe protocol (SGD/LARS on augmented ImageNet crops for 90-100 epochs); see docs/evaluation.md.
Problems with the inputs end in a single ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .retrieval.cli import (DTYPES, UsageError, add_data_arguments, add_model_arguments, add_run_arguments, cli_main,
                            fit_sets, load_encoder, load_sets, positive_int, record_set_sizes, resolve_device,
                            resolve_pooling)
from .retrieval.evaluate import dtype_name, embed_split, standardize_embeddings
from .retrieval.linear import L2_GRID, linear_probe


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _l2(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"L2 strengths must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_mmkd.probe",
        description="Linear-probe top-1 (logistic regression on frozen, standardised features; L2 strength picked "
                    "on a held-out 10%% of train) of a data2vec 2.0 teacher (--teacher) or a student checkpoint.")
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--l2-grid", type=_l2, nargs="+", default=list(L2_GRID),
                   help="L2 strengths tried (on the mean cross-entropy; scikit-learn's C = 1 / (l2 * n))")
    p.add_argument("--held-out", type=_fraction, default=0.1, help="fraction of train held out to pick the L2")
    p.add_argument("--max-iter", type=positive_int, default=1000, help="L-BFGS iterations per fit (at most)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (the only randomness)")
    add_run_arguments(p)
    return p


def probe_protocol(args, encoder, pooling: str, dtype: str, device: str, sets) -> dict:
    return {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        **encoder.describe(args.layer),
        "weights": encoder.weights,
        "layer": args.layer,
        "pooling": pooling,
        "num_extra_tokens": encoder.num_extra_tokens,
        "features": "frozen encoder in eval mode, every item embedded once, no augmentation",
        "standardize": True,
        "standardize_statistics": "per-dimension mean and population std of the train split, applied to train "
                                  "and test",
        "head": "multinomial logistic regression (softmax over all classes, bias not penalised)",
        "objective": "mean cross-entropy + l2 / 2 * ||W||^2 (scikit-learn: C = 1 / (l2 * n))",
        "optimizer": f"L-BFGS, full batch, strong-Wolfe line search, float32, at most {args.max_iter} iterations",
        "l2_grid": sorted(set(args.l2_grid), reverse=True),
        "held_out_fraction": args.held_out,
        "selection": "best held-out top-1 (ties: the stronger L2), then refit on the whole train split",
        "seed": args.seed,
        "modality": encoder.modality,
        "input_size": encoder.input_size,
        "dtype": dtype,
        "device": device,
        "sets": {name: data.protocol(encoder.input_size) for name, data in sets.items()},
    }


def run(args) -> Dict[str, object]:
    device, dtype = resolve_device(args)
    sets = load_sets(args)  # before the model: data errors are found without loading a large checkpoint
    encoder = load_encoder(args, device)
    fit_sets(sets, encoder, args)
    pooling = resolve_pooling(args.pooling, encoder, args.checkpoint, sets)
    start = time.perf_counter()
    result: Dict[str, object] = {}
    details = {}
    kwargs = dict(input_size=encoder.input_size, num_extra_tokens=encoder.num_extra_tokens, pooling=pooling,
                  batch_size=args.batch_size, device=device, dtype=DTYPES[dtype], progress=not args.no_progress)
    for name, data in sets.items():
        train = embed_split(encoder.feature_fn, data, "train", desc=f"{name} train", **kwargs)
        test = embed_split(encoder.feature_fn, data, "test", desc=f"{name} test", **kwargs)
        train, test = standardize_embeddings(train, test)
        try:
            probe = linear_probe(train, data.train_labels, test, data.test_labels, l2_grid=args.l2_grid,
                                 held_out=args.held_out, seed=args.seed, max_iter=args.max_iter)
        except ValueError as e:  # e.g. a train split too small to hold anything out
            raise UsageError(f"{name}: {e}") from None
        result[f"{name}_linear_top1"] = probe.top1
        details[name] = {"l2": probe.l2, "held_out_top1": {f"{k:g}": v for k, v in probe.held_out_top1.items()},
                         "iterations": probe.iterations, "feature_dim": int(train.shape[1])}
    seconds = time.perf_counter() - start

    width = max(8, *(len(n) for n in sets))
    print(f"{'set':<{width}} {'train':>7} {'test':>7} {'l2':>8} {'held-out':>9} {'linear_top1':>12}")
    for name, data in sets.items():
        l2 = details[name]["l2"]
        held = details[name]["held_out_top1"][f"{l2:g}"]
        print(f"{name:<{width}} {data.num_train:>7} {data.num_test:>7} {l2:>8g} {held:>9.2f} "
              f"{result[name + '_linear_top1']:>12.2f}")

    result.update(checkpoint=str(Path(args.checkpoint).resolve()), model=encoder.model, weights=encoder.weights,
                  pooling=pooling, layer=args.layer, device=device, dtype=dtype, limit=args.limit,
                  seconds=round(seconds, 2))
    record_set_sizes(result, sets, encoder.modality)
    for name in sets:
        result[f"{name}_probe"] = details[name]
    result["protocol"] = probe_protocol(args, encoder, pooling, dtype_name(DTYPES[dtype]), device, sets)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
