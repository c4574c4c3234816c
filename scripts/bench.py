#!/usr/bin/env python
"""CPU benchmark of the plugin against baselines measured in the same run; updates a section of BENCHMARKS.md.

    python scripts/bench.py                    # ViT-B/16 sizes, a few minutes on 2 cores
    python scripts/bench.py --quick --output /tmp/B.md   # tiny sizes, seconds (the tests run this)
    python scripts/bench.py --gpu-md $OUT/bench_gpu.md   # only paste scripts/bench_gpu.sh's result into BENCHMARKS.md

Every figure is a ratio against a baseline timed in the same run, with both absolute numbers:

* KD update at data2vec 2.0 ViT-B/16 sizes (2 prenet + 10 teacher blocks, 6 student blocks, 768 wide, 224 px,
  197 tokens), randomly initialised, small batch: images/s and peak memory. *This implementation* is
  ``Distiller`` + ``distillation_loss`` (shared encoder once under ``no_grad``, teacher without autograd,
  ``scaled_dot_product_attention``, fused AdamW). The *naive baseline* is what a straightforward loop does:
  the encoder runs twice (inside the teacher model, then again for the student), the teacher runs with
  autograd on (its weights left trainable, its outputs kept until the step ends), attention is a manual
  softmax (patched into ``Attention.forward`` inside the baseline's process only) and AdamW is the
  per-parameter loop (``foreach=False``); all fp32. Each side runs in its own spawned process, so peak memory
  (growth of the resident set over the steps, from ``/proc/self/status`` VmHWM after resetting it) is its own;
  the two processes take turns step by step, so load from other jobs on the machine hits both alike.
* Teacher forward: ``D2vModel`` vs fairseq's own ``Data2VecMultiModel`` (built by ``fairseq_mmkd/testing/fairseq_reference.py``
  from the released image, text and audio base configs) with identical weights: time ratio and max
  |difference| of the last layer's output; text at 512 tokens, audio on 10 s clips.
* Retrieval: embedding images/s of 32 px uint8 images resized to 224 through ``retrieval.embed`` (batched,
  on the tensor) vs a per-image PIL transform loop, with a ViT-B-wide model of small depth; exact search of
  a 50,000 x 10,000 x 768 bank with faiss and torch (``topk_accuracy``) vs the naive per-query loop of
  ``scripts/bench_retrieval.py``, which is timed on a subset of the queries and extrapolated linearly.
* Data pipeline: decoded + augmented images/s of one worker through ``data.image.ImageListDataset`` vs
  ``PIL.Image.open`` + torchvision ``RandomResizedCrop`` (same crop parameters), on generated ImageNet-sized
  (500x375) and large (4000x3000) JPEGs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench.py:begin -->", "<!-- bench.py:end -->"
GPU_BEGIN, GPU_END = "<!-- bench_gpu:begin -->", "<!-- bench_gpu:end -->"
GIB = 2 ** 30

QUICK = dict(embed_dim=64, heads=2, depth=2, prenet=1, student_depth=2, input_size=32, patch_size=8, batch=4,
             warmup=1, steps=2, teacher_batch=2, teacher_reps=2, embed_images=16, embed_batch=8, embed_depth=1,
             embed_input=64, memory=2000, queries=500, search_dim=64, naive_queries=50, jpegs=6, large_jpegs=1,
             large_size="1600x1200", text_tokens=32, text_batch=2, audio_seconds=0.5, audio_batch=1)
DEFAULTS = dict(embed_dim=768, heads=12, depth=10, prenet=2, student_depth=6, input_size=224, patch_size=16,
                batch=4, warmup=1, steps=3, teacher_batch=4, teacher_reps=3, embed_images=48, embed_batch=16,
                embed_depth=1, embed_input=224, memory=50_000, queries=10_000, search_dim=768, naive_queries=100,
                jpegs=64, large_jpegs=4, large_size="4000x3000", text_tokens=512, text_batch=2, audio_seconds=10.0,
                audio_batch=1)
HELP = dict(embed_dim="model width", heads="attention heads", depth="shared teacher blocks",
            prenet="prenet blocks of the shared encoder", student_depth="student blocks",
            input_size="KD / teacher input size", patch_size="patch size", batch="KD batch size",
            warmup="untimed KD steps", steps="timed KD steps", teacher_batch="teacher-forward batch",
            teacher_reps="timed teacher forwards per implementation",
            embed_images="images embedded per pipeline", embed_batch="embedding batch size",
            embed_depth="shared blocks of the embedding model (1 prenet block besides)",
            embed_input="embedding model input size (32 px images are resized to it)",
            memory="search memory-bank size", queries="search queries", search_dim="embedding size of the search",
            naive_queries="queries the naive search loop is timed on (then extrapolated)",
            jpegs="ImageNet-sized (500x375) JPEGs generated", large_jpegs="large JPEGs generated",
            large_size="size of the large JPEGs, WxH",
            text_tokens="tokens per sequence of the text teacher forward (data2vec2 text: 512)",
            text_batch="sequences per text teacher forward",
            audio_seconds="clip length of the audio teacher forward (16 kHz)",
            audio_batch="clips per audio teacher forward")
SECTIONS = ("kd", "teacher", "retrieval", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes for every benchmark (seconds; for tests)")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"),
                   help="markdown file whose bench.py section is written or replaced (default BENCHMARKS.md)")
    p.add_argument("--skip", default="", help=f"comma-separated benchmarks to skip, of {', '.join(SECTIONS)}")
    p.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")
    p.add_argument("--gpu-md", default=None,
                   help="only replace the GPU section of --output with this bench_gpu.md (from bench_gpu.sh) and exit")
    for name, default in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None,
                       help=f"{HELP[name]} (default {default}; --quick {QUICK[name]})")
    args = p.parse_args(argv)
    for name in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, (QUICK if args.quick else DEFAULTS)[name])
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - set(SECTIONS):
        p.error(f"unknown --skip {sorted(args.skip - set(SECTIONS))}; choose from {SECTIONS}")
    return args


# ------------------------------------------------------------------------------------------------------
# Machine and memory helpers
# ------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak_rss() -> int:
    """Reset the peak-RSS counter (Linux ``clear_refs``); returns the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then VmHWM stays the lifetime peak, an upper bound of the step's peak
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def kd_config(s: dict):
    """The teacher architecture of a KD benchmark: ViT (image), data2vec2 text base or audio base layouts."""
    from fairseq_mmkd.d2v.model import D2vConfig
    from fairseq_mmkd.encoders.audio import AudioEncoderConfig
    from fairseq_mmkd.encoders.text import TextEncoderConfig
    from fairseq_mmkd.modules.targets import TargetConfig

    modality = s.get("modality", "image")
    if modality == "image":
        return vit_config(s["embed_dim"], s["heads"], s["depth"], s["prenet"], s["input_size"], s["patch_size"])
    # nlp_base.pt / base_libri.pt: post-LN, norm_eps 1e-5, no prenet, instance norm per layer, no final LN;
    # text averages all 12 blocks, audio the top 8 of 12
    targets = TargetConfig(average_top_k_layers=s["depth"] if modality == "text" else max(1, 2 * s["depth"] // 3),
                           instance_norm_target_layer=True, layer_norm_targets=False)
    if modality == "text":
        encoder = TextEncoderConfig(vocab_size=s["vocab"], max_source_positions=s["tokens"], prenet_depth=0)
    else:
        encoder = AudioEncoderConfig(conv_spec=s["conv_spec"], conv_pos_groups=s["conv_pos_groups"], prenet_depth=0,
                                     alibi_heads=s["heads"], model_depth=s["depth"])
    return D2vConfig(modality=modality, embed_dim=s["embed_dim"], depth=s["depth"], num_heads=s["heads"],
                     norm_eps=1e-5, encoder=encoder, targets=targets)


def kd_batch(s: dict, generator):
    """``(source, padding_mask)`` of one KD batch: images, 512-token blocks (no padding, but a mask, as the
    text pipeline collates them), or audio crops (no padding: crop-to-shortest)."""
    import torch

    modality = s.get("modality", "image")
    if modality == "image":
        return torch.randn(s["batch"], 3, s["input_size"], s["input_size"], generator=generator), None
    if modality == "text":
        tokens = torch.randint(4, s["vocab"] - 1, (s["batch"], s["tokens"]), generator=generator)
        tokens[:, 0] = 0
        return tokens, torch.zeros_like(tokens, dtype=torch.bool)
    return torch.randn(s["batch"], int(s["seconds"] * 16000), generator=generator), None


def vit_config(embed_dim, heads, depth, prenet, input_size, patch_size):
    from fairseq_mmkd.d2v.model import D2vConfig
    from fairseq_mmkd.encoders.image import ImageEncoderConfig
    from fairseq_mmkd.modules.targets import TargetConfig

    return D2vConfig(embed_dim=embed_dim, depth=depth, num_heads=heads,
                     encoder=ImageEncoderConfig(input_size=input_size, patch_size=patch_size, embed_dim=embed_dim,
                                                prenet_depth=prenet),
                     targets=TargetConfig(average_top_k_layers=min(10, depth)))


# ------------------------------------------------------------------------------------------------------
# KD update (each side in its own spawned process)
# ------------------------------------------------------------------------------------------------------

def kd_child(variant: str, sizes: dict, conn) -> None:
    """Runs in a spawned process: builds one implementation, then runs a KD update whenever told to.

    The parent alternates the two processes step by step, so load from other jobs on the machine hits both
    alike; each process measures its own step times and its own peak memory.
    """
    try:
        sys.modules.setdefault("fairseq", None)  # the core needs no fairseq: skip its slow import here
        import copy

        import torch

        from fairseq_mmkd.modules import layers
        from fairseq_mmkd.d2v.model import D2vModel
        from fairseq_mmkd.distill.distiller import Distiller

        s = sizes
        cfg = kd_config(s)
        torch.manual_seed(0)
        teacher = D2vModel(cfg)
        if variant == "ours":
            distiller = Distiller(teacher, s["student_depth"], "teacher_first")
            params = [p for p in distiller.parameters() if p.requires_grad]
            try:
                opt, opt_kind = torch.optim.AdamW(params, lr=1e-4, fused=True), "fused"
            except (RuntimeError, TypeError, ValueError):
                opt, opt_kind = torch.optim.AdamW(params, lr=1e-4, foreach=True), "foreach"

            def loss_fn(source, padding_mask):
                result = distiller.loss(source, cfg.targets, include_extra_tokens=True, padding_mask=padding_mask)
                return result["loss_sum"] / result["sample_size"]
        else:
            # one definition of the baseline (attention, encoder twice, teacher under autograd) for both benches
            from bench_gpu import make_naive_loss_fn, manual_softmax_attention

            layers.Attention.forward = manual_softmax_attention
            distiller = Distiller(copy.deepcopy(teacher), s["student_depth"], "teacher_first")  # student side
            teacher.eval()  # weights left trainable: autograd records the teacher's forward
            params = [p for p in distiller.parameters() if p.requires_grad]
            opt, opt_kind = torch.optim.AdamW(params, lr=1e-4, foreach=False), "for-loop"
            loss_fn = make_naive_loss_fn(distiller, teacher)

        def step(batch):
            loss = loss_fn(*batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        distiller.train()
        gen = torch.Generator().manual_seed(1)
        batches = [kd_batch(s, gen) for _ in range(2)]
        before = reset_peak_rss()
        losses, times = [], []
        conn.send("ready")
        while conn.recv() == "step":
            start = time.perf_counter()
            losses.append(float(step(batches[len(times) % 2])))
            times.append(time.perf_counter() - start)
            conn.send(times[-1])
        conn.send({"variant": variant, "step_times": times, "peak_bytes": peak_rss() - before, "losses": losses,
                   "optimizer": opt_kind, "threads": torch.get_num_threads()})
    except BaseException as e:  # report to the parent instead of hanging it
        import traceback

        conn.send({"variant": variant, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def run_alternating(variants, sizes: dict, rounds: int) -> dict:
    """Start one process per variant and run ``rounds`` KD updates in each, taking turns (ABBA order)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    # An OpenMP thread pool spins for a while after each parallel region; the waiting process's spinning
    # threads would steal the cores from the one taking its turn. PASSIVE makes waiting threads sleep.
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        for v in variants:
            conns[v], child = ctx.Pipe()
            procs[v] = ctx.Process(target=kd_child, args=(v, sizes, child))
            procs[v].start()
    finally:
        if saved is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = saved

    def receive(v):
        msg = conns[v].recv()
        if isinstance(msg, dict) and "error" in msg:
            for p in procs.values():
                p.kill()
            raise RuntimeError(f"KD {v} failed: {msg['error']}\n{msg['traceback']}")
        return msg

    for v in variants:
        receive(v)  # both built
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            conns[v].send("step")
            receive(v)
    results = {}
    for v in variants:
        conns[v].send("finish")
        results[v] = receive(v)
        procs[v].join()
    return results


def kd_sizes(args, modality: str) -> dict:
    """The sizes of one modality's KD benchmark (image: the ViT-B flags; text and audio: their base models)."""
    common = {k: getattr(args, k) for k in ("embed_dim", "heads", "student_depth", "warmup", "steps")}
    if modality == "image":
        return {"modality": "image", **common, **{k: getattr(args, k) for k in
                                                  ("depth", "prenet", "input_size", "patch_size", "batch")}}
    depth = args.depth if args.quick else 12  # both released models have 12 shared blocks
    if modality == "text":
        return {"modality": "text", **common, "depth": depth, "prenet": 0, "tokens": args.text_tokens,
                "batch": args.text_batch, "vocab": 64 if args.quick else 50265}
    spec = ("[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2" if args.quick else
            "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]")
    return {"modality": "audio", **common, "depth": depth, "prenet": 0, "seconds": args.audio_seconds,
            "batch": args.audio_batch, "conv_spec": spec, "conv_pos_groups": 2 if args.quick else 16}


def kd_flops(s: dict, mlp_ratio: float = 4.0) -> dict:
    """Model FLOPs of one KD update per sample, the GPU benchmark's model (``bench_gpu.flops_per_image``): teacher
    forward (encoder + blocks) + 3 x the student's blocks (forward + backward); a multiply-add counts 2."""
    from fairseq_mmkd.encoders.audio import AudioEncoderConfig

    d, modality = s["embed_dim"], s["modality"]
    if modality == "image":
        n = (s["input_size"] // s["patch_size"]) ** 2 + 1
        encoder = 2 * (n - 1) * 3 * s["patch_size"] ** 2 * d
    elif modality == "text":
        n, encoder = s["tokens"], 0  # embedding lookups
    else:
        audio = AudioEncoderConfig(conv_spec=s["conv_spec"])
        length, encoder, c_in = int(s["seconds"] * 16000), 0, 1
        for dim, kernel, stride in audio.conv_layers:
            length = (length - kernel) // stride + 1
            encoder += 2 * length * dim * c_in * kernel
            c_in = dim
        n = length
        encoder += 2 * n * c_in * d  # projection
        encoder += audio.conv_pos_depth * 2 * n * d * (d // s["conv_pos_groups"]) * audio.conv_pos_kernel
    block = 2 * n * d * d * (4 + 2 * mlp_ratio) + 2 * 2 * n * n * d
    teacher = encoder + (s["prenet"] + s["depth"]) * block
    student = 3 * s["student_depth"] * block
    return {"tokens": n, "gflop": (teacher + student) / 1e9}


def measured_gpu_tflops(path: Path = REPO / "BENCHMARKS.md") -> dict:
    """Achieved TFLOP/s of the image KD variants in BENCHMARKS.md's GPU section (``eager``, ``compile_step``)."""
    out = {}
    text = path.read_text() if path.exists() else ""
    section = text.split(GPU_BEGIN, 1)[-1].split(GPU_END, 1)[0] if GPU_BEGIN in text else ""
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] in ("eager", "compile_step") and cells[0] not in out:
            try:
                out[cells[0]] = float(cells[4])
            except ValueError:
                pass
    return out


def bench_kd(args, modality: str = "image") -> dict:
    sizes = kd_sizes(args, modality)
    results = run_alternating(["ours", "naive"], sizes, args.warmup + args.steps)
    for r in results.values():
        r["step_s"] = min(r["step_times"][args.warmup:])  # other jobs only ever slow a step down
        r["images_per_s"] = sizes["batch"] / r["step_s"]
    ours, naive = results["ours"], results["naive"]
    # the two compute the same loss from the same weights and data: a check that the baseline is a fair one
    close = abs(ours["losses"][0] - naive["losses"][0]) <= 1e-3 * max(1.0, abs(ours["losses"][0]))
    flops = kd_flops(sizes)
    print(f"[kd {modality}] ours {ours['images_per_s']:.3f} samples/s, peak +{ours['peak_bytes'] / GIB:.2f} GiB; naive "
          f"{naive['images_per_s']:.3f} samples/s, peak +{naive['peak_bytes'] / GIB:.2f} GiB; first losses "
          f"{ours['losses'][0]:.6g} / {naive['losses'][0]:.6g}", flush=True)
    return {"ours": ours, "naive": naive, "same_first_loss": close, "tokens": flops["tokens"], "sizes": sizes,
            "gflop_per_sample": flops["gflop"]}


# ------------------------------------------------------------------------------------------------------
# Teacher forward vs fairseq
# ------------------------------------------------------------------------------------------------------

def _time_pair(run_ours, run_fairseq, reps: int) -> dict:
    """Fastest of ``reps`` alternating calls of each (load from other processes hits both alike), and the
    largest difference of their outputs."""
    import torch

    times = {"ours": [], "fairseq": []}
    with torch.no_grad():
        outs = {"ours": run_ours(), "fairseq": run_fairseq()}  # warm-up, and the outputs compared
        for _ in range(reps):
            for name, fn in (("fairseq", run_fairseq), ("ours", run_ours)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {"ours_s": min(times["ours"]), "fairseq_s": min(times["fairseq"]),
            "max_abs_diff": (outs["ours"] - outs["fairseq"]).abs().max().item(),
            "out_abs_max": outs["fairseq"].abs().max().item(), "times": times}


def _teacher_pair(modality: str, **overrides):
    """fairseq's ``Data2VecMultiModel`` from the released base config of ``modality`` (``fairseq_mmkd.testing.fairseq_reference``)
    and ``D2vModel`` with the same weights, both in eval mode."""
    import torch
    from omegaconf import OmegaConf

    from fairseq_mmkd.testing.fairseq_reference import make_config

    from fairseq import tasks
    from fairseq_mmkd.d2v.model import D2vConfig, D2vModel

    cfg = make_config(modality, **overrides)
    torch.manual_seed(0)
    fairseq_model = tasks.setup_task(cfg.task).build_model(cfg.model).eval()
    online = {k: v for k, v in fairseq_model.state_dict().items() if k != "_ema"}
    ours = D2vModel(D2vConfig.from_fairseq(OmegaConf.to_container(cfg.model, resolve=True), modality,
                                           state=online)).eval()
    prefix = f"modality_encoders.{modality.upper()}."
    ours.load_state_dict({k: online[prefix + k[len("encoder."):] if k.startswith("encoder.") else k]
                          for k in ours.state_dict()}, strict=True)
    return fairseq_model, ours


def bench_teacher(args) -> dict:
    """Teacher forward, ours vs fairseq's, for the image, text and audio base configs (same weights)."""
    import torch

    results = {}
    fairseq_model, ours = _teacher_pair("image", embed_dim=args.embed_dim, num_heads=args.heads, depth=args.depth,
                                        average_top_k_layers=min(10, args.depth), input_size=args.input_size,
                                        patch_size=args.patch_size, prenet_depth=args.prenet)
    images = torch.randn(args.teacher_batch, 3, args.input_size, args.input_size,
                         generator=torch.Generator().manual_seed(0))
    results["image"] = _time_pair(
        lambda: ours(images)["x"],
        lambda: fairseq_model(images, mode="IMAGE", mask=False, features_only=True, remove_extra_tokens=False)["x"],
        args.teacher_reps)
    results["image"].update(batch=args.teacher_batch, what=f"image, {args.input_size} px, D={args.embed_dim}, "
                                                           f"{args.prenet} prenet + {args.depth} blocks")

    quick = dict(embed_dim=args.embed_dim, num_heads=args.heads, depth=args.depth,
                 average_top_k_layers=args.depth) if args.quick else {}
    fairseq_model, ours = _teacher_pair("text", max_source_positions=args.text_tokens, **quick)
    tokens = torch.randint(4, 30, (args.text_batch, args.text_tokens), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    results["text"] = _time_pair(
        lambda: ours(tokens, mask)["x"],
        lambda: fairseq_model(tokens, mode="TEXT", padding_mask=mask, mask=False, features_only=True)["x"],
        args.teacher_reps)
    results["text"].update(batch=args.text_batch, what=f"text, {args.text_tokens} tokens, "
                                                       f"D={ours.cfg.embed_dim}, {ours.cfg.depth} blocks")

    audio_quick = dict(quick, feature_encoder_spec="[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2",
                       conv_pos_groups=2) if args.quick else {}
    fairseq_model, ours = _teacher_pair("audio", **audio_quick)
    samples = torch.randn(args.audio_batch, int(args.audio_seconds * 16000), generator=torch.Generator().manual_seed(0))
    results["audio"] = _time_pair(
        lambda: ours(samples)["x"],
        lambda: fairseq_model(samples, mode="AUDIO", mask=False, features_only=True)["x"],
        args.teacher_reps)
    results["audio"].update(batch=args.audio_batch, what=f"audio, {args.audio_seconds:g} s clips at 16 kHz, "
                                                         f"D={ours.cfg.embed_dim}, {ours.cfg.depth} blocks")
    for name, r in results.items():
        print(f"[teacher {name}] ours {r['ours_s']:.3f} s, fairseq {r['fairseq_s']:.3f} s per batch of {r['batch']}; "
              f"max |diff| {r['max_abs_diff']:.2e}", flush=True)
    return results


def bench_embedding(args) -> dict:
    import torch
    from PIL import Image
    from torchvision import transforms

    from fairseq_mmkd.d2v.model import D2vModel
    from fairseq_mmkd.retrieval import embed
    from fairseq_mmkd.retrieval.evaluate import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    patch = 16 if args.embed_input % 16 == 0 else args.patch_size
    model = D2vModel(vit_config(args.embed_dim, args.heads, args.embed_depth, 1, args.embed_input, patch)).eval()
    feature_fn = lambda x: model(x)["x"]  # noqa: E731
    images = torch.randint(0, 256, (args.embed_images, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    n, bs, size = args.embed_images, args.embed_batch, args.embed_input

    per_image = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    pil_images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]

    def baseline():  # a Dataset + transform loop: PIL per image, stack, forward under no_grad
        out = []
        with torch.no_grad():
            for lo in range(0, n, bs):
                x = torch.stack([per_image(img) for img in pil_images[lo:lo + bs]])
                out.append(feature_fn(x)[:, 0])
        return torch.cat(out)

    def ours():
        return embed(feature_fn, images, size, 1, batch_size=bs, device="cpu", progress=False)

    embed(feature_fn, images[:bs], size, 1, batch_size=bs, device="cpu", progress=False)  # warm-up
    times = {"ours": [], "baseline": []}
    for _ in range(2 if args.quick else 3):
        for name, fn in (("baseline", baseline), ("ours", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {"ours_images_per_s": n / min(times["ours"]), "baseline_images_per_s": n / min(times["baseline"]),
              "images": n, "batch": bs, "input_size": size, "depth": args.embed_depth, "embed_dim": args.embed_dim}
    print(f"[embed] ours {result['ours_images_per_s']:.2f} images/s, per-image PIL loop "
          f"{result['baseline_images_per_s']:.2f} images/s", flush=True)
    return result


def bench_search(args) -> dict:
    import torch
    import torch.nn.functional as F

    from bench_retrieval import naive_topk_hits  # the per-query baseline, shared with bench_retrieval.py

    from fairseq_mmkd.retrieval import faiss_available, topk_accuracy

    ks, classes, d = (1, 3), 100, args.search_dim
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, d, generator=gen)
    memory_labels = torch.randint(0, classes, (args.memory,), generator=gen)
    query_labels = torch.randint(0, classes, (args.queries,), generator=gen)
    memory = centers[memory_labels] + 3.0 * torch.randn(args.memory, d, generator=gen)
    queries = centers[query_labels] + 3.0 * torch.randn(args.queries, d, generator=gen)

    subset = min(args.naive_queries, args.queries)
    m_np, q_np = F.normalize(memory, dim=1).numpy(), F.normalize(queries[:subset], dim=1).numpy()
    start = time.perf_counter()
    hits = naive_topk_hits(m_np, memory_labels.numpy(), q_np, query_labels[:subset].numpy(), ks)
    naive_s = (time.perf_counter() - start) * args.queries / subset
    naive_acc = {k: 100.0 * hits[k] / subset for k in ks}
    result = {"naive_s": naive_s, "naive_subset": subset, "memory": args.memory, "queries": args.queries, "dim": d,
              "backends": {}}
    for backend in ["torch"] + (["faiss"] if faiss_available() else []):
        topk_accuracy(memory[:100], memory_labels[:100], queries[:10], query_labels[:10], ks, backend=backend)
        start = time.perf_counter()
        acc = topk_accuracy(memory, memory_labels, queries, query_labels, ks, backend=backend)
        seconds = time.perf_counter() - start
        sub = topk_accuracy(memory, memory_labels, queries[:subset], query_labels[:subset], ks, backend=backend)
        result["backends"][backend] = {"seconds": seconds, "top1": acc[1],
                                       "agrees_with_naive": all(abs(sub[k] - naive_acc[k]) < 1e-9 for k in ks)}
        print(f"[search] {backend} {seconds:.2f} s vs naive {naive_s:.1f} s (extrapolated from {subset} queries)",
              flush=True)
    return result


# ------------------------------------------------------------------------------------------------------
# Data pipeline
# ------------------------------------------------------------------------------------------------------

def write_jpegs(folder: Path, count: int, size: tuple, prefix: str, seed: int) -> list:
    """Photo-like JPEGs: smooth colour fields plus texture (pure noise would be unrealistically slow to decode)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        texture = rng.normal(0, 12, size=(h // 4, w // 4, 3))
        texture = np.asarray(Image.fromarray(np.clip(128 + texture, 0, 255).astype(np.uint8)).resize((w, h)))
        arr = np.clip(np.asarray(img, dtype=np.int16) + texture.astype(np.int16) - 128, 0, 255).astype(np.uint8)
        path = folder / f"{prefix}_{i:03d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(str(path))
    return paths


def bench_data(args) -> dict:
    import torch
    from PIL import Image
    from torchvision import transforms

    from fairseq_mmkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from fairseq_mmkd.data.image import ImageListDataset

    torch.set_num_threads(1)  # one DataLoader worker
    baseline_tf = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    large = tuple(int(v) for v in args.large_size.lower().split("x"))
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench_jpegs_") as tmp:
        sets = {"imagenet_sized": ((500, 375), write_jpegs(Path(tmp), args.jpegs, (500, 375), "photo", 0)),
                "large": (large, write_jpegs(Path(tmp), args.large_jpegs, large, "large", 1))}
        for name, (size, paths) in sets.items():
            if not paths:
                continue
            dataset = ImageListDataset(paths, input_size=224, train=True)

            def ours():
                for i in range(len(dataset)):
                    dataset[i]["source"]

            def baseline():
                for p in paths:
                    with Image.open(p) as img:
                        baseline_tf(img.convert("RGB"))

            times = {"ours": [], "baseline": []}
            ours(), baseline()  # warm-up (file cache, first-call setup)
            for _ in range(2 if args.quick else 5):  # interleaved passes, best of each: load noise is one-sided
                for key, fn in (("baseline", baseline), ("ours", ours)):
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            result[name] = {"size": f"{size[0]}x{size[1]}", "images": len(paths),
                            "ours_images_per_s": len(paths) / min(times["ours"]),
                            "baseline_images_per_s": len(paths) / min(times["baseline"])}
            print(f"[data] {name}: ours {result[name]['ours_images_per_s']:.1f} images/s, PIL + torchvision "
                  f"{result[name]['baseline_images_per_s']:.1f} images/s", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    return result


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------

def ratio(better: float, worse: float) -> str:
    return f"×{better / worse:.2f}" if worse > 0 else "n/a"


def render(res: dict, args, command: str) -> str:
    import torch

    m = res["machine"]
    lines = [BEGIN, "## CPU benchmark (`scripts/bench.py`)", "",
             f"- Date: {res['date']}; commit `{res['commit']}`",
             f"- Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {torch.__version__}, "
             f"Python {platform.python_version()}; shared with other jobs, so expect ±10-20% run to run",
             f"- Command: `{command}`", "",
             "Ratios are this implementation against the baseline timed in the same run (> 1: this is better). "
             "Times are the fastest of several interleaved repetitions: other jobs on the machine only ever slow "
             "a run down.",
             "", "| Benchmark | This implementation | Baseline (same run) | Ratio |", "|---|---|---|---|"]
    notes = []
    if "kd" in res:
        k, s = res["kd"], res["kd"]["sizes"]
        what = (f"KD update, {s['prenet']} prenet + {s['depth']} teacher / {s['student_depth']} student blocks, "
                f"D={s['embed_dim']}, {s['input_size']} px ({k['tokens']} tokens), batch {s['batch']}")
        o, n = k["ours"], k["naive"]
        lines.append(f"| {what}: throughput | {o['images_per_s']:.3f} images/s | {n['images_per_s']:.3f} images/s "
                     f"(naive) | {ratio(o['images_per_s'], n['images_per_s'])} |")
        lines.append(f"| {what}: peak memory (RSS growth over the steps) | {o['peak_bytes'] / GIB:.2f} GiB | "
                     f"{n['peak_bytes'] / GIB:.2f} GiB (naive) | {ratio(n['peak_bytes'], o['peak_bytes'])} less |")
        gpu = measured_gpu_tflops(Path(args.output)) or measured_gpu_tflops()
        for name, unit in (("kd_text", "sequences/s"), ("kd_audio", "clips/s")):
            if name not in res:
                continue
            r, z = res[name], res[name]["sizes"]
            what = (f"KD update, {z['modality']} ({'conv extractor + ' if z['modality'] == 'audio' else ''}"
                    f"{z['depth']} teacher / {z['student_depth']} student blocks)")
            shape = (f"{z['tokens']}-token blocks" if z["modality"] == "text" else f"{z['seconds']:g} s crops "
                     f"({r['tokens']} frames)")
            o, n = r["ours"], r["naive"]
            lines.append(f"| {what}, D={z['embed_dim']}, {shape}, batch {z['batch']}: throughput | "
                         f"{o['images_per_s']:.3f} {unit} | {n['images_per_s']:.3f} {unit} (naive) | "
                         f"{ratio(o['images_per_s'], n['images_per_s'])} |")
            lines.append(f"| {what}: peak memory | {o['peak_bytes'] / GIB:.2f} GiB | {n['peak_bytes'] / GIB:.2f} GiB "
                         f"(naive) | {ratio(n['peak_bytes'], o['peak_bytes'])} less |")
            if gpu:
                projected = ", ".join(f"{v * 1e3 / r['gflop_per_sample']:,.0f} {unit} at the image run's {k} rate "
                                      f"({v:g} TFLOP/s)" for k, v in gpu.items())
                notes.append(f"{what}: {r['gflop_per_sample']:.1f} GFLOP per sample by the GPU benchmark's FLOP "
                             f"model; expected on the H200 of the GPU section: {projected} (a projection, not a "
                             "measurement)")
            notes.append(f"{what}: same first loss as the naive baseline: {r['same_first_loss']}")
        notes.append(f"KD: fastest of {s['steps']} timed steps after {s['warmup']} warm-up, the two processes taking "
                     f"turns (OMP_WAIT_POLICY=PASSIVE); AdamW {o['optimizer']} vs "
                     f"{n['optimizer']}; naive = encoder twice, teacher with autograd, manual-softmax attention, "
                     f"fp32 (both fp32 here); same first loss: {k['same_first_loss']} "
                     f"({o['losses'][0]:.6g} vs {n['losses'][0]:.6g})")
    if "teacher" in res:
        for name, t in res["teacher"].items():
            lines.append(f"| Teacher forward vs fairseq `Data2VecMultiModel`, {t['what']}, same weights, batch "
                         f"{t['batch']} | {t['ours_s']:.3f} s | {t['fairseq_s']:.3f} s (fairseq) | "
                         f"{ratio(t['fairseq_s'], t['ours_s'])} |")
            lines.append(f"| Teacher forward ({name}): max abs difference of the last layer output | "
                         f"{t['max_abs_diff']:.2e} | (outputs up to {t['out_abs_max']:.2f}) | - |")
        notes.append("Teacher forward: the image teacher calls scaled_dot_product_attention without a mask (as before "
                     "text and audio arrived); text passes a key padding mask, audio the fp32 ALiBi bias")
    if "embedding" in res:
        e = res["embedding"]
        lines.append(f"| Retrieval embedding, 32 px uint8 -> {e['input_size']} px, D={e['embed_dim']} "
                     f"1 prenet + {e['depth']} block(s), batch {e['batch']} | {e['ours_images_per_s']:.2f} images/s | "
                     f"{e['baseline_images_per_s']:.2f} images/s (per-image PIL) | "
                     f"{ratio(e['ours_images_per_s'], e['baseline_images_per_s'])} |")
    if "search" in res:
        sr = res["search"]
        for backend, b in sr["backends"].items():
            lines.append(f"| Exact search {sr['memory']:,} x {sr['queries']:,} x {sr['dim']}, {backend} | "
                         f"{b['seconds']:.2f} s | {sr['naive_s']:.1f} s (per-query loop, extrapolated) | "
                         f"{ratio(sr['naive_s'], b['seconds'])} |")
        notes.append(f"Search: the naive loop ran on {sr['naive_subset']} queries and was extrapolated linearly to "
                     f"{sr['queries']:,}; backends agree with it on that subset: "
                     + ", ".join(f"{k} {v['agrees_with_naive']}" for k, v in sr["backends"].items()))
    if "data" in res:
        for name, d in res["data"].items():
            lines.append(f"| Data pipeline, {d['images']} {d['size']} JPEGs, decode + augment to 224, one worker | "
                         f"{d['ours_images_per_s']:.1f} images/s | {d['baseline_images_per_s']:.1f} images/s "
                         f"(PIL + torchvision RandomResizedCrop) | "
                         f"{ratio(d['ours_images_per_s'], d['baseline_images_per_s'])} |")
    lines += [""] + [f"- {n}" for n in notes] + [END]
    return "\n".join(lines) + "\n"


HEADER = """# Benchmarks

Written by `scripts/bench.py` (CPU, against baselines timed in the same run) and `scripts/bench_gpu.sh`
(one GPU). Re-run them to update their sections.

"""
GPU_PLACEHOLDER = f"""{GPU_BEGIN}
## GPU benchmark (`scripts/bench_gpu.sh`)

Not run yet. On a one-GPU machine: `bash scripts/bench_gpu.sh` (about 5-7 minutes; needs only python3 with
torch), then `python scripts/bench.py --gpu-md $OUT/bench_gpu.md` pastes its `bench_gpu.md` here.
{GPU_END}
"""


def replace_section(text: str, begin: str, end: str, section: str) -> str:
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section.rstrip("\n") + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


def update_marked_section(path: Path, name: str, section: str) -> None:
    """Replace (or append) the part of BENCHMARKS.md between ``<!-- name:begin -->`` and ``<!-- name:end -->``
    (every benchmark script owns one such section)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(replace_section(text, begin, end, f"{begin}\n{section.rstrip()}\n{end}\n"))


def publish(name: str, text: str, res: dict, json_path=None, benchmarks=None) -> None:
    """A benchmark script's ending: print its Markdown, write its results as JSON, replace its BENCHMARKS.md
    section ``name`` (the last two when asked)."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2, default=str))
    if benchmarks:
        update_marked_section(Path(benchmarks), name, text)


def update_file(path: Path, begin: str, end: str, section: str) -> None:
    text = path.read_text() if path.exists() else HEADER + GPU_PLACEHOLDER
    path.write_text(replace_section(text, begin, end, section))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    output = Path(args.output)
    if args.gpu_md:
        body = Path(args.gpu_md).read_text().rstrip("\n")
        update_file(output, GPU_BEGIN, GPU_END, f"{GPU_BEGIN}\n{body}\n{GPU_END}\n")
        print(f"[bench] GPU section of {output} updated from {args.gpu_md}")
        return 0

    import torch

    command = "python scripts/bench.py" + "".join(" " + shlex.quote(a) for a in argv)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": git_commit(), "command": command,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": platform.python_version()}}
    print(f"[bench] {command}\n[bench] {res['machine']}", flush=True)
    start = time.perf_counter()
    if "kd" not in args.skip:
        res["kd"] = bench_kd(args)
        res["kd_text"] = bench_kd(args, "text")
        res["kd_audio"] = bench_kd(args, "audio")
    if "teacher" not in args.skip:
        res["teacher"] = bench_teacher(args)
    if "retrieval" not in args.skip:
        res["embedding"] = bench_embedding(args)
        res["search"] = bench_search(args)
    if "data" not in args.skip:
        res["data"] = bench_data(args)
    res["wall_s"] = time.perf_counter() - start
    section = render(res, args, command)
    update_file(output, BEGIN, END, section)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    print(section)
    print(f"[bench] {res['wall_s']:.0f} s; section written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
