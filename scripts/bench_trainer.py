#!/usr/bin/env python3
"""CPU benchmark of the per-update costs fairseq's trainer adds to the distillation core, and what the plugin
removes: fairseq's ``adam`` (a Python loop over parameters, one gradient norm per parameter) against the
plugin's ``torch_adamw`` (fused AdamW, multi-tensor norm), both measured in the same run.

    python scripts/bench_trainer.py                       # ~2 minutes on 2 cores; prints a Markdown table
    python scripts/bench_trainer.py --json out.json --update-benchmarks BENCHMARKS.md

1. The optimizer phase of one update (fairseq's ``multiply_grads``, ``clip_grad_norm(2.0)``, ``step``) on the
   seed student's parameters (6 ViT-B blocks: 72 tensors, 42.5M values; fp32, as fairseq's bf16 master
   weights): CPU time, fastest of interleaved repetitions, and the number of tensor kernels dispatched
   (counted with a ``TorchDispatchMode``; views and detaches left out). On a GPU each kernel is a launch
   that costs the training thread ~5-10 us whatever the tensor size, so the count is what carries over.
2. Whole updates through ``fairseq-hydra-train`` (``preset=tiny`` with a 4-block student: 48 tensors, and one
   data worker; CPU), where per-update overhead weighs most: updates/s from the trainer's own log
   timestamps, the two optimizers taking turns.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

NOT_KERNELS = ("aten.detach", "aten.view", "aten.alias", "aten._to_copy", "profiler.")


class KernelCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not name.startswith(NOT_KERNELS):
            self.ops[name.rsplit(".", 1)[0]] += 1
        return func(*args, **(kwargs or {}))


def student_parameters(depth: int):
    from fairseq_mmkd.d2v.model import D2vConfig

    cfg = D2vConfig(embed_dim=768, depth=10, num_heads=12)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(cfg.make_block(0.0, preln_upstream_quirk=False) for _ in range(depth))
    return [p.detach() for p in blocks.parameters()]


def build(kind: str, params):
    import fairseq_mmkd  # noqa: F401  (registers torch_adamw)
    from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

    from fairseq_mmkd.optim.torch_adamw import TorchAdamW, TorchAdamWConfig

    ps = [torch.nn.Parameter(p.clone()) for p in params]
    kw = dict(adam_betas="(0.9, 0.98)", adam_eps=1e-6, weight_decay=0.01, lr=[5e-4])  # the seed config's
    opt = FairseqAdam(FairseqAdamConfig(**kw), ps) if kind == "adam" else TorchAdamW(TorchAdamWConfig(**kw), ps)
    return opt, ps


def optimizer_phase(opt):
    opt.multiply_grads(1.0 / 3.0)
    norm = opt.clip_grad_norm(2.0)
    opt.step()
    return norm


def bench_optimizer(reps: int, depth: int) -> dict:
    params = student_parameters(depth)
    grads = [torch.randn_like(p) for p in params]
    runs = {kind: build(kind, params) for kind in ("adam", "torch_adamw")}
    out = {kind: {"times": []} for kind in runs}

    def set_grads(ps):
        for p, g in zip(ps, grads):
            p.grad = g.clone()

    for kind, (opt, ps) in runs.items():
        set_grads(ps)
        optimizer_phase(opt)  # creates the optimizer state
        set_grads(ps)
        with KernelCount() as count:
            optimizer_phase(opt)
        out[kind]["kernels"] = sum(count.ops.values())
        out[kind]["top_kernels"] = dict(count.ops.most_common(6))
        out[kind]["implementation"] = getattr(opt, "implementation", "fairseq Adam (Python loop)")
    for _ in range(reps):  # interleaved: another job slowing the machine slows both
        for kind, (opt, ps) in runs.items():
            set_grads(ps)
            start = time.perf_counter()
            optimizer_phase(opt)
            out[kind]["times"].append(time.perf_counter() - start)
    for kind in out:
        out[kind]["ms"] = min(out[kind].pop("times")) * 1e3
    out["tensors"], out["values_m"] = len(params), sum(p.numel() for p in params) / 1e6
    return out


def bench_fairseq(rounds: int, updates: int, warmup: int) -> dict:
    from bench_gpu_e2e import parse_log
    from fairseq_mmkd.testing.fixtures import make_teacher, write_photos

    out = {"adam": [], "torch_adamw": []}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        tmp = Path(tmp)
        teacher = make_teacher(tmp / "teacher.pt")
        photos = write_photos(tmp / "photos", classes=4, per_class=32)
        for r in range(rounds):
            for kind in out:
                cmd = [str(Path(sys.executable).parent / "fairseq-hydra-train"), "--config-dir", "config",
                       "--config-name", "kd_image", "preset=tiny", f"task.data={photos}",
                       f"model.teacher_checkpoint={teacher}", "task.retrieval=false", "dataset.disable_validation=true",
                       "checkpoint.no_save=true", f"checkpoint.save_dir={tmp / f'{kind}_{r}'}",
                       f"optimization.max_update={warmup + updates}", "common.log_interval=10",
                       "model.student_depth=4", "dataset.num_workers=1",  # 48 student tensors; decoding off the trainer's thread
                       f"optimizer._name={kind}"] + (["+optimizer.use_old_adam=false"] if kind == "adam" else [])
                if kind == "adam":  # fairseq's adam has no `implementation` field
                    cmd += ["~optimizer.implementation"]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
                if proc.returncode != 0:
                    raise RuntimeError(f"{kind}: fairseq-hydra-train failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
                lines = [(t, int(float(x["num_updates"]))) for t, x in parse_log(proc.stdout + proc.stderr)["train_inner"]]
                timed = [(t, u) for t, u in lines if u >= warmup]
                (t0, u0), (t1, u1) = timed[0], timed[-1]
                out[kind].append((u1 - u0) / (t1 - t0))
    return {kind: {"updates_per_s": max(v), "runs": v} for kind, v in out.items()}


def render(res: dict) -> str:
    o, f = res["optimizer"], res["fairseq"]
    a, t = o["adam"], o["torch_adamw"]
    lines = [
        "## Trainer overhead (`scripts/bench_trainer.py`, CPU)", "",
        f"- {res['date']}; {res['machine']}; torch {res['torch']}; command: `{res['command']}`",
        "- Baseline: fairseq's `adam` and gradient clipping, timed in the same run. Times are the fastest of "
        "interleaved repetitions (other jobs on the machine only slow a run down).", "",
        "| per update | fairseq `adam` | plugin `torch_adamw` | ratio |", "|---|---|---|---|",
        f"| optimizer phase (multiply + clip 2.0 + step), seed student: {o['tensors']} tensors, {o['values_m']:.1f}M "
        f"fp32 values: kernels dispatched | {a['kernels']} | {t['kernels']} ({t['implementation']}) | "
        f"x{a['kernels'] / t['kernels']:.0f} fewer |",
        f"| the same: CPU time | {a['ms']:.1f} ms | {t['ms']:.1f} ms | x{a['ms'] / t['ms']:.2f} |",
        f"| whole updates through `fairseq-hydra-train preset=tiny model.student_depth=4` (CPU, 1 thread): updates/s | "
        f"{f['adam']['updates_per_s']:.1f} | {f['torch_adamw']['updates_per_s']:.1f} | "
        f"x{f['torch_adamw']['updates_per_s'] / f['adam']['updates_per_s']:.2f} |", "",
        f"- fairseq `adam` kernels: {', '.join(f'{k} {v}' for k, v in a['top_kernels'].items())}; "
        f"`torch_adamw`: {', '.join(f'{k} {v}' for k, v in t['top_kernels'].items())}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7, help="optimizer-phase repetitions per optimizer")
    p.add_argument("--depth", type=int, default=6, help="student blocks (seed: 6)")
    p.add_argument("--rounds", type=int, default=3, help="fairseq runs per optimizer")
    p.add_argument("--updates", type=int, default=60, help="timed updates per fairseq run")
    p.add_argument("--warmup", type=int, default=10, help="untimed updates per fairseq run")
    p.add_argument("--json", default=None)
    p.add_argument("--update-benchmarks", default=None, metavar="BENCHMARKS.md")
    args = p.parse_args(argv)
    from bench_gpu import cpu_name

    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_name(),
           "torch": torch.__version__,
           "command": "python scripts/bench_trainer.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))}
    res["optimizer"] = bench_optimizer(args.reps, args.depth)
    res["fairseq"] = bench_fairseq(args.rounds, args.updates, args.warmup)
    from bench import publish

    publish("bench_trainer", render(res), res, args.json, args.update_benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
