#!/usr/bin/env python3
"""Benchmark of one student learning from three teachers at once (``kd_multimodal``) against the three
single-modality distillations run one after the other, all measured in the same run.

    python scripts/bench_multimodal.py                     # CPU, demo size: ~2 minutes on 2 cores
    python scripts/bench_multimodal.py --update-benchmarks BENCHMARKS.md
    python scripts/bench_multimodal.py --size base --device cuda --json $OUT/bench_multimodal.json   # one GPU
    python scripts/bench_multimodal.py --from-json bench_multimodal.json --update-benchmarks BENCHMARKS.md

On a GPU node without fairseq, install it from a wheelhouse first (``bash scripts/install_offline.sh .whl``,
docs/install.md) and run from the repo root with ``PYTHONPATH=$PWD``.

``--size demo``: the data and teachers of ``scripts/demo.sh --modality all`` (three random data2vec2 teachers of
one width, 4 blocks each; a 2-block student), written into ``--data`` (kept, and reused on the next run); each
multimodal update holds one batch per modality of the same size as the single runs' batches (the ``demo_all``
preset: 16 images, 16 blocks of 64 tokens, up to 96,000 audio samples). ``--size base``: random teachers of the
released base models' sizes (ViT-B/16 at 224 px; text and audio 12 blocks, 768 wide) on the same demo data,
with the configs' own settings (a 6-block student; 256 images, 64 blocks of 512 tokens, up to 1,000,000 audio
samples per update; ``kd_audio``'s ``update_freq`` 8 set to 1, as the multimodal step takes one audio batch;
``model.compile`` off everywhere, as in ``kd_multimodal``). Either way the work per update is the same and what
differs is the structure: one process, one optimizer step and one set of frozen encoders and teachers resident
for all modalities. Every run is the real ``fairseq-hydra-train`` with validation and checkpoints off.

Measured per run: training speed (updates/s from the trainer's own log timestamps, after untimed warm-up
updates), the process's wall time (start-up, teacher loading and data indexing included), its peak resident
memory (``ru_maxrss`` of that process) and, on a GPU, its peak GPU memory (the device's total less the least
``gb_free`` fairseq logged: ``torch.cuda.max_memory_allocated`` per interval). Runs are interleaved over
``--rounds`` rounds and the best of each is kept (other jobs on the machine only slow a run down). A last
multimodal run in the other precision (bf16 on CPU, where the runs are fp32; fp32 on a GPU, where they are bf16)
shows what the teachers' precision costs; the logged ``precision:`` line says what each part ran in.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = ["task.retrieval=false", "dataset.disable_validation=true", "checkpoint.no_save=true",
          "checkpoint.best_checkpoint_metric=loss", "checkpoint.maximize_best_checkpoint_metric=false",
          "common.log_interval=10", "lr_scheduler.warmup_updates=5"]


def runs(d: dict, size: str, device: str) -> dict:
    """name -> (config, overrides): the three single runs and the multimodal one, batch for batch."""
    teachers = {m: d[f"{m.upper()}_TEACHER"] for m in ("image", "text", "audio")}
    data = {m: d[f"{m.upper()}_DATA"] for m in ("image", "text", "audio")}
    single = {m: [f"task.data={data[m]}", f"model.teacher_checkpoint={teachers[m]}"] for m in data}
    multi = [f"task.{m}_data={data[m]}" for m in data] + [f"model.{m}_teacher={teachers[m]}" for m in data]
    if size == "demo":
        single["image"] += ["preset=demo", "dataset.batch_size=16"]
        single["text"] += ["preset=demo_text", "dataset.batch_size=16", "task.tokens_per_sample=64"]
        single["audio"] += ["preset=demo_audio", "dataset.max_tokens=96000"]
        multi += ["preset=demo_all"]
    else:  # the configs' own sizes; the demo's clips last 0.8-1.6 s
        single["image"] += ["model.compile=false"]
        single["audio"] += ["optimization.update_freq=[1]", "task.min_sample_size=8000"]
        multi += ["task.min_sample_size=8000"]
    on = ["common.cpu=true", "common.bf16=false"] if device == "cpu" else ["common.cpu=false", "common.bf16=true"]
    workers = "dataset.num_workers=1" if size == "demo" else f"dataset.num_workers={min(12, os.cpu_count() or 1)}"
    return {**{m: (f"kd_{m}", [*o, *on, workers]) for m, o in single.items()},
            "multimodal": ("kd_multimodal", [*multi, *on, workers])}


def run_one(name: str, spec: tuple, save: Path, updates: int, warmup: int, threads: int, extra=()) -> dict:
    """One ``fairseq-hydra-train`` process: updates/s after ``warmup`` updates, wall seconds, peak RSS and (on a
    GPU) peak GPU memory."""
    from bench_gpu_e2e import fairseq_bin, parse_log

    config, overrides = spec
    cmd = [fairseq_bin(), "--config-dir", "config", "--config-name", config,
           *overrides, *COMMON, f"checkpoint.save_dir={save}", f"optimization.max_update={warmup + updates}", *extra]
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
    rows = parse_log(text)["train_inner"]
    timed = [(t, int(float(x["num_updates"]))) for t, x in rows if int(float(x["num_updates"])) >= warmup]
    if len(timed) < 2:
        raise RuntimeError(f"{name}: fewer than two logged intervals after {warmup} updates ({log})")
    (t0, u0), (t1, u1) = timed[0], timed[-1]
    precision = re.search(r"precision: (.*)", text)
    free = [float(x["gb_free"]) for _, x in rows if "gb_free" in x]
    return {"updates_per_s": (u1 - u0) / (t1 - t0), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "min_gb_free": min(free) if free else None,
            "precision": precision.group(1).strip() if precision else ""}


def measure(specs: dict, tmp: Path, args) -> dict:
    res = {name: [] for name in specs}
    for r in range(args.rounds):
        for name, spec in specs.items():
            x = run_one(name, spec, tmp / f"{name}_{r}", args.updates, args.warmup, args.threads)
            res[name].append(x)
            print(f"[bench_multimodal] round {r + 1}/{args.rounds} {name}: {x['updates_per_s']:.2f} updates/s, "
                  f"{x['wall_s']:.0f} s, {x['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    best = {name: {"updates_per_s": max(x["updates_per_s"] for x in v), "wall_s": min(x["wall_s"] for x in v),
                   "peak_rss_mb": min(x["peak_rss_mb"] for x in v), "precision": v[0]["precision"],
                   "min_gb_free": max((x["min_gb_free"] for x in v), default=None)}
            for name, v in res.items()}
    other = "common.bf16=true" if args.device == "cpu" else "common.bf16=false"
    best["multimodal_other"] = run_one("multimodal_other", specs["multimodal"], tmp / "multimodal_other",
                                       args.updates, args.warmup, args.threads, extra=[other])
    best["multimodal_other"]["setting"] = other
    return best


def render(res: dict) -> str:
    b, singles, gpu = res["best"], ("image", "text", "audio"), res["device"] == "cuda"
    seq_s_per_update = sum(1 / b[m]["updates_per_s"] for m in singles)
    seq_wall = sum(b[m]["wall_s"] for m in singles)
    mm, other = b["multimodal"], b["multimodal_other"]

    def gpu_mem(x):
        return f" | {res['gpu_total_gb'] - x['min_gb_free']:.1f} GB" if gpu and x["min_gb_free"] is not None else \
            (" | n/a" if gpu else "")

    if res["size"] == "demo":
        sizes = ("Demo-size random teachers (4 blocks, width 128) and a 2-block student; per update one batch of each "
                 "modality (16 images of 64 px, 16 blocks of 64 tokens, up to 96,000 audio samples)")
    else:
        sizes = ("Random teachers of the base models' sizes (ViT-B/16 at 224 px with 2 prenet + 10 blocks; text and "
                 "audio 12 blocks; 768 wide) and the configs' 6-block student; per update one batch of each modality "
                 "(256 generated ImageNet-sized JPEGs, 64 blocks of 512 tokens, up to 1,000,000 audio samples), "
                 "`model.compile` off")
    where = "GPU" if gpu else "CPU"
    lines = [
        f"## One student, three teachers (`scripts/bench_multimodal.py`, {where}, "
        f"{'reduced size' if res['size'] == 'demo' else 'base size'})", "",
        f"- {res['date']}; {res['machine']}; torch {res['torch']}; command: `{res['command']}`",
        "- Baseline: the three single-modality distillations (`kd_image`, `kd_text`, `kd_audio`) one after the "
        f"other, measured in the same run. {sizes}; {res['updates']} timed updates after {res['warmup']} untimed, "
        f"validation and checkpoints off, {'bf16' if gpu else 'fp32'}, {res['threads']} threads; best of "
        f"{res['rounds']} interleaved rounds.", "",
        "| run | updates/s | time per update (all modalities) | process wall time | peak RSS"
        + (" | peak GPU memory |" if gpu else " |"),
        "|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for m in singles:
        lines.append(f"| `kd_{m}` alone | {b[m]['updates_per_s']:.2f} | {1000 / b[m]['updates_per_s']:.0f} ms | "
                     f"{b[m]['wall_s']:.0f} s | {b[m]['peak_rss_mb']:.0f} MB{gpu_mem(b[m])} |")
    largest = max(singles, key=lambda m: (res["gpu_total_gb"] - b[m]["min_gb_free"]) if gpu and b[m]["min_gb_free"]
                  is not None else b[m]["peak_rss_mb"])
    lines += [
        f"| the three one after the other | - | {1000 * seq_s_per_update:.0f} ms | {seq_wall:.0f} s | "
        f"{max(b[m]['peak_rss_mb'] for m in singles):.0f} MB (largest){gpu_mem(b[largest])} |",
        f"| `kd_multimodal`, one student | {mm['updates_per_s']:.2f} | {1000 / mm['updates_per_s']:.0f} ms "
        f"(x{seq_s_per_update * mm['updates_per_s']:.2f} vs sequential) | {mm['wall_s']:.0f} s "
        f"(x{seq_wall / mm['wall_s']:.2f}) | {mm['peak_rss_mb']:.0f} MB{gpu_mem(mm)} |",
        f"| `kd_multimodal`, `{other['setting']}` | {other['updates_per_s']:.2f} | "
        f"{1000 / other['updates_per_s']:.0f} ms | {other['wall_s']:.0f} s | "
        f"{other['peak_rss_mb']:.0f} MB{gpu_mem(other)} |", "",
        "- Ratios above 1 favour the multimodal run. Time per update compares like with like (the same three "
        "batches); the wall time adds what one process saves in start-ups, teacher loading and data indexing. "
        + ("Peak GPU memory: the device's total less the least `gb_free` fairseq logged (its "
           "`torch.cuda.max_memory_allocated` per interval). " if gpu else "")
        + ("Peak RSS at this size is mostly the Python/torch/fairseq process itself; what grows with model size is "
           "the frozen teachers' blocks, all resident at once in the multimodal run (at base size 10 + 12 + 12 "
           "blocks of 7.1M parameters, 240M: 1.0 GB in fp32, 0.5 GB in bf16), and the activations of one "
           "modality's batch at a time (the step runs one forward/backward per modality)." if res["size"] == "demo"
           else "The multimodal step runs one forward/backward per modality, so its activations are those of one "
           "modality's batch at a time, next to all three teachers' blocks."),
        f"- Precision logged by the multimodal run: `{mm['precision']}`; with `{other['setting']}`: "
        f"`{other['precision']}`"
        + (" (CPU bf16 speed is not a GPU's; that row is there for the dtypes)." if not gpu else "."),
    ]
    return "\n".join(lines) + "\n"


def prepare(args) -> dict:
    """Data and random teachers: the multimodal demo's (``--size demo``), or base-size teachers on the text and
    audio demos' data and generated ImageNet-sized JPEGs (``--size base``; no scikit-image needed)."""
    if args.size == "demo":
        from demo import prepare_all

        return {k: str(v) for k, v in prepare_all(args.data).items()}
    from bench_gpu_e2e import make_images, make_teacher
    from demo import BASE_SEQUENCE_TEACHER, prepare_sequences

    make_images(args.data / "images", args.images, tiny=False)
    make_teacher(args.data / "teacher_base_image.pt", tiny=False)
    found = {"IMAGE_DATA": str(args.data / "images"), "IMAGE_TEACHER": str(args.data / "teacher_base_image.pt")}
    for m in ("text", "audio"):
        seq = prepare_sequences(args.data, m, None, 0, BASE_SEQUENCE_TEACHER, f"teacher_base_{m}.pt")
        found.update({f"{m.upper()}_DATA": str(seq["DATA"]), f"{m.upper()}_TEACHER": str(seq["TEACHER"])})
    return found


def section_name(res: dict) -> str:
    """BENCHMARKS.md keeps one section per size and device: a GPU run leaves the CPU one in place."""
    return "bench_multimodal" if (res["size"], res["device"]) == ("demo", "cpu") else \
        f"bench_multimodal_{res['size']}_{res['device']}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("demo", "base"), default="demo")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data", type=Path, default=None,
                   help="folder for the data and teachers, reused (default: demo_out_all, scripts/demo.sh --modality "
                        "all's; demo_out_all_base for --size base)")
    p.add_argument("--images", type=int, default=5120, help="--size base: generated JPEGs")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--updates", type=int, default=40, help="timed updates per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed updates per run")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    p.add_argument("--json", default=None)
    p.add_argument("--update-benchmarks", default=None, metavar="BENCHMARKS.md")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="measure nothing: render the --json of an earlier run (e.g. one brought back from a GPU)")
    args = p.parse_args(argv)
    if args.from_json:
        from bench import publish

        res = json.loads(Path(args.from_json).read_text())
        publish(section_name(res), render(res), res, None, args.update_benchmarks)
        return 0
    args.data = args.data or REPO / ("demo_out_all" if args.size == "demo" else "demo_out_all_base")
    import tempfile

    import torch
    from bench_gpu import cpu_name

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU on this machine")
    specs = runs(prepare(args), args.size, args.device)
    gpu = args.device == "cuda"
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": torch.cuda.get_device_name(0) if gpu else cpu_name(), "torch": torch.__version__,
           "size": args.size, "device": args.device, "rounds": args.rounds, "updates": args.updates,
           "warmup": args.warmup, "threads": args.threads,
           "gpu_total_gb": torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if gpu else None,
           "command": "python scripts/bench_multimodal.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))}
    with tempfile.TemporaryDirectory(prefix="bench_multimodal_") as tmp:
        res["best"] = measure(specs, Path(tmp), args)
    from bench import publish

    publish(section_name(res), render(res), res, args.json, args.update_benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
