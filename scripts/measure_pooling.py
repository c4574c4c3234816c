#!/usr/bin/env python
"""Which pooling should text and audio retrieval use by default? Measured, on the demos' labelled sets.

    python scripts/measure_pooling.py                       # random teachers, 3 seeds, tiny and base sizes
    python scripts/measure_pooling.py --trained-steps 3000  # also a small text teacher pretrained by fairseq's
                                                            # own data2vec 2.0 code on the demo corpus

Text: the text demo's retrieval folder (standard-library docstring paragraphs labelled by module, GLUE layout,
``scripts/demo_text.py``). Audio: the audio demo's (eight kinds of synthesised clips, ``scripts/demo_audio.py``).
Each teacher is a data2vec 2.0 model written by the plugin in fairseq's format (``save_d2v_checkpoint``) and read
back with ``load_d2v``, then evaluated through ``evaluate_retrieval`` (exact cosine search; train as memory, valid
as queries) with ``mean`` (valid positions) and ``cls`` (text: the ``<s>`` position; audio: an extra token, so the
audio teachers here get one, which the released audio models do not have).

Random teachers are a weak proxy for a pretrained one: a random network's mean over positions is close to a
bag of its input embeddings, which is already a decent topic signal, while a random first position only holds
what random attention mixed into it. ``--trained-steps`` pretrains a small text teacher with fairseq's own
data2vec 2.0 (``fairseq_mmkd/testing/fairseq_reference.py`` copies and patches ``examples/data2vec`` at run time) on the text
demo's training corpus: still tiny and short, but trained with the real objective on real text.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/fairseq_mmkd_pooling", help="where the demo data and teachers go")
    p.add_argument("--seeds", type=int, default=3, help="random teachers per size")
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=("tiny", "base"),
                   help="tiny: 4 blocks of 128; base: 12 blocks of 768 (data2vec 2.0 base)")
    p.add_argument("--modalities", nargs="+", default=["text", "audio"], choices=("text", "audio"))
    p.add_argument("--trained-steps", type=int, default=0,
                   help="also pretrain a small text teacher with fairseq's data2vec 2.0 for this many updates")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


SIZES = {"tiny": dict(embed_dim=128, depth=4, num_heads=4), "base": dict(embed_dim=768, depth=12, num_heads=12)}


def bert_init_(model, seed: int) -> None:
    """fairseq's ``init_bert_params`` (what data2vec 2.0 starts from): normal(0, 0.02) linear and embedding
    weights, zero biases, the padding row zero."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
        for name, p in model.named_parameters():
            if name.endswith("extra_tokens"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def random_teacher(path: Path, modality: str, size: str, seed: int, vocab: int = 0) -> Path:
    import torch

    from fairseq_mmkd import D2vConfig, D2vModel
    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
    from fairseq_mmkd.encoders.audio import AudioEncoderConfig
    from fairseq_mmkd.encoders.text import TextEncoderConfig

    s = SIZES[size]
    if modality == "text":
        enc = TextEncoderConfig(vocab_size=vocab, max_source_positions=512, prenet_depth=0)
    else:  # data2vec 2.0 base audio, plus one extra token so that cls pooling has something to read
        enc = AudioEncoderConfig(prenet_depth=0, num_extra_tokens=1, alibi_heads=s["num_heads"],
                                 model_depth=s["depth"], conv_pos_groups=16)
    torch.manual_seed(seed)
    model = D2vModel(D2vConfig(modality=modality, norm_eps=1e-5, encoder=enc, **s)).eval()
    bert_init_(model, seed)
    task = model.encoder.fairseq_task_cfg(enc)
    save_d2v_checkpoint(model, path, task_cfg=task)
    return path


def evaluate(path: Path, folder: str, knn_k: int) -> dict:
    from fairseq_mmkd import load_d2v
    from fairseq_mmkd.distill.distiller import block_features
    from fairseq_mmkd.retrieval import evaluate_retrieval, load_retrieval_folder, teacher_facts

    model = load_d2v(path)
    facts = teacher_facts(model.cfg, model.fairseq_task_cfg)
    data = load_retrieval_folder(folder, **facts)

    def feature_fn(source, padding_mask):
        enc = model.encoder(source, padding_mask)
        return block_features(model.blocks, enc, model.cfg.num_heads, -1, model.norm), enc.padding_mask

    out = {}
    for pooling in ("mean", "cls"):
        m = evaluate_retrieval(feature_fn, {"set": data}, num_extra_tokens=model.num_extra_tokens, pooling=pooling,
                               batch_size=32, device="cpu", progress=False, knn_k=knn_k, backend="torch")
        out[pooling] = {"top1": m["set_top1"], f"knn{knn_k}": m[f"set_knn{knn_k}"],
                        "inv_top1": m["set_inv_top1"]}
    return out


def trained_text_teacher(path: Path, data_bin: str, steps: int, seed: int = 0, lr: float = 1e-3) -> Path:
    """A small data2vec 2.0 text model pretrained by fairseq's own code (model, criterion, trainer, optimizer, EMA)
    on the demo corpus (real token blocks), with a schedule shortened to ``steps`` updates: lr ``lr`` after 5%
    warm-up, the EMA decay annealed from 0.998 to 0.9999 over the run (data2vec 2.0 text: 0.9999 to 0.99999 over
    100k updates, far too slow for a short run), saved by fairseq's trainer."""
    import numpy as np
    import torch

    from fairseq_mmkd.testing import fairseq_reference as ref
    from fairseq import tasks
    from fairseq.trainer import Trainer

    from fairseq_mmkd.data.text import load_dictionary, token_blocks

    positions, batch_size = 64, 32
    cfg = ref.make_config("text", **{
        "embed_dim": 128, "num_heads": 4, "depth": 4, "average_top_k_layers": 4, "max_source_positions": positions,
        "task.data": data_bin, "model.clone_batch": 4, "model.modalities.text.decoder.decoder_dim": 128,
        "model.modalities.text.decoder.decoder_layers": 2, "model.ema_decay": 0.998, "model.ema_end_decay": 0.9999,
        "model.ema_anneal_end_step": steps, "optimization.max_update": steps, "optimization.lr": [lr],
        "optimizer.groups.default.lr_float": lr,
        "optimizer.groups.default.lr_scheduler.warmup_updates": max(1, steps // 20)})
    torch.manual_seed(seed)
    np.random.seed(seed)  # fairseq draws masks with numpy
    task = tasks.setup_task(cfg.task)
    trainer = Trainer(cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion))
    dictionary = load_dictionary(data_bin)
    blocks = token_blocks(data_bin, "train", dictionary, positions)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with ref._fresh_fairseq_metrics():
        for step in range(steps):
            items = [blocks[int(i)] for i in rng.integers(0, len(blocks), batch_size)]
            source = torch.full((batch_size, max(len(t) for t in items)), dictionary.pad(), dtype=torch.long)
            for row, t in enumerate(items):
                source[row, :len(t)] = t
            ids = torch.arange(batch_size)
            out = trainer.train_step([{"id": ids, "net_input": {
                "source": source, "padding_mask": source.eq(dictionary.pad()), "id": ids}}])
            if step % 250 == 0 or step == steps - 1:
                loss = float(out["loss"]) if out else float("nan")
                print(f"  pretraining update {step + 1}/{steps}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
        trainer.consolidate_optimizer()
        trainer.save_checkpoint(str(path), {"train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": steps,
                                                               "shuffle": True}, "val_loss": None})
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from demo_audio import prepare_audio
    from demo_text import prepare_text

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    data = {}
    if "text" in args.modalities:
        data["text"] = prepare_text(out / "text")
    if "audio" in args.modalities:
        data["audio"] = prepare_audio(out / "audio")
    for modality in args.modalities:
        for size in args.sizes:
            for seed in range(args.seeds):
                start = time.perf_counter()
                path = random_teacher(out / f"{modality}_{size}_{seed}.pt", modality, size, seed,
                                      vocab=data.get("text", {}).get("VOCAB", 0))
                r = evaluate(path, data[modality]["RETRIEVAL"], args.knn_k)
                results[f"{modality} random {size} seed {seed}"] = r
                print(f"{modality} random {size} seed {seed}: {json.dumps(r)} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    if args.trained_steps and "text" in args.modalities:
        path = trained_text_teacher(out / "text_trained.pt", data["text"]["DATA"], args.trained_steps)
        r = evaluate(path, data["text"]["RETRIEVAL"], args.knn_k)
        results[f"text pretrained tiny ({args.trained_steps} updates)"] = r
        print(f"text pretrained: {json.dumps(r)}", flush=True)

    print(f"\n{'teacher':<40} {'pooling':>7} {'top1':>7} {'knn' + str(args.knn_k):>7} {'inv_top1':>8}")
    for name, r in results.items():
        for pooling, m in r.items():
            print(f"{name:<40} {pooling:>7} {m['top1']:>7.2f} {m[f'knn{args.knn_k}']:>7.2f} {m['inv_top1']:>8.2f}")
    print(f"\ncommand: python scripts/measure_pooling.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
