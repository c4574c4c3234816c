#!/usr/bin/env python3
"""Benchmark of an image-text update (``kd_image_text``) against a ``kd_multimodal`` image + text update of the same
batch, and of zero-shot validation on a COCO-sized set, measured in the same run.

    python scripts/bench_image_text.py                                   # CPU, demo size: ~3 minutes on 2 cores
    python scripts/bench_image_text.py --update-benchmarks BENCHMARKS.md
    python scripts/bench_image_text.py --size base --device cuda --json $OUT/bench_image_text.json   # one GPU

Update: the same random image and text teachers, the same student (2 blocks at demo size; 6 at base size), the same
batch of pairs (``--batch`` images and one caption each). ``kd_multimodal`` runs one forward/backward per modality
(the regression terms alone); ``kd_image_text`` one forward of both, the regressions plus the contrastive term, one
backward, in turns so that one modality's activations are alive at a time (``backward_in_turns``: the captions'
embeddings first without autograd, then the images' pass, then the captions'). Each variant runs in its own process
(``--worker``): steps/s after warm-up, and peak memory (CPU: the process's peak RSS less its RSS once the models are
built, coarse, and the peak of the activations autograd saves for backward, exact; GPU:
``torch.cuda.max_memory_allocated``).

Validation: the zero-shot retrieval of ``--valid-images`` images with five captions each (COCO's 5,000 and 25,000 by
default) and the ranking, timed on this machine at this size, plus what the same work costs at base size on the
H200 of BENCHMARKS.md's GPU section (its measured student embedding rate, per token; a projection).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class SavedActivations:
    """Peak bytes of the tensors autograd keeps for backward (``saved_tensors_hooks``): the activation memory of a
    step, independent of the allocator's caching (which makes a CPU process's RSS a coarse measure)."""

    def __init__(self):
        self.now = self.peak = 0

    def pack(self, t):
        import weakref

        size = t.numel() * t.element_size()
        box = _Box(t)
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(box, self._release, size)
        return box

    def _release(self, size):
        self.now -= size

    @staticmethod
    def unpack(box):
        return box.t


class _Box:
    def __init__(self, t):
        self.t = t


def build(kind: str, teachers: dict, depth: int, device: str):
    """(model, criterion) of ``kd_image_text`` or ``kd_multimodal`` over the image and text teachers."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import fairseq_mmkd  # noqa: F401  (registers the plugin)
    from fairseq_mmkd import load_d2v
    from fairseq_mmkd.criterions.d2v_kd import D2vKDCriterionConfig
    from fairseq_mmkd.criterions.d2v_kd_image_text import D2vKDImageTextCriterion, D2vKDImageTextCriterionConfig
    from fairseq_mmkd.criterions.d2v_kd_multimodal import D2vKDMultimodalCriterion
    from fairseq_mmkd.models.d2v_kd_image_text import D2vKDImageTextModel, D2vKDImageTextModelConfig
    from fairseq_mmkd.models.d2v_kd_multimodal import D2vKDMultimodalModel, D2vKDMultimodalModelConfig

    loaded = {m: load_d2v(p, modality=m) for m, p in teachers.items()}
    task = SimpleNamespace(modality_weights={"image": 1.0, "text": 1.0, "audio": 1.0})
    if kind == "image_text":
        cfg = OmegaConf.structured(D2vKDImageTextModelConfig(student_depth=depth, student_init="random"))
        model = D2vKDImageTextModel(cfg, loaded)
        criterion = D2vKDImageTextCriterion(OmegaConf.structured(D2vKDImageTextCriterionConfig()), task)
    else:
        cfg = OmegaConf.structured(D2vKDMultimodalModelConfig(student_depth=depth, student_init="random"))
        model = D2vKDMultimodalModel(cfg, loaded)
        criterion = D2vKDMultimodalCriterion(OmegaConf.structured(D2vKDCriterionConfig()), task)
    return model.to(device).train(), criterion


def batch(prepared: dict, size: int, count: int, device: str) -> dict:
    """``count`` training pairs: images augmented as training does, one caption each."""
    import torch

    from fairseq_mmkd.data.captions import CaptionTokenizer, pad_captions
    from fairseq_mmkd.data.image import ImageListDataset
    from fairseq_mmkd.data.pairs import read_pairs

    pairs = read_pairs(prepared["PAIRS"])
    images = ImageListDataset(pairs.images[:count] * (count // len(pairs.images[:count]) + 1), size, scale=(0.9, 1.0))
    x = torch.stack([images[i]["source"] for i in range(count)])
    tok = CaptionTokenizer(str(prepared["TEXT_DICT"]), max_tokens=40)
    caps = [tok.encode(pairs.captions[int(pairs.captions_of(i % len(pairs))[0])]) for i in range(count)]
    ids, mask = pad_captions(caps, tok.pad)
    return {"image": {"net_input": {"source": x.to(device)}, "nsamples": count},
            "text": {"net_input": {"source": ids.to(device), "padding_mask": mask.to(device)}, "nsamples": count,
                     "ntokens": int((~mask).sum())},
            "nsamples": count}


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    prepared = json.loads(args.prepared)
    device = args.device
    teachers = {"image": prepared["IMAGE_TEACHER"], "text": prepared["TEXT_TEACHER"]}
    model, criterion = build(args.worker, teachers, args.depth, device)
    size = model.distiller.cfgs["image"].encoder.input_size
    sample = batch(prepared, size, args.batch, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    base = rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        if args.worker == "image_text":  # the task's training step: one modality's activations at a time
            criterion.backward_in_turns(model, sample, lambda loss: (loss / sample["nsamples"]).backward())
        else:  # kd_multimodal's step: one forward/backward per modality, one optimizer update
            total = 0
            parts = {m: {"modalities": {m: sample[m]}, "nsamples": sample[m]["nsamples"]} for m in ("image", "text")}
            sizes = {}
            for m, part in parts.items():
                loss, sizes[m], _ = criterion(model, part)
                loss.backward()
                total += sizes[m]
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(total)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    saved = SavedActivations()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        step()
    return {"ms_per_update": 1000 * seconds, "peak_mb": peak, "saved_mb": saved.peak / 2 ** 20}


def validation(prepared: dict, images: int, captions_per_image: int, device: str, depth: int) -> dict:
    """Zero-shot retrieval of a synthetic COCO-sized set at this size: embedding and ranking, timed."""
    import torch

    from fairseq_mmkd.retrieval.cross_modal import embed_captions, embed_images, image_text_retrieval

    model, _ = build("image_text", {"image": prepared["IMAGE_TEACHER"], "text": prepared["TEXT_TEACHER"]}, depth,
                     device)
    model.eval()
    size = model.distiller.cfgs["image"].encoder.input_size
    g = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=g)
    vocab = model.distiller.cfgs["text"].encoder.vocab_size
    lengths = torch.randint(10, 20, (images * captions_per_image,), generator=g)
    tokens = [torch.cat([torch.tensor([0]), torch.randint(4, vocab - 1, (int(n) - 2,), generator=g),
                         torch.tensor([2])]) for n in lengths]
    owner = torch.arange(images).repeat_interleave(captions_per_image)
    times = {}
    start = time.perf_counter()
    image = embed_images(model.embed, uint8, size, batch_size=256, device=device)
    times["images_s"] = time.perf_counter() - start
    start = time.perf_counter()
    text = embed_captions(model.embed, tokens, 1, batch_size=256, device=device)
    times["captions_s"] = time.perf_counter() - start
    start = time.perf_counter()
    image_text_retrieval(image, text, owner, "coco")
    times["ranking_s"] = time.perf_counter() - start
    times["tokens_image"] = images * model.distiller.view("image").shared_encoder(
        uint8[:1].float().to(device)).x.shape[1]
    times["tokens_text"] = int(lengths.sum())
    return times


def h200_projection(images: int, captions: int, caption_tokens: float) -> dict:
    """Base size on the H200 of BENCHMARKS.md: its measured student embedding rate (images/s at 197 tokens), applied
    per token to the images and captions of the set (attention on 16-token captions costs less per token than on 197:
    an upper bound), plus the ranking's matmul at the image run's matmul rate."""
    text = (REPO / "BENCHMARKS.md").read_text()
    found = re.search(r"student [\d.]+ s \((\d+) images/s\), teacher [\d.]+ s \((\d+) images/s\)", text)
    rate, teacher_rate = float(found.group(1)), float(found.group(2))
    tokens = images * 197 + captions * caption_tokens
    return {"student_images_per_s": rate, "embedding_s": tokens / (rate * 197),
            "teacher_embedding_s": tokens / (teacher_rate * 197), "ranking_gflop": 2 * images * captions * 768 / 1e9}


def render(res: dict) -> str:
    it, mm = res["image_text"], res["multimodal"]
    v, h = res["validation"], res["h200"]
    gpu = res["device"] == "cuda"
    mem = "peak GPU memory" if gpu else "peak memory above the built models (RSS)"
    lines = [
        f"## Image-text alignment (`scripts/bench_image_text.py`, {'GPU' if gpu else 'CPU'}, {res['size']} size)", "",
        f"- {res['date']}; {res['machine']}; torch {res['torch']}; command: `{res['command']}`",
        f"- The same random image and text teachers, a {res['depth']}-block student and one batch of {res['batch']} "
        f"pairs; best of {res['rounds']} interleaved rounds, {res['steps']} timed updates after {res['warmup']}, "
        f"{res['threads']} threads. Baseline: the `kd_multimodal` image + text update of that batch (one "
        "forward/backward per modality, regressions only), measured in the same run.", "",
        f"| update | ms per update | peak activations saved for backward | {mem} |", "|---|---|---|---|",
        f"| `kd_multimodal`, image + text | {mm['ms_per_update']:.0f} | {mm['saved_mb']:.1f} MB | "
        f"{mm['peak_mb']:.0f} MB |",
        f"| `kd_image_text` (regressions + contrastive) | {it['ms_per_update']:.0f} "
        f"(x{it['ms_per_update'] / mm['ms_per_update']:.2f}) | {it['saved_mb']:.1f} MB "
        f"(x{it['saved_mb'] / max(mm['saved_mb'], 1e-9):.2f}) | {it['peak_mb']:.0f} MB "
        f"(x{it['peak_mb'] / max(mm['peak_mb'], 1e-9):.2f}) |", "",
        "- Goal: at most x1.10 the time and no more peak memory. Both steps hold one modality's activations at a "
        "time; the image-text step adds one forward of the captions through the student without autograd.",
        f"- Zero-shot validation of {res['valid_images']:,} images and {res['valid_images'] * 5:,} captions at this "
        f"size on this machine: images {v['images_s']:.1f} s, captions {v['captions_s']:.1f} s, ranking "
        f"{v['ranking_s']:.1f} s (decoding not included: the task decodes the validation images once per run).",
        f"- Base size on the H200 (a projection, not a measurement): BENCHMARKS.md's student embeds "
        f"{h['student_images_per_s']:,.0f} images/s at 197 tokens; the same per-token rate gives "
        f"{h['embedding_s']:.1f} s for the set's {res['valid_images']:,} x 197 image tokens and "
        f"{v['tokens_text']:,} caption tokens: {h['embedding_s']:.2f} s per round, and "
        f"{h['teacher_embedding_s']:.2f} s more for the unaligned teachers (once per run) at their measured rate; "
        f"the ranking's {h['ranking_gflop']:.0f} GFLOP are milliseconds of matmul. Goal: a round under 10 s "
        f"({'met' if h['embedding_s'] + h['teacher_embedding_s'] < 10 else 'NOT met'} by this projection).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("demo", "base"), default="demo")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data", type=Path, default=None, help="where the demo's data and teachers go (reused)")
    p.add_argument("--batch", type=int, default=None, help="pairs per update (demo 32, base 256)")
    p.add_argument("--depth", type=int, default=None, help="student blocks (demo 2, base 6)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--valid-images", type=int, default=5000)
    p.add_argument("--json", default=None)
    p.add_argument("--update-benchmarks", default=None, metavar="BENCHMARKS.md")
    p.add_argument("--worker", choices=("image_text", "multimodal"), help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (32 if args.size == "demo" else 256)
    args.depth = args.depth or (2 if args.size == "demo" else 6)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    from demo_image_text import prepare_image_text

    data = args.data or REPO / "demo_out_image_text"
    prepared = {k: str(v) for k, v in prepare_image_text(data).items()}
    if args.size == "base":
        from bench_gpu_e2e import make_teacher
        from demo import BASE_SEQUENCE_TEACHER, write_random_sequence_teacher
        from fairseq_mmkd.testing.fixtures import dictionary_size

        base_image, base_text = data / "teacher_base_image.pt", data / "teacher_base_text.pt"
        if not base_image.exists():
            make_teacher(base_image, tiny=False)
        if not base_text.exists():
            write_random_sequence_teacher(base_text, "text", dictionary_size(prepared["TEXT_DICT"]), 0,
                                          BASE_SEQUENCE_TEACHER)
        prepared.update(IMAGE_TEACHER=str(base_image), TEXT_TEACHER=str(base_text))
    runs = {"multimodal": [], "image_text": []}
    for r in range(args.rounds):
        for kind in runs:
            cmd = [sys.executable, __file__, "--worker", kind, "--prepared", json.dumps(prepared), "--device",
                   args.device, "--batch", str(args.batch), "--depth", str(args.depth), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if out.returncode:
                sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"[bench_image_text] round {r + 1} {kind}: {runs[kind][-1]}", file=sys.stderr, flush=True)
    best = {k: {"ms_per_update": min(x["ms_per_update"] for x in v), "peak_mb": min(x["peak_mb"] for x in v),
                "saved_mb": min(x["saved_mb"] for x in v)} for k, v in runs.items()}
    torch.set_num_threads(args.threads)
    valid = validation(prepared, args.valid_images, 5, args.device, args.depth)
    from bench_gpu import cpu_name

    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_name(),
           "torch": torch.__version__, "size": args.size, "device": args.device, "batch": args.batch,
           "depth": args.depth, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "threads": args.threads, "valid_images": args.valid_images, **best, "validation": valid,
           "h200": h200_projection(args.valid_images, args.valid_images * 5,
                                   valid["tokens_text"] / (args.valid_images * 5)),
           "command": "python scripts/bench_image_text.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))}
    from bench import publish

    publish("bench_image_text" if (args.size, args.device) == ("demo", "cpu") else
            f"bench_image_text_{args.size}_{args.device}", render(res), res, args.json, args.update_benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
