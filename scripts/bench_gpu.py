#!/usr/bin/env python3
"""Single-GPU benchmark of the distillation core: KD update, validation embedding, exact retrieval search.

    bash scripts/bench_gpu.sh                 # one GPU (H200): ~5-7 minutes, stays under --budget-s
    bash scripts/bench_gpu.sh --cpu-tiny      # the same code path on CPU at a tiny size, in seconds (tests)

Runs where only PyTorch is installed: it imports the plugin's numerical core (``d2v_model``, ``layers``,
``distill``, ``kd_loss``, ``targets``, ``retrieval.evaluate``, ``retrieval.search`` with its torch backend)
and never fairseq, faiss, omegaconf or hydra. All data are synthetic; the models are randomly initialised
at data2vec 2.0 ViT-B/16 sizes (2 prenet + 10 shared teacher blocks, 6 student blocks, 768 wide, 224 px).

Stages, in order (the JSON is rewritten after each, so a run cut short still leaves its numbers):

1. A large bf16 matmul on random data: the measured ceiling for model FLOP utilisation (MFU).
2. The KD update at batch 256: shared encoder + teacher in bf16 without autograd, the student in fp32
   master weights under bf16 autocast, SDPA attention, fused AdamW. Images/s, peak memory
   (``torch.cuda.max_memory_allocated``) and MFU against both the measured matmul rate and
   ``--peak-tflops`` (790: what such a matmul reaches on an H200). Variants:
   ``eager`` (teacher outside autocast), ``eager_forward`` (``Distiller.forward`` entirely under autocast,
   as a plain training loop would call it), ``compile_blocks`` (every transformer block ``torch.compile``d)
   and ``compile_step`` (the whole forward + loss compiled); ``naive`` is the baseline a straightforward loop
   would be: fp32, manual-softmax attention, the encoder computed twice, the teacher with autograd on (its
   weights left trainable, so its activations are kept). Compiled and naive variants run in child processes
   with a timeout taken from the remaining budget; a failure is reported, not fatal.
3. Validation: embed ``--embed-images`` CIFAR-sized uint8 images (resized to 224 on the device, bf16) with
   the student and with the teacher through ``retrieval.embed``, then exact top-k search (torch backend)
   of 50,000 x 10,000 in both directions for two datasets, as one validation round does.

Results: a table on stdout, ``bench_gpu.json`` and ``bench_gpu.md`` in ``$OUT`` (if set) or the current
folder (``--json`` overrides the JSON path).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from fairseq_mmkd.d2v.model import D2vConfig, D2vModel  # noqa: E402
from fairseq_mmkd.distill.distiller import Distiller  # noqa: E402
from fairseq_mmkd.encoders.image import ImageEncoderConfig  # noqa: E402
from fairseq_mmkd.losses.regression import distillation_loss  # noqa: E402
from fairseq_mmkd.retrieval.evaluate import embed  # noqa: E402
from fairseq_mmkd.retrieval.search import topk_accuracy  # noqa: E402
from fairseq_mmkd.modules.targets import TargetConfig  # noqa: E402

KD_VARIANTS = ("eager", "eager_forward", "compile_blocks", "compile_step", "naive")
IN_PROCESS = ("eager", "eager_forward")
SEED_RUN_IMAGES = 30_000 * 256  # the seed recipe: 30,000 updates of 256 images
TARGET_SEED_RUN_MIN = 40.0
TARGET_IMAGES_PER_S = 3500.0  # 30,000 x 256 images in 40 min is 3,200/s; the rest is validation and overhead
TARGET_VALIDATION_S = 60.0


@dataclasses.dataclass
class Sizes:
    embed_dim: int = 768
    heads: int = 12
    depth: int = 10  # shared teacher blocks
    prenet: int = 2
    student_depth: int = 6
    input_size: int = 224
    patch_size: int = 16
    batch: int = 256
    warmup: int = 5
    steps: int = 20
    compile_warmup: int = 3
    embed_images: int = 120_000
    embed_batch: int = 256
    memory: int = 50_000
    queries: int = 10_000
    matmul_n: int = 8192

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2 + 1


TINY = dict(embed_dim=64, heads=2, depth=2, prenet=1, student_depth=2, input_size=32, patch_size=8, batch=4,
            warmup=1, steps=2, compile_warmup=1, embed_images=512, embed_batch=128, memory=1000, queries=200,
            matmul_n=256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-tiny", action="store_true",
                   help="run every stage on CPU at a tiny size (embed 64, 2 heads, depth 2, 32 px, batch 4)")
    for f in dataclasses.fields(Sizes):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                       help=f"override (default {f.default}; --cpu-tiny: {TINY.get(f.name, f.default)})")
    p.add_argument("--variants", default=",".join(KD_VARIANTS),
                   help=f"comma-separated KD variants to run, of {', '.join(KD_VARIANTS)}")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; --cpu-tiny: eager, i.e. dynamo tracing only)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget; compiled variants get what is left (default 450; --cpu-tiny 300)")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="bf16 dense rate MFU is also reported against (H200: ~790 measured by a large matmul)")
    p.add_argument("--skip-validation", action="store_true", help="skip the embedding and search stage")
    p.add_argument("--json", default=None, help="JSON output path (default $OUT/bench_gpu.json or ./bench_gpu.json)")
    # internal: one KD variant in a child process
    p.add_argument("--kd-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--measured-tflops", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = Sizes(**(TINY if args.cpu_tiny else {}))
    for f in dataclasses.fields(Sizes):
        value = getattr(args, f.name)
        if value is not None:
            setattr(sizes, f.name, value)
    args.sizes = sizes
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.cpu_tiny else "inductor"
    if args.budget_s is None:
        args.budget_s = 300.0 if args.cpu_tiny else 450.0
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(KD_VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {KD_VARIANTS}")
    return args


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------

def pick_device(args) -> torch.device:
    if args.cpu_tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --cpu-tiny for the CPU smoke run")
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def peak_memory_gib(device: torch.device):
    """(GiB, what was measured): the CUDA allocator's peak, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "torch.cuda.max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "ru_maxrss (whole process, CPU)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def env_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        # the core must not need these; the tests hide them and check that nothing loaded them
        "importable": {m: importlib.util.find_spec(m) is not None for m in ("fairseq", "faiss", "omegaconf", "hydra")},
        "loaded": {m: sys.modules.get(m) is not None for m in ("fairseq", "faiss", "omegaconf", "hydra")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}")
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            q = torch.randn(2, 12, 197, 64, device=device, dtype=torch.bfloat16)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            info["sdpa_flash"] = True
        except Exception as e:  # the benchmark still runs, on whichever SDPA kernel torch picks
            info["sdpa_flash"] = f"unavailable: {type(e).__name__}: {e}"[:200]
    return info


# ------------------------------------------------------------------------------------------------------
# FLOPs and the matmul ceiling
# ------------------------------------------------------------------------------------------------------

def flops_per_image(s: Sizes, mlp_ratio: float = 4.0) -> dict:
    """Model FLOPs of one KD update per image (a multiply-add counts 2), attention included."""
    n, d = s.tokens, s.embed_dim
    block_linear = 2 * n * d * d * (4 + 2 * mlp_ratio)  # qkv 3D^2 + proj D^2 + MLP 2*r*D^2
    block_attn = 2 * 2 * n * n * d  # QK^T and AV over all heads
    block = block_linear + block_attn
    patches = (s.input_size // s.patch_size) ** 2
    patch_embed = 2 * patches * 3 * s.patch_size ** 2 * d
    teacher = patch_embed + (s.prenet + s.depth) * block
    student = 3 * s.student_depth * block  # forward + backward (2x forward)
    formula = (f"per image: patch_embed 2*P*3*p^2*D + (prenet {s.prenet} + teacher {s.depth}) fwd blocks + "
               f"3 x student {s.student_depth} blocks; block = 2*N*D^2*(4+2*{mlp_ratio:g}) + 4*N^2*D "
               f"(N={n} tokens, D={d}, P={patches}, p={s.patch_size})")
    return {"block_gflop": block / 1e9, "teacher_fwd_gflop": teacher / 1e9, "student_train_gflop": student / 1e9,
            "total_gflop": (teacher + student) / 1e9, "formula": formula}


def measure_matmul_tflops(device: torch.device, n: int, dtype=torch.bfloat16, reps: int = 10) -> float:
    """Rate of an n x n x n matmul on random data (never zeros: they run faster than real data)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n ** 3 * reps / seconds / 1e12


# ------------------------------------------------------------------------------------------------------
# KD update
# ------------------------------------------------------------------------------------------------------

def model_config(s: Sizes) -> D2vConfig:
    return D2vConfig(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.heads,
                     encoder=ImageEncoderConfig(input_size=s.input_size, patch_size=s.patch_size,
                                                embed_dim=s.embed_dim, prenet_depth=s.prenet),
                     targets=TargetConfig(average_top_k_layers=min(10, s.depth)))


def build_distiller(s: Sizes, device: torch.device, low: torch.dtype, seed: int = 0) -> Distiller:
    """A randomly initialised ViT-B teacher and its student; the frozen parts are cast to ``low``."""
    torch.manual_seed(seed)
    distiller = Distiller(D2vModel(model_config(s)), student_depth=s.student_depth,
                          student_init="teacher_first").to(device)
    distiller.frozen_modules().to(low)
    return distiller.train()


def make_optimizer(params, device: torch.device):
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, foreach=True), "foreach"


def make_loss_fn(distiller: Distiller, variant: str, device: torch.device, low: torch.dtype):
    """Forward + loss of one batch (``loss_sum / sample_size``: the MSE fairseq's criterion optimises)."""
    target_cfg = distiller.cfg.targets

    def split(source):
        # The frozen parts already hold bf16 weights: keep them out of autocast, whose fp32 LayerNorms would
        # turn the teacher's residual stream into fp32 between every pair of matmuls.
        encoder_out = distiller.encode(source)
        teacher = distiller.run_teacher(encoder_out)
        with torch.autocast(device.type, dtype=low):
            student = distiller.run_student(encoder_out)
        out = {"teacher_layer_results": teacher, "student_layer_results": student["layer_results"],
               "student_x": student["x"]}
        result = distillation_loss(distiller, out, target_cfg, include_extra_tokens=True)
        return result["loss_sum"] / result["sample_size"]

    def whole_forward(source):
        with torch.autocast(device.type, dtype=low):
            out = distiller(source)
        result = distillation_loss(distiller, out, target_cfg, include_extra_tokens=True)
        return result["loss_sum"] / result["sample_size"]

    return whole_forward if variant == "eager_forward" else split


def manual_softmax_attention(self, x, attn_mask=None):
    """The naive baseline's attention: explicit scores, softmax, weighted sum (what SDPA fuses); a padding
    mask or an additive bias (text, audio) is applied to the explicit scores."""
    B, N, C = x.shape
    h = self.num_heads
    q, k, v = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * (C // h) ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores.float() + attn_mask)
    attn = scores.softmax(dim=-1).to(v.dtype)
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


def make_naive_loss_fn(distiller: Distiller, teacher: D2vModel):
    """Teacher (trainable weights, so autograd keeps its graph) and encoder-again-for-the-student, fp32."""
    target_cfg = distiller.cfg.targets

    def naive(source, padding_mask=None):
        teacher_out = teacher(source, padding_mask)
        enc = distiller.shared_encoder(source, padding_mask)
        student = distiller.run_student(enc)
        out = {"teacher_layer_results": teacher_out["layer_results"],
               "student_layer_results": student["layer_results"], "student_x": student["x"],
               "padding_mask": enc.padding_mask}
        result = distillation_loss(distiller, out, target_cfg, include_extra_tokens=True)
        return result["loss_sum"] / result["sample_size"]

    return naive


def all_blocks(distiller: Distiller):
    return [*distiller.shared_encoder.context_encoder.blocks, *distiller.teacher_blocks, *distiller.student_blocks]


def run_kd(variant: str, s: Sizes, device: torch.device, backend: str, peak: dict) -> dict:
    """One KD variant: build, (compile), warm up, time ``s.steps`` updates."""
    low = torch.float32 if variant == "naive" else torch.bfloat16
    if variant.startswith("compile"):
        import torch._dynamo as dynamo

        dynamo.reset()
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 16)  # 3 block graphs + recompiles
    reset_peak(device)
    distiller = build_distiller(s, device, low)
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt, opt_kind = make_optimizer(params, device)
    if variant == "naive":  # runs in its own process: patching attention affects nothing else
        from fairseq_mmkd.modules import layers

        layers.Attention.forward = manual_softmax_attention
        teacher = D2vModel(model_config(s)).to(device)
        teacher.load_state_dict(distiller.shared_encoder.state_dict(prefix="encoder.")
                                | distiller.teacher_blocks.state_dict(prefix="blocks."))
        teacher.requires_grad_(True).eval()
        loss_fn = make_naive_loss_fn(distiller, teacher)
    else:
        loss_fn = make_loss_fn(distiller, variant, device, low)
    if variant == "compile_blocks":
        for blk in all_blocks(distiller):
            blk.compile(backend=backend)
    elif variant == "compile_step":
        loss_fn = torch.compile(loss_fn, backend=backend)

    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(s.batch, 3, s.input_size, s.input_size, device=device, generator=gen).to(low)
               for _ in range(3)]
    losses = []

    def step(i):
        loss = loss_fn(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    warmup = s.compile_warmup if variant.startswith("compile") else s.warmup
    _, first_s = timed(lambda: step(0), device)  # includes compilation for compiled variants
    _, rest_s = timed(lambda: [step(i) for i in range(1, warmup)], device)
    reset_peak(device)
    _, seconds = timed(lambda: [step(i) for i in range(s.steps)], device)
    mem, mem_kind = peak_memory_gib(device)
    loss_values = torch.stack(losses).float().cpu()
    if not torch.isfinite(loss_values).all():
        raise FloatingPointError(f"{variant}: non-finite loss {loss_values.tolist()}")
    step_s = seconds / s.steps
    images_per_s = s.batch / step_s
    flops = flops_per_image(s)["total_gflop"] * 1e9
    result = {
        "variant": variant, "batch": s.batch, "steps": s.steps, "step_ms": step_s * 1e3,
        "images_per_s": images_per_s, "peak_mem_gib": mem, "peak_mem_kind": mem_kind,
        "achieved_tflops": images_per_s * flops / 1e12, "optimizer": f"AdamW ({opt_kind})",
        "first_step_s": first_s, "loss_first": float(loss_values[0]), "loss_last": float(loss_values[-1]),
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
    }
    if variant.startswith("compile"):
        # compilation time: what the warm-up took beyond the same number of steady-state steps
        result["compile_s"] = max(0.0, first_s + rest_s - warmup * step_s)
        result["compile_backend"] = backend
    for name, tflops in peak.items():
        if tflops:
            result[f"mfu_vs_{name}"] = result["achieved_tflops"] / tflops
    del distiller, opt, batches
    reset_peak(device)
    return result


def run_kd_child(variant: str, args, remaining_s: float) -> dict:
    """A compiled variant in its own process (fresh compile caches, clean peak memory), killed at the deadline."""
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        out = Path(tmp) / "kd.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--kd-child", variant, "--child-json", str(out),
               "--compile-backend", args.compile_backend, "--peak-tflops", str(args.peak_tflops)]
        cmd += ["--cpu-tiny"] if args.cpu_tiny else []
        for f in dataclasses.fields(Sizes):
            cmd += ["--" + f.name.replace("_", "-"), str(getattr(args.sizes, f.name))]
        if args.measured_tflops:
            cmd += ["--measured-tflops", str(args.measured_tflops)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group: compile workers die with it
        try:
            log, _ = proc.communicate(timeout=max(1.0, remaining_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            return {"variant": variant, "error": f"timed out after {remaining_s:.0f} s (budget)",
                    "log_tail": (log or "")[-1500:]}
        if proc.returncode != 0 or not out.exists():
            return {"variant": variant, "error": f"child exited with {proc.returncode}", "log_tail": log[-3000:]}
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------
# Validation: embedding and search
# ------------------------------------------------------------------------------------------------------

def bench_embed(distiller: Distiller, s: Sizes, device: torch.device) -> dict:
    """Embed CIFAR-sized uint8 images (CPU tensors, as the retrieval sets hold them) at the model's size."""
    distiller.eval()
    images = torch.randint(0, 256, (s.embed_images, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    n_extra = distiller.num_extra_tokens
    kw = dict(input_size=s.input_size, num_extra_tokens=n_extra, pooling="cls", batch_size=s.embed_batch,
              device=device, dtype=torch.bfloat16, progress=False)
    out = {"images": s.embed_images, "batch": s.embed_batch}
    for name, fn in (("student", distiller.forward_features), ("teacher", distiller.teacher_features)):
        embed(fn, images[:2 * s.embed_batch], **kw)  # warm-up
        emb, seconds = timed(lambda: embed(fn, images, **kw), device)
        if not torch.isfinite(emb).all():
            raise FloatingPointError(f"{name} embeddings are not finite")
        out[f"{name}_s"] = seconds
        out[f"{name}_images_per_s"] = s.embed_images / seconds
        out["dim"] = emb.shape[1]
    return out


def bench_search(s: Sizes, device: torch.device) -> dict:
    """One validation round's searches: 2 datasets x (train->test, test->train), exact, torch backend."""
    gen = torch.Generator(device=device).manual_seed(3)
    d = s.embed_dim
    topk_accuracy(torch.randn(256, d, device=device), torch.zeros(256, dtype=torch.long, device=device),
                  torch.randn(64, d, device=device), torch.zeros(64, dtype=torch.long, device=device),
                  backend="torch")  # warm-up
    searches, total = [], 0.0
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        centers = torch.randn(classes, d, device=device, generator=gen)
        train_y = torch.randint(0, classes, (s.memory,), device=device, generator=gen)
        test_y = torch.randint(0, classes, (s.queries,), device=device, generator=gen)
        train = centers[train_y] + 3.0 * torch.randn(s.memory, d, device=device, generator=gen)
        test = centers[test_y] + 3.0 * torch.randn(s.queries, d, device=device, generator=gen)
        for direction, (mem, mem_y, q, q_y) in (("forward", (train, train_y, test, test_y)),
                                                 ("inverse", (test, test_y, train, train_y))):
            acc, seconds = timed(lambda: topk_accuracy(mem, mem_y, q, q_y, (1, 3), backend="torch"), device)
            searches.append({"set": name, "direction": direction, "memory": len(mem), "queries": len(q),
                             "seconds": seconds, "top1": acc[1]})
            total += seconds
    return {"searches": searches, "total_s": total, "dim": d}


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------

def output_paths(args) -> tuple[Path, Path]:
    if args.json:
        path = Path(args.json)
    else:
        path = Path(os.environ.get("OUT") or ".") / "bench_gpu.json"
    return path, path.with_suffix(".md")


def table_lines(res: dict) -> list[str]:
    s = res["sizes"]
    lines = [f"| KD update ({s['batch']} x {s['input_size']} px, {s['tokens']} tokens) | images/s | step ms | "
             f"peak GiB | TFLOP/s | MFU vs matmul | MFU vs {res['peak_tflops']:g} | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["kd"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['peak_mem_gib']:.2f} | "
                     f"{r['achieved_tflops']:.1f} | {r.get('mfu_vs_measured', float('nan')):.1%} | "
                     f"{r.get('mfu_vs_nominal', float('nan')):.1%} | {r.get('compile_s', 0.0):.1f} |")
    return lines


def render(res: dict) -> str:
    s, f = res["sizes"], res["flops"]
    out = [f"## GPU benchmark (`scripts/bench_gpu.sh{' --cpu-tiny' if res['cpu_tiny'] else ''}`)", "",
           f"- {res['env']['device_name']}, torch {res['env']['torch']}, Python {res['env']['python']}; "
           f"command: `{res['command']}`; wall {res.get('wall_s', 0):.0f} s",
           f"- bf16 matmul {s['matmul_n']}^3 on random data: **{res['matmul_tflops']:.3g} TFLOP/s** "
           f"(MFU denominators: this and {res['peak_tflops']:g})",
           f"- FLOPs per image {f['total_gflop']:.4g} GFLOP (teacher fwd {f['teacher_fwd_gflop']:.4g} + student "
           f"fwd+bwd {f['student_train_gflop']:.4g}); {f['formula']}", ""]
    out += table_lines(res)
    naive = res["kd"].get("naive", {})
    if "images_per_s" in naive:
        out += [""] + [f"- `{r['variant']}` vs the naive baseline (same run): x{r['images_per_s'] / naive['images_per_s']:.2f} "
                       f"images/s, x{naive['peak_mem_gib'] / r['peak_mem_gib']:.2f} less peak memory"
                       for r in res["kd"].values() if r.get("variant") != "naive" and "images_per_s" in r]
    best = res.get("best_kd")
    if best:
        out += ["", f"- Best KD variant `{best['variant']}`: {best['images_per_s']:.0f} images/s -> seed run "
                f"(30,000 x 256 images) {best['seed_run_min']:.1f} min of updates (target: whole run < "
                f"{TARGET_SEED_RUN_MIN:g} min, i.e. >= {TARGET_IMAGES_PER_S:,.0f} images/s)"]
    e, sr = res.get("embed"), res.get("search")
    if "validation_error" in res:
        out += [f"- Validation stage failed: {res['validation_error']}"]
    if e and sr:
        out += [f"- Embedding {e['images']:,} 32 px uint8 images at {s['input_size']} px, bf16, batch {e['batch']}: "
                f"student {e['student_s']:.1f} s ({e['student_images_per_s']:.0f} images/s), teacher "
                f"{e['teacher_s']:.1f} s ({e['teacher_images_per_s']:.0f} images/s)",
                f"- Exact search (torch), {len(sr['searches'])} searches of {s['memory']:,} x {s['queries']:,} x "
                f"{sr['dim']}: {sr['total_s']:.2f} s in all ("
                + ", ".join(f"{x['set']} {x['direction']} {x['seconds']:.2f} s" for x in sr["searches"]) + ")",
                f"- Validation round (student embed + searches): **{res['validation_s']:.1f} s** "
                f"(target < {TARGET_VALIDATION_S:g} s); first round, which also evaluates the teacher: "
                f"{res['validation_with_teacher_s']:.1f} s"]
    return "\n".join(out) + "\n"


def write_results(res: dict, args) -> None:
    json_path, md_path = output_paths(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=2, default=str))
    if "kd" in res and "flops" in res:
        md_path.write_text(render(res))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t0 = time.perf_counter()
    s = args.sizes
    device = pick_device(args)

    if args.kd_child:  # child process: one compiled variant, JSON to --child-json
        peak = {"measured": args.measured_tflops, "nominal": args.peak_tflops}
        result = run_kd(args.kd_child, s, device, args.compile_backend, peak)
        Path(args.child_json).write_text(json.dumps(result))
        return 0

    command = "bash scripts/bench_gpu.sh" + "".join(f" {a}" for a in argv)
    res = {"command": command, "cpu_tiny": args.cpu_tiny, "env": env_info(device),
           "sizes": {**dataclasses.asdict(s), "tokens": s.tokens}, "peak_tflops": args.peak_tflops,
           "flops": flops_per_image(s), "kd": {},
           "targets": {"images_per_s": TARGET_IMAGES_PER_S, "seed_run_min": TARGET_SEED_RUN_MIN,
                       "validation_s": TARGET_VALIDATION_S}}
    print(f"[bench_gpu] {res['env']['device_name']} torch {torch.__version__}; sizes {res['sizes']}", flush=True)
    print(f"[bench_gpu] FLOPs: {res['flops']['total_gflop']:.2f} GFLOP/image; {res['flops']['formula']}", flush=True)

    res["matmul_tflops"] = args.measured_tflops = measure_matmul_tflops(device, s.matmul_n)
    print(f"[bench_gpu] bf16 matmul {s.matmul_n}^3: {res['matmul_tflops']:.1f} TFLOP/s", flush=True)
    write_results(res, args)
    peak = {"measured": res["matmul_tflops"], "nominal": args.peak_tflops}

    for variant in [v for v in args.variants if v in IN_PROCESS]:
        try:
            res["kd"][variant] = run_kd(variant, s, device, args.compile_backend, peak)
        except Exception as e:  # report and go on: the other stages still tell something
            res["kd"][variant] = {"variant": variant, "error": f"{type(e).__name__}: {e}"[:500],
                                  "traceback": traceback.format_exc()[-2000:]}
        print(f"[bench_gpu] kd {variant}: {_short(res['kd'][variant])}", flush=True)
        write_results(res, args)

    if not args.skip_validation:
        try:
            distiller = build_distiller(s, device, torch.bfloat16)
            res["embed"] = bench_embed(distiller, s, device)
            del distiller
            reset_peak(device)
            print(f"[bench_gpu] embed: {res['embed']}", flush=True)
            res["search"] = bench_search(s, device)
            print(f"[bench_gpu] search: {res['search']['total_s']:.2f} s total", flush=True)
            res["validation_s"] = res["embed"]["student_s"] + res["search"]["total_s"]
            # the task evaluates the teacher once, in the first validation round
            res["validation_with_teacher_s"] = (res["validation_s"] + res["embed"]["teacher_s"]
                                                + res["search"]["total_s"])
        except Exception as e:  # report and go on to the compiled variants
            res["validation_error"] = f"{type(e).__name__}: {e}"[:500]
            res["validation_traceback"] = traceback.format_exc()[-2000:]
            res.pop("embed", None), res.pop("search", None)
            print(f"[bench_gpu] validation stage FAILED: {res['validation_traceback']}", flush=True)
            reset_peak(device)
        write_results(res, args)

    for variant in [v for v in args.variants if v not in IN_PROCESS]:
        remaining = args.budget_s - (time.perf_counter() - t0) - 10.0
        if remaining < 30.0:
            res["kd"][variant] = {"variant": variant, "error": f"skipped: {remaining + 10:.0f} s of budget left"}
        else:
            res["kd"][variant] = run_kd_child(variant, args, remaining)
        print(f"[bench_gpu] kd {variant}: {_short(res['kd'][variant])}", flush=True)
        write_results(res, args)

    ok = [r for r in res["kd"].values() if "error" not in r]
    if ok:
        best = max(ok, key=lambda r: r["images_per_s"])
        res["best_kd"] = {"variant": best["variant"], "images_per_s": best["images_per_s"],
                          "seed_run_min": SEED_RUN_IMAGES / best["images_per_s"] / 60}
    res["wall_s"] = time.perf_counter() - t0
    write_results(res, args)
    print()
    print(render(res))
    json_path, md_path = output_paths(args)
    print(f"[bench_gpu] wrote {json_path} and {md_path}")
    return 0 if ok else 1


def _short(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"] + ("\n" + r["log_tail"] if r.get("log_tail") else "")
    extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
    return (f"{r['images_per_s']:.1f} images/s, {r['step_ms']:.1f} ms/step, peak {r['peak_mem_gib']:.2f} GiB, "
            f"{r['achieved_tflops']:.2f} TFLOP/s{extra}")


if __name__ == "__main__":
    sys.exit(main())
