"""Standalone retrieval and k-NN evaluator for a data2vec 2.0 teacher or a distilled student checkpoint, of any
modality.

    python -m fairseq_mmkd.retrieval --checkpoint base_imagenet.pt --teacher --cifar10 DATA --cifar100 DATA
    python -m fairseq_mmkd.retrieval --checkpoint checkpoints/checkpoint_best.pt --cifar10 DATA --json out.json
    python -m fairseq_mmkd.retrieval --checkpoint nlp_base.pt --teacher --folder SST-2-bin
    python -m fairseq_mmkd.retrieval --checkpoint base_libri.pt --teacher --folder commands
    python -m fairseq_mmkd.retrieval --checkpoint kd_image_text/checkpoint_best.pt --pairs dataset_coco.json \
        --save-embeddings E.npz [--cifar10 DATA --zeroshot]

``--folder`` takes a labelled set of the model's modality (image folders, a GLUE-style text folder, or wav2vec
manifests with labels; ``retrieval.folders``); ``--cifar10``/``--cifar100`` are for image models.

It runs ``evaluate_retrieval``, the same function the fairseq task validates with, prints a table and
optionally writes one JSON object: the metrics (names as in training logs), what was evaluated, and under
``"protocol"`` how (``evaluation_protocol``: pooling, layer, standardisation, k, T, votes, resize and
normalisation, splits and sizes, weights, dtype).
Problems with the inputs end in a single ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .cli import (DTYPES, UsageError, add_data_arguments, add_model_arguments, add_run_arguments, cli_main, fit_sets,
                  load_encoder, load_sets, non_negative_int, positive_float, record_set_sizes, resolve_device,
                  resolve_pooling)
from .evaluate import evaluate_retrieval, evaluation_protocol, metric_names
from .pairs_cli import add_pair_arguments, run_pairs
from .search import BACKENDS

__all__ = ["UsageError", "build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_mmkd.retrieval",
        description="Zero-shot retrieval accuracy (top-1/top-3, both directions) and k-NN accuracy (DINO-weighted "
                    "and uniform vote) on CIFAR-10/100 or a labelled image, text or audio folder of a data2vec 2.0 "
                    "teacher (--teacher) or a student checkpoint of this plugin.")
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--knn-k", type=non_negative_int, default=20,
                   help="neighbours voting in the k-NN metrics (DINO's kNN-20); 0: no k-NN metrics")
    p.add_argument("--knn-temperature", type=positive_float, default=0.07,
                   help="T of the weighted vote, exp(cosine / T) (DINO: 0.07)")
    p.add_argument("--standardize", action="store_true",
                   help="standardise embeddings with the memory bank's per-dimension mean/std before L2 "
                        "normalisation (MIM-Refiner)")
    add_pair_arguments(p)
    add_run_arguments(p)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="nearest-neighbour search backend")
    return p


def format_table(metrics: Dict[str, float], sets: Dict[str, object], knn_k: int = 20) -> str:
    names = ["top1", "top3", "inv_top1", "inv_top3"] + ([f"knn{knn_k}", f"knn{knn_k}_uniform"] if knn_k else [])
    width = max(8, *(len(n) for n in sets))
    lines = [f"{'set':<{width}} {'train':>7} {'test':>7} " + " ".join(f"{n:>{max(8, len(n))}}" for n in names)]
    for set_name, data in sets.items():
        values = [metrics[f"{set_name}_{n}"] for n in names]
        lines.append(f"{set_name:<{width}} {data.num_train:>7} {data.num_test:>7} "
                     + " ".join(f"{v:>{max(8, len(n))}.2f}" for n, v in zip(names, values)))
    return "\n".join(lines)


def run(args) -> Dict[str, object]:
    if args.pairs or args.zeroshot:
        return run_pairs(args)
    device, dtype_name = resolve_device(args)
    sets = load_sets(args)  # before the model: data errors are found without loading a large checkpoint
    encoder = load_encoder(args, device)
    fit_sets(sets, encoder, args)
    pooling = resolve_pooling(args.pooling, encoder, args.checkpoint, sets)
    settings = dict(input_size=encoder.input_size, num_extra_tokens=encoder.num_extra_tokens, pooling=pooling,
                    device=device, dtype=DTYPES[dtype_name], backend=args.backend, knn_k=args.knn_k,
                    knn_temperature=args.knn_temperature, standardize=args.standardize)
    start = time.perf_counter()
    metrics = evaluate_retrieval(encoder.feature_fn, sets, batch_size=args.batch_size,
                                 progress=not args.no_progress, **settings)
    seconds = time.perf_counter() - start
    print(format_table(metrics, sets, args.knn_k))

    result: Dict[str, object] = {name: metrics[name] for set_name in sets
                                 for name in metric_names(set_name, knn_k=args.knn_k)}
    result.update(checkpoint=str(Path(args.checkpoint).resolve()), model=encoder.model, modality=encoder.modality,
                  pooling=pooling, layer=args.layer, device=device, dtype=dtype_name, limit=args.limit,
                  seconds=round(seconds, 2), weights=encoder.weights)
    if encoder.input_size is not None:
        result["input_size"] = int(encoder.input_size)
    record_set_sizes(result, sets, encoder.modality)
    result["protocol"] = evaluation_protocol(sets, **settings, layer=args.layer, weights=encoder.weights,
                                             checkpoint=result["checkpoint"], **encoder.describe(args.layer))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
