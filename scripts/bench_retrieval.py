#!/usr/bin/env python
"""Benchmark of retrieval validation: embedding throughput and exact top-k search time.

    python scripts/bench_retrieval.py                       # CIFAR-sized search: 50,000 x 10,000 x 768
    python scripts/bench_retrieval.py --memory 5000 --queries 1000 --dim 128 --images 64   # quick

Embedding: a randomly initialised data2vec2-shaped image model (sizes from the flags) embeds 32x32 uint8
images through ``fairseq_mmkd.retrieval.embed`` (batched resize and normalisation on the device); the
baseline is the same model fed by a per-image PIL pipeline (torchvision ``Resize``/``ToTensor``/``Normalize``),
as a ``Dataset`` + ``transform`` evaluation loop would do.

Search: ``topk_accuracy`` with faiss and with torch, against a naive per-query Python loop (one matrix-vector
product and a full argsort per query). The naive loop is timed on ``--naive-queries`` queries and
extrapolated linearly to all queries (it is linear in the number of queries). Every ratio is against a
baseline measured in the same run.

k-NN: what the k-NN metrics add to a validation's train -> test step. Retrieval alone (one search for
top-3, as before k-NN existed) against retrieval + kNN-``--knn-k`` from the same search (one search for
max(3, k) neighbours, then both votes), and against a separate second search for the k-NN neighbours.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark retrieval embedding and exact top-k search.")
    p.add_argument("--memory", type=int, default=50_000, help="memory-bank size N")
    p.add_argument("--queries", type=int, default=10_000, help="number of queries Q")
    p.add_argument("--dim", type=int, default=768, help="embedding size D")
    p.add_argument("--classes", type=int, default=100, help="classes of the synthetic embeddings")
    p.add_argument("--naive-queries", type=int, default=200, help="queries the naive loop is timed on")
    p.add_argument("--images", type=int, default=256, help="images to embed (0: skip the embedding benchmark)")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument("--input-size", type=int, default=224, help="model input size (32x32 images are resized to it)")
    p.add_argument("--embed-dim", type=int, default=192, help="model width")
    p.add_argument("--depth", type=int, default=4, help="shared transformer blocks")
    p.add_argument("--heads", type=int, default=3, help="attention heads")
    p.add_argument("--knn-k", type=int, default=20, help="k of the k-NN benchmark (0: skip it)")
    p.add_argument("--repeats", type=int, default=3, help="k-NN benchmark: fastest of this many interleaved runs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def bench_embedding(args, device, sync):
    import torch
    from PIL import Image
    from torchvision import transforms

    from fairseq_mmkd import D2vConfig, D2vModel
    from fairseq_mmkd.encoders.image import ImageEncoderConfig
    from fairseq_mmkd.retrieval import embed
    from fairseq_mmkd.retrieval.evaluate import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    cfg = D2vConfig(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
                    encoder=ImageEncoderConfig(input_size=args.input_size, patch_size=16, embed_dim=args.embed_dim,
                                               prenet_depth=1))
    model = D2vModel(cfg).eval().to(device)
    feature_fn = lambda x: model(x)["x"]  # noqa: E731
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    embed(feature_fn, images[:args.batch_size], args.input_size, 1, batch_size=args.batch_size, device=device,
          dtype=dtype, progress=False)  # warm-up
    _, batched_s = timed(lambda: embed(feature_fn, images, args.input_size, 1, batch_size=args.batch_size,
                                       device=device, dtype=dtype, progress=False), sync)

    to_pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    per_image = transforms.Compose([
        transforms.Resize(args.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def pil_loop():
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
        out = []
        with torch.inference_mode(), autocast:
            for lo in range(0, len(to_pil), args.batch_size):
                x = torch.stack([per_image(img) for img in to_pil[lo:lo + args.batch_size]]).to(device)
                out.append(feature_fn(x)[:, 0].float())
        return torch.cat(out)

    _, pil_s = timed(pil_loop, sync)
    _, prep_s = timed(lambda: [per_image(img) for img in to_pil], sync)
    print(f"\n[embedding] {args.images} images 32x32 -> {args.input_size}, model D={args.embed_dim} "
          f"depth={args.depth}+1 prenet, batch {args.batch_size}, {device}{' bf16' if dtype else ''}")
    print(f"  per-image PIL pipeline (baseline): {args.images / pil_s:9.1f} images/s "
          f"(of which PIL preprocessing alone: {args.images / prep_s:.0f} images/s)")
    print(f"  fairseq_mmkd.retrieval.embed:      {args.images / batched_s:9.1f} images/s   "
          f"x{pil_s / batched_s:.2f} vs baseline")


def naive_topk_hits(memory, memory_labels, queries, query_labels, ks):
    """One query at a time: similarities, full argsort, label check (the baseline)."""
    import numpy as np

    hits = {k: 0 for k in ks}
    for q, label in zip(queries, query_labels):
        order = np.argsort(-(memory @ q), kind="stable")
        for k in ks:
            hits[k] += bool((memory_labels[order[:k]] == label).any())
    return hits


def bench_search(args, device, sync):
    import torch
    import torch.nn.functional as F

    from fairseq_mmkd.retrieval import faiss_available, topk_accuracy

    ks = (1, 3)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(args.classes, args.dim, generator=gen)
    memory_labels = torch.randint(0, args.classes, (args.memory,), generator=gen)
    query_labels = torch.randint(0, args.classes, (args.queries,), generator=gen)
    memory = centers[memory_labels] + 3.0 * torch.randn(args.memory, args.dim, generator=gen)
    queries = centers[query_labels] + 3.0 * torch.randn(args.queries, args.dim, generator=gen)
    print(f"\n[search] memory N={args.memory:,} x queries Q={args.queries:,} x D={args.dim}, exact cosine top-{ks}")

    subset = min(args.naive_queries, args.queries)
    m_np = F.normalize(memory, dim=1).numpy()
    q_np = F.normalize(queries[:subset], dim=1).numpy()
    start = time.perf_counter()
    hits = naive_topk_hits(m_np, memory_labels.numpy(), q_np, query_labels[:subset].numpy(), ks)
    naive_s = (time.perf_counter() - start) * args.queries / subset
    naive_acc = {k: 100.0 * hits[k] / subset for k in ks}
    print(f"  naive per-query loop (baseline): {naive_s:8.2f} s  (timed on {subset} queries, extrapolated "
          f"x{args.queries / subset:.0f})  top1 on those {naive_acc[1]:.2f}%")

    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    mem_d, memlab_d, q_d, qlab_d = (t.to(device) for t in (memory, memory_labels, queries, query_labels))
    for backend in backends:
        acc, seconds = timed(lambda: topk_accuracy(mem_d, memlab_d, q_d, qlab_d, ks, backend=backend), sync)
        same = topk_accuracy(mem_d, memlab_d, q_d[:subset], qlab_d[:subset], ks, backend=backend)
        close = all(abs(same[k] - naive_acc[k]) < 1e-9 for k in ks)
        agree = "agrees with naive" if close else f"DIFFERS from naive: {same}"
        where = "gpu" if backend == "faiss" and device.type == "cuda" and _faiss_gpus() else device.type
        print(f"  {backend:>5} ({where}): {seconds:8.2f} s   x{naive_s / seconds:7.1f} vs naive   "
              f"top1 {acc[1]:.2f}%  top3 {acc[3]:.2f}%  ({agree} on the subset)")
    if not faiss_available():
        print("  faiss: not importable, skipped")


def synthetic_bank(args, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(args.classes, args.dim, generator=gen)
    memory_labels = torch.randint(0, args.classes, (args.memory,), generator=gen)
    query_labels = torch.randint(0, args.classes, (args.queries,), generator=gen)
    memory = centers[memory_labels] + 3.0 * torch.randn(args.memory, args.dim, generator=gen)
    queries = centers[query_labels] + 3.0 * torch.randn(args.queries, args.dim, generator=gen)
    return tuple(t.to(device) for t in (memory, memory_labels, queries, query_labels))


def bench_knn(args, device, sync):
    from fairseq_mmkd.retrieval import faiss_available, knn_accuracy, nearest_neighbours
    from fairseq_mmkd.retrieval.search import topk_hits

    memory, memory_labels, queries, query_labels = synthetic_bank(args, device)
    k, ks = args.knn_k, (1, 3)
    print(f"\n[knn] memory N={args.memory:,} x queries Q={args.queries:,} x D={args.dim}: the train -> test step of "
          f"one set, retrieval top-{ks} vs retrieval + kNN-{k} (weighted and uniform votes)")

    def retrieval_only(backend):
        return topk_hits(nearest_neighbours(memory, queries, max(ks), backend), memory_labels, query_labels, ks)

    def shared(backend):  # what evaluate_retrieval does: one search for max(3, k) neighbours
        nb = nearest_neighbours(memory, queries, max(max(ks), k), backend)
        return topk_hits(nb, memory_labels, query_labels, ks), knn_accuracy(nb, memory_labels, query_labels, k)

    def two_searches(backend):  # the obvious alternative: a second search for the k-NN neighbours
        hits = retrieval_only(backend)
        return hits, knn_accuracy(nearest_neighbours(memory, queries, k, backend), memory_labels, query_labels, k)

    for backend in ["torch"] + (["faiss"] if faiss_available() else []):
        variants = (("retrieval", retrieval_only), ("shared", shared), ("two", two_searches))
        times = {name: float("inf") for name, _ in variants}
        retrieval_only(backend)  # warm-up (first-call costs of faiss and torch)
        for _ in range(max(1, args.repeats)):  # interleaved, fastest kept: other jobs only ever slow a run down
            for name, fn in variants:
                result, seconds = timed(lambda: fn(backend), sync)
                times[name] = min(times[name], seconds)
                if name == "shared":
                    knn = result[1]
        nb = nearest_neighbours(memory, queries, max(max(ks), k), backend)
        votes = min(timed(lambda: knn_accuracy(nb, memory_labels, query_labels, k), sync)[1]
                    for _ in range(max(1, args.repeats)))
        added = times["shared"] / times["retrieval"] - 1
        print(f"  {backend:>5}: retrieval alone {times['retrieval']:7.2f} s | + kNN-{k} from the same search "
              f"{times['shared']:7.2f} s ({added:+.1%}; the two votes alone {votes * 1000:.1f} ms) | + kNN-{k} with a "
              f"second search {times['two']:7.2f} s (x{times['two'] / times['shared']:.2f} the shared step)   "
              f"kNN-{k} {knn['weighted']:.2f}% weighted, {knn['uniform']:.2f}% uniform")


def _faiss_gpus() -> int:
    from fairseq_mmkd.retrieval.search import _faiss

    faiss = _faiss()
    return faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if args.images > 0:
        bench_embedding(args, device, sync)
    bench_search(args, device, sync)
    if args.knn_k > 0:
        bench_knn(args, device, sync)
    return 0


if __name__ == "__main__":
    sys.exit(main())
