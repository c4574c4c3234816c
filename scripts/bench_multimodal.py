#!/usr/bin/env python3
"""CPU benchmark of one student learning from three teachers at once (``kd_multimodal``) against the three
single-modality distillations run one after the other, at reduced size, all measured in the same run.

    python scripts/bench_multimodal.py                     # ~4 minutes on 2 cores; prints a Markdown table
    python scripts/bench_multimodal.py --update-benchmarks BENCHMARKS.md

The data and teachers are those of ``scripts/demo.sh --modality all`` (three random data2vec2 teachers of one
width, 4 blocks each; a 2-block student), written into ``--data`` (kept, and reused on the next run). Every run
is the real ``fairseq-hydra-train`` with validation and checkpoints off; each multimodal update holds one batch
per modality of the same size as the single runs' batches (the ``demo_all`` preset: 16 images, 16 blocks of 64
tokens, up to 96,000 audio samples), so the work per update is the same and what differs is the structure:
one process, one optimizer step and one set of frozen encoders and teachers resident for all modalities.

Measured per run: training speed (updates/s from the trainer's own log timestamps, after untimed warm-up
updates), the process's wall time (start-up, teacher loading and data indexing included) and its peak
resident memory (``ru_maxrss`` of that process). Runs are interleaved over ``--rounds`` rounds and the best
of each is kept (other jobs on the machine only slow a run down). A last multimodal run with ``common.bf16``
shows the teachers' blocks held in bf16 (CPU bf16 speed says nothing about a GPU's; the row is for memory).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

COMMON = ["task.retrieval=false", "dataset.disable_validation=true", "checkpoint.no_save=true",
          "checkpoint.best_checkpoint_metric=loss", "checkpoint.maximize_best_checkpoint_metric=false",
          "common.log_interval=10", "dataset.num_workers=1", "lr_scheduler.warmup_updates=5"]


def runs(d: dict) -> dict:
    """name -> (config, preset, overrides): the three single runs and the multimodal one, batch for batch."""
    return {
        "image": ("kd_image", "demo", [f"task.data={d['IMAGE_DATA']}", f"model.teacher_checkpoint={d['IMAGE_TEACHER']}",
                                       "dataset.batch_size=16"]),
        "text": ("kd_text", "demo_text", [f"task.data={d['TEXT_DATA']}", f"model.teacher_checkpoint={d['TEXT_TEACHER']}",
                                          "dataset.batch_size=16", "task.tokens_per_sample=64"]),
        "audio": ("kd_audio", "demo_audio", [f"task.data={d['AUDIO_DATA']}",
                                             f"model.teacher_checkpoint={d['AUDIO_TEACHER']}",
                                             "dataset.max_tokens=96000"]),
        "multimodal": ("kd_multimodal", "demo_all", [
            f"task.image_data={d['IMAGE_DATA']}", f"task.text_data={d['TEXT_DATA']}",
            f"task.audio_data={d['AUDIO_DATA']}", f"model.image_teacher={d['IMAGE_TEACHER']}",
            f"model.text_teacher={d['TEXT_TEACHER']}", f"model.audio_teacher={d['AUDIO_TEACHER']}"]),
    }


def run_one(name: str, spec: tuple, save: Path, updates: int, warmup: int, threads: int, extra=()) -> dict:
    """One ``fairseq-hydra-train`` process: updates/s after ``warmup`` updates, wall seconds, peak RSS."""
    from bench_gpu_e2e import parse_log

    config, preset, overrides = spec
    cmd = [str(Path(sys.executable).parent / "fairseq-hydra-train"), "--config-dir", "config", "--config-name", config,
           f"preset={preset}", *overrides, *COMMON, f"checkpoint.save_dir={save}",
           f"optimization.max_update={warmup + updates}", *extra]
    log = save.parent / f"{save.name}.out"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{name}: fairseq-hydra-train failed:\n{text[-4000:]}")
    rows = [(t, int(float(x["num_updates"]))) for t, x in parse_log(text)["train_inner"]]
    timed = [(t, u) for t, u in rows if u >= warmup]
    if len(timed) < 2:
        raise RuntimeError(f"{name}: fewer than two logged intervals after {warmup} updates ({log})")
    (t0, u0), (t1, u1) = timed[0], timed[-1]
    precision = re.search(r"precision: (.*)", text)
    return {"updates_per_s": (u1 - u0) / (t1 - t0), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "precision": precision.group(1).strip() if precision else ""}


def measure(data: dict, tmp: Path, rounds: int, updates: int, warmup: int, threads: int) -> dict:
    specs = runs(data)
    res = {name: [] for name in specs}
    for r in range(rounds):
        for name, spec in specs.items():
            res[name].append(run_one(name, spec, tmp / f"{name}_{r}", updates, warmup, threads))
            print(f"[bench_multimodal] round {r + 1}/{rounds} {name}: {res[name][-1]['updates_per_s']:.2f} updates/s, "
                  f"{res[name][-1]['wall_s']:.0f} s, {res[name][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    best = {name: {"updates_per_s": max(x["updates_per_s"] for x in v), "wall_s": min(x["wall_s"] for x in v),
                   "peak_rss_mb": min(x["peak_rss_mb"] for x in v), "precision": v[0]["precision"]}
            for name, v in res.items()}
    best["multimodal_bf16"] = run_one("multimodal_bf16", specs["multimodal"], tmp / "multimodal_bf16", updates, warmup,
                                      threads, extra=["common.bf16=true"])
    return best


def render(res: dict) -> str:
    b, singles = res["best"], ("image", "text", "audio")
    seq_s_per_update = sum(1 / b[m]["updates_per_s"] for m in singles)
    seq_wall = sum(b[m]["wall_s"] for m in singles)
    mm = b["multimodal"]
    lines = [
        "## One student, three teachers (`scripts/bench_multimodal.py`, CPU, reduced size)", "",
        f"- {res['date']}; {res['machine']}; torch {res['torch']}; command: `{res['command']}`",
        "- Baseline: the three single-modality distillations (`kd_image`, `kd_text`, `kd_audio`) one after the "
        "other, measured in the same run. Demo-size random teachers (4 blocks, width 128) and a 2-block student; "
        "per update one batch of each modality (16 images of 64 px, 16 blocks of 64 tokens, up to 96,000 audio "
        f"samples); {res['updates']} timed updates after {res['warmup']} untimed, validation and checkpoints off, "
        f"{res['threads']} threads; best of {res['rounds']} interleaved rounds.", "",
        "| run | updates/s | time per update (all modalities) | process wall time | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for m in singles:
        lines.append(f"| `kd_{m}` alone | {b[m]['updates_per_s']:.2f} | {1000 / b[m]['updates_per_s']:.0f} ms | "
                     f"{b[m]['wall_s']:.0f} s | {b[m]['peak_rss_mb']:.0f} MB |")
    lines += [
        f"| the three one after the other | - | {1000 * seq_s_per_update:.0f} ms | {seq_wall:.0f} s | "
        f"{max(b[m]['peak_rss_mb'] for m in singles):.0f} MB (largest) |",
        f"| `kd_multimodal`, one student | {mm['updates_per_s']:.2f} | {1000 / mm['updates_per_s']:.0f} ms "
        f"(x{seq_s_per_update * mm['updates_per_s']:.2f} vs sequential) | {mm['wall_s']:.0f} s "
        f"(x{seq_wall / mm['wall_s']:.2f}) | {mm['peak_rss_mb']:.0f} MB |",
        f"| `kd_multimodal`, `common.bf16=true` | {b['multimodal_bf16']['updates_per_s']:.2f} | "
        f"{1000 / b['multimodal_bf16']['updates_per_s']:.0f} ms | {b['multimodal_bf16']['wall_s']:.0f} s | "
        f"{b['multimodal_bf16']['peak_rss_mb']:.0f} MB |", "",
        "- Ratios above 1 favour the multimodal run. Time per update compares like with like (the same three "
        "batches); the wall time adds what one process saves in start-ups, teacher loading and data indexing. "
        "Peak RSS at this size is mostly the Python/torch/fairseq process itself; what grows with model size is the "
        "frozen teachers' blocks, all resident at once in the multimodal run (at base size 10 + 12 + 12 blocks of "
        "7.1M parameters, 240M: 1.0 GB in fp32, 0.5 GB in bf16), and the activations of one modality's batch at a time (the step runs one "
        "forward/backward per modality).",
        f"- Precision logged by the multimodal run: fp32 `{mm['precision']}`; bf16 `{b['multimodal_bf16']['precision']}`"
        " (CPU bf16 speed is not a GPU's; the bf16 row is there for the dtypes).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "demo_out_all",
                   help="folder for the demo data and teachers (scripts/demo.sh --modality all's default; reused)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--updates", type=int, default=40, help="timed updates per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed updates per run")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    p.add_argument("--json", default=None)
    p.add_argument("--update-benchmarks", default=None, metavar="BENCHMARKS.md")
    args = p.parse_args(argv)
    import tempfile

    import torch
    from bench_gpu import cpu_name
    from demo import prepare_all

    data = {k: str(v) for k, v in prepare_all(args.data).items()}
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_name(),
           "torch": torch.__version__, "rounds": args.rounds, "updates": args.updates, "warmup": args.warmup,
           "threads": args.threads,
           "command": "python scripts/bench_multimodal.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))}
    with tempfile.TemporaryDirectory(prefix="bench_multimodal_") as tmp:
        res["best"] = measure(data, Path(tmp), args.rounds, args.updates, args.warmup, args.threads)
    from bench import publish

    publish("bench_multimodal", render(res), res, args.json, args.update_benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
