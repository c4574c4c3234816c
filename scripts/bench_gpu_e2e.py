#!/usr/bin/env python3
"""End-to-end GPU benchmark: the seed run through ``fairseq-hydra-train``, beside the core figure of the same run.

    bash scripts/bench_gpu_e2e.sh                  # one GPU: ~8 minutes, stays under --budget-s (480)
    bash scripts/bench_gpu_e2e.sh --cpu-tiny       # the same path on CPU at tiny sizes (a test runs it)

``scripts/bench_gpu.sh`` times the distillation core alone (data already on the GPU, no trainer). This
script times what a user runs, on the same machine in the same run, and reports each figure as a fraction
of the core's. Stages, in order of importance (the JSON is rewritten after each; a stage that would not
fit in the remaining budget is skipped and says so):

1. Data, made here with one process per core: ``--images`` JPEGs of ImageNet's typical sizes and file
   sizes (500 x 375 and the like, ~110 KB; photo-like content plus sensor-like noise), listed
   ``--list-repeats`` times in a list file so that no epoch boundary (fairseq restarts its DataLoader
   workers every epoch) falls in the timed window; CIFAR-10/100-sized retrieval sets (50,000 + 10,000
   32 px images each, torchvision's pickle layout); a randomly initialised data2vec 2.0 ViT-B/16 teacher
   (2 prenet + 10 blocks, 768 wide, 224 px) written in data2vec2's checkpoint format.
2. Core: ``scripts/bench_gpu.py --variants eager,compile_step`` (its figures for the same sizes).
3. ``fairseq-hydra-train --config-dir config --config-name kd_image`` (the seed config: bf16, batch 256,
   12 data workers capped at the cores) for ``--warmup-updates`` + ``--updates`` updates; images/s from
   the trainer's own log timestamps over the updates after warm-up. Variants: ``compiled``
   (``model.compile=true``, ``task.gpu_decode=auto``: the seed setting), ``eager`` (``model.compile=false``),
   ``compiled_worker_decode`` (``task.gpu_decode=false``: JPEGs decoded by the CPU workers) and
   ``compiled_fairseq_adam`` (fairseq's own ``adam`` instead of the plugin's fused ``torch_adamw``). The first
   run ends with one validation round (CIFAR-sized retrieval for student and teacher), timed from the log.
4. The data loader alone at batch 256 with the seed's workers: CPU decode + augment in the workers, and
   device decode (workers read bytes, the GPU decodes and augments).

Results: a table on stdout, ``bench_gpu_e2e.json`` and ``bench_gpu_e2e.md`` in ``$OUT`` (or the current
folder); ``--update-benchmarks BENCHMARKS.md`` also replaces that file's end-to-end section (on the machine
that ran it; elsewhere ``python scripts/bench_gpu_e2e.py --paste $OUT/bench_gpu_e2e.md --update-benchmarks
BENCHMARKS.md`` pastes a result brought back).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEED_RUN_UPDATES = 30_000
SEED_VALIDATIONS = 30  # validate_interval_updates 1,000 over 30,000 updates
GOAL_FRACTION = 0.90
GOAL_SEED_RUN_MIN = 35.0
VARIANTS = {  # name: (model.compile, task.gpu_decode, other overrides)
    "compiled": ("true", "auto", ()),
    "eager": ("false", "auto", ()),
    "compiled_worker_decode": ("true", "false", ()),
    "compiled_fairseq_adam": ("true", "auto", ("optimizer._name=adam", "~optimizer.implementation")),
    "eager_worker_decode": ("false", "false", ()),
}


@dataclasses.dataclass
class Plan:
    images: int = 20_000
    list_repeats: int = 16
    cifar_train: int = 50_000
    cifar_test: int = 10_000
    batch: int = 256
    warmup_updates: int = 40
    updates: int = 200
    log_interval: int = 20
    loader_batches: int = 40
    workers: int = 12  # the seed config's dataset.num_workers
    variants: tuple = ("compiled", "eager", "compiled_worker_decode", "compiled_fairseq_adam")
    core_variants: str = "eager,compile_step"
    core_validation: bool = True


TINY = dict(images=48, list_repeats=4, cifar_train=60, cifar_test=30, batch=8, warmup_updates=4, updates=8,
            log_interval=2, loader_batches=4, workers=1, variants=("eager", "eager_worker_decode"),
            core_variants="eager", core_validation=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-tiny", action="store_true", help="the same path on CPU at tiny sizes (seconds)")
    for f in dataclasses.fields(Plan):
        if f.type in ("int", int):
            p.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                           help=f"default {f.default} (--cpu-tiny: {TINY.get(f.name, f.default)})")
    p.add_argument("--variants", default=None, help=f"fairseq runs, of {', '.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 480; --cpu-tiny 240)")
    p.add_argument("--work-dir", default=None, help="data and run folders (default $TMPDIR/mmkd_e2e[_tiny]; reused)")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/bench_gpu_e2e.json or ./bench_gpu_e2e.json)")
    p.add_argument("--update-benchmarks", default=None, metavar="BENCHMARKS.md",
                   help="replace the end-to-end section of this file with the result")
    p.add_argument("--paste", default=None, metavar="bench_gpu_e2e.md",
                   help="only paste this result (brought back from the GPU machine) into --update-benchmarks, and exit")
    args = p.parse_args(argv)
    plan = Plan(**(TINY if args.cpu_tiny else {}))
    for f in dataclasses.fields(Plan):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "variants":
            setattr(plan, f.name, value)
    if args.variants:
        plan.variants = tuple(v for v in args.variants.split(",") if v)
        unknown = sorted(set(plan.variants) - set(VARIANTS))
        if unknown:
            p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.plan = plan
    if args.budget_s is None:
        args.budget_s = 240.0 if args.cpu_tiny else 480.0
    if args.work_dir is None:
        base = Path(os.environ.get("TMPDIR", "/tmp"))
        args.work_dir = str(base / ("mmkd_e2e_tiny" if args.cpu_tiny else "mmkd_e2e"))
    return args


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------

# ImageNet train images: mostly 500 px on the long side, 4:3 and 3:2 dominating; some larger.
SHAPES = [(500, 375)] * 8 + [(500, 333)] * 4 + [(375, 500)] * 3 + [(500, 500), (640, 480), (800, 600), (1024, 768)]
TINY_SHAPES = [(48, 36), (36, 48), (64, 48), (40, 40)]


def _write_jpeg(job):
    path, w, h, seed = job
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    img += rng.normal(0.0, 9.0, img.shape)  # texture: brings the files to ImageNet's typical JPEG size
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def make_images(root: Path, count: int, tiny: bool) -> dict:
    """``count`` JPEGs in ImageFolder layout, written by one process per core; reused when already there."""
    shapes = TINY_SHAPES if tiny else SHAPES
    jobs = []
    for i in range(count):
        w, h = shapes[i % len(shapes)]
        jobs.append((str(root / f"class_{i % 100:03d}" / f"img_{i:06d}.jpg"), w, h, i))
    stamp = root / f".complete_{count}"
    start = time.perf_counter()
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        for d in {os.path.dirname(j[0]) for j in jobs}:
            os.makedirs(d, exist_ok=True)
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
            pool.map(_write_jpeg, jobs, chunksize=64)
        stamp.write_text("ok")
    sizes = [os.path.getsize(j[0]) for j in jobs]
    return {"count": count, "seconds": time.perf_counter() - start, "mean_kb": float(np.mean(sizes)) / 1024,
            "mean_pixels": float(np.mean([j[1] * j[2] for j in jobs])), "paths": [j[0] for j in jobs],
            "shapes": sorted({f"{w}x{h}" for w, h in shapes})}


def make_list(path: Path, paths: list, repeats: int) -> int:
    path.write_text("".join(p + "\n" for _ in range(repeats) for p in paths))
    return len(paths) * repeats


def make_cifar(root: Path, train: int, test: int) -> None:
    from fairseq_mmkd.retrieval import write_cifar

    stamp = root / f".complete_{train}_{test}"
    if stamp.exists():
        return
    rng = np.random.default_rng(0)
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        means = rng.integers(30, 225, size=(classes, 3))

        def split(n):
            labels = np.arange(n) % classes
            noise = rng.integers(-40, 41, size=(n, 32, 32, 3))
            return np.clip(means[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8), labels.tolist()

        (tr, trl), (te, tel) = split(train), split(test)
        write_cifar(root, name, tr, trl, te, tel)
    stamp.write_text("ok")


def make_teacher(path: Path, tiny: bool) -> dict:
    """A randomly initialised data2vec 2.0 image model at bench_gpu's sizes, in data2vec2's checkpoint format."""
    from bench_gpu import TINY as CORE_TINY, Sizes, model_config

    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
    from fairseq_mmkd.d2v.model import D2vModel

    sizes = Sizes(**(CORE_TINY if tiny else {}))
    if not path.exists():
        torch.manual_seed(0)
        save_d2v_checkpoint(D2vModel(model_config(sizes)), str(path))
    return {"embed_dim": sizes.embed_dim, "depth": sizes.depth, "prenet": sizes.prenet, "heads": sizes.heads,
            "input_size": sizes.input_size, "patch_size": sizes.patch_size, "student_depth": sizes.student_depth,
            "core_sizes": sizes}


# ------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------

def run_core(args, work: Path, remaining: float) -> dict:
    """``bench_gpu.py`` in a child process: the core figures for the same sizes on the same machine."""
    out = work / "core.json"
    plan = args.plan
    cmd = [sys.executable, str(SCRIPTS / "bench_gpu.py"), "--variants", plan.core_variants, "--json", str(out),
           "--budget-s", str(max(30.0, remaining - 5.0))]
    cmd += ["--cpu-tiny"] if args.cpu_tiny else []
    cmd += [] if plan.core_validation else ["--skip-validation"]
    proc = _run(cmd, timeout=remaining)
    if not out.exists():
        return {"error": f"bench_gpu.py exited with {proc['returncode']}", "log_tail": proc["log"][-2000:]}
    res = json.loads(out.read_text())
    keep = {k: res[k] for k in ("env", "matmul_tflops", "validation_s", "validation_with_teacher_s", "embed", "search")
            if k in res}
    keep["kd"] = {name: {k: r.get(k) for k in ("images_per_s", "step_ms", "peak_mem_gib", "compile_s", "error")
                         if r.get(k) is not None} for name, r in res.get("kd", {}).items()}
    keep["seconds"] = proc["seconds"]
    return keep


def _run(cmd, timeout, cwd=REPO, env=None) -> dict:
    start, wall_start = time.perf_counter(), time.time()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=max(1.0, timeout))
        code = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        log, _ = p.communicate()
        code = "timeout"
    return {"returncode": code, "log": log or "", "seconds": time.perf_counter() - start, "wall_start": wall_start}


_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[(\w+)\]\[\w+\] - (.*)$")


def parse_log(log: str) -> dict:
    """Timestamps and JSON payloads of fairseq's ``train_inner`` and ``valid`` lines."""
    out = {"train_inner": [], "valid": [], "first_line": None}
    for line in log.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out["first_line"] = out["first_line"] or t
        kind = m.group(2)
        if kind in ("train_inner", "valid"):
            try:
                out[kind].append((t, json.loads(m.group(3))))
            except json.JSONDecodeError:
                pass
    return out


def fairseq_bin() -> str:
    local = Path(sys.executable).parent / "fairseq-hydra-train"
    return str(local) if local.exists() else (shutil.which("fairseq-hydra-train") or "fairseq-hydra-train")


def run_fairseq(args, name: str, data: dict, validate: bool, timeout: float) -> dict:
    plan = args.plan
    compile_, decode, extra = VARIANTS[name]
    if args.cpu_tiny and decode == "auto":
        decode = "true"  # auto is off on CPU: force the device path so the smoke run exercises it
    total = plan.warmup_updates + plan.updates
    save_dir = Path(args.work_dir) / "runs" / name
    shutil.rmtree(save_dir, ignore_errors=True)
    overrides = [
        f"task.data={data['list']}", f"model.teacher_checkpoint={data['teacher']}",
        f"task.cifar10_root={data['cifar']}", f"task.cifar100_root={data['cifar']}",
        f"checkpoint.save_dir={save_dir}", "checkpoint.no_save=true",
        f"optimization.max_update={total}", f"lr_scheduler.max_update={SEED_RUN_UPDATES}",
        f"common.log_interval={plan.log_interval}", f"dataset.batch_size={plan.batch}",
        f"dataset.num_workers={plan.workers}", f"model.compile={compile_}", f"task.gpu_decode={decode}", *extra,
    ]
    overrides += ([f"dataset.validate_interval_updates={total}"] if validate else ["dataset.disable_validation=true"])
    if args.cpu_tiny:  # a student shallower than the tiny teacher, so that the loss is not zero from the start
        overrides = ["preset=tiny", "task.retrieval_batch_size=32", "model.student_depth=1"] + overrides
    cmd = [fairseq_bin(), "--config-dir", "config", "--config-name", "kd_image", *overrides]
    proc = _run(cmd, timeout=timeout, env={"OMP_NUM_THREADS": "1"} if args.cpu_tiny else None)
    parsed = parse_log(proc["log"])
    result = {"variant": name, "model.compile": compile_, "task.gpu_decode": decode, "seconds": proc["seconds"],
              "command": "fairseq-hydra-train --config-dir config --config-name kd_image " + " ".join(overrides)}
    lines = parsed["train_inner"]
    if proc["returncode"] != 0 or not lines:
        result.update(error=f"exit {proc['returncode']}", log_tail=proc["log"][-3000:])
        return result
    timed = [(t, int(float(r["num_updates"])), r) for t, r in lines if int(float(r["num_updates"])) >= plan.warmup_updates]
    if len(timed) < 2:
        result.update(error=f"too few log lines after warm-up ({len(lines)} in all)", log_tail=proc["log"][-3000:])
        return result
    (t0, u0, _), (t1, u1, _) = timed[0], timed[-1]
    result.update(updates=u1 - u0, window_s=t1 - t0, updates_per_s=(u1 - u0) / (t1 - t0),
                  images_per_s=(u1 - u0) * plan.batch / (t1 - t0),
                  startup_s=lines[0][0] - proc["wall_start"],  # to the first log line: start-up + first updates
                  fairseq_wps_median=float(np.median([float(r["wps"]) for _, _, r in timed[1:]] or [math.nan])),
                  loss_first=float(lines[0][1]["loss"]), loss_last=float(lines[-1][1]["loss"]),
                  bad_images=sum(float(r.get("bad_images", 0)) for _, r in lines))
    gb_free = [float(r["gb_free"]) for _, r in lines if "gb_free" in r]
    if gb_free:
        result["gb_free_min"] = min(gb_free)
    if validate:
        if parsed["valid"]:
            tv, valid = parsed["valid"][-1]
            result["validation_s"] = tv - lines[-1][0]
            result["valid"] = {k: valid[k] for k in valid if "top1" in k}
        else:
            result["validation_error"] = "no valid line in the log"
    return result


def bench_loader(args, paths: list, device_decode: bool, device: torch.device, timeout: float) -> dict:
    """The training DataLoader alone (fairseq's settings: pin_memory, the seed's workers), images/s."""
    from fairseq_mmkd.data.image_device import decode_batch
    from fairseq_mmkd.data.image import ImageListDataset
    from fairseq_mmkd.tasks._checks import fit_workers

    plan = args.plan
    size = make_teacher.last["input_size"]
    ds = ImageListDataset(paths, input_size=size, train=True, seed=1, device_decode=device_decode)
    workers = fit_workers(plan.workers)
    gen = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds, generator=gen), plan.batch, True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=ds.collater,
                                         pin_memory=device.type == "cuda")
    warm = max(2, workers)
    count, start, t0 = 0, time.perf_counter(), None
    for i, batch in enumerate(loader):
        if device_decode:
            x, _ = decode_batch(batch["net_input"]["source"], device, ds.fallback_crop, dtype=torch.bfloat16)
        else:
            x = batch["net_input"]["source"].to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i + 1 == warm:
            t0 = time.perf_counter()
        elif t0 is not None:
            count += len(x)
        if i + 1 >= warm + plan.loader_batches or time.perf_counter() - start > timeout:
            break
    seconds = time.perf_counter() - t0 if t0 else math.nan
    return {"device_decode": device_decode, "workers": workers, "batches": count // plan.batch,
            "images_per_s": count / seconds if count else math.nan, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------

def output_paths(args) -> tuple[Path, Path]:
    path = Path(args.json) if args.json else Path(os.environ.get("OUT") or ".") / "bench_gpu_e2e.json"
    return path, path.with_suffix(".md")


def _ratio(a, b):
    return a / b if a and b and not math.isnan(a) and not math.isnan(b) else math.nan


def summarize(res: dict) -> dict:
    core = res.get("core", {}).get("kd", {})
    compiled_core = core.get("compile_step", {}).get("images_per_s")
    eager_core = core.get("eager", {}).get("images_per_s")
    e2e = res.get("e2e", {})
    best = e2e.get("compiled", {}).get("images_per_s")
    summary = {"core_compile_step": compiled_core, "core_eager": eager_core}
    if best:
        valid = e2e["compiled"].get("validation_s") or 0.0
        minutes = SEED_RUN_UPDATES * res["plan"]["batch"] / best / 60 + SEED_VALIDATIONS * valid / 60
        summary.update(e2e_compiled=best, fraction_of_core=_ratio(best, compiled_core),
                       seed_run_min_upper_bound=minutes,
                       goal_met=bool(_ratio(best, compiled_core) >= GOAL_FRACTION and minutes < GOAL_SEED_RUN_MIN))
    return summary


def render(res: dict) -> str:
    plan, core, e2e, loader = res["plan"], res.get("core", {}), res.get("e2e", {}), res.get("loader", {})
    env, data = res["env"], res.get("data", {})
    kd = core.get("kd", {})
    c_ref, e_ref = kd.get("compile_step", {}).get("images_per_s"), kd.get("eager", {}).get("images_per_s")
    out = [f"## End-to-end GPU benchmark (`scripts/bench_gpu_e2e.sh{' --cpu-tiny' if res['cpu_tiny'] else ''}`)", "",
           f"- {env['device_name']}, {env['cores']} CPU cores, torch {env['torch']}, fairseq {env.get('fairseq')}, "
           f"Python {env['python']}; {res['date']}; command: `{res['command']}`; wall {res.get('wall_s', 0):.0f} s",
           f"- Data: {data.get('count', 0):,} JPEGs ({', '.join(data.get('shapes', []))}; mean {data.get('mean_kb', 0):.0f} KB, "
           f"{data.get('mean_pixels', 0) / 1e3:.0f} kpixels), listed {plan['list_repeats']}x "
           f"({data.get('list_entries', 0):,} entries: no epoch boundary in the timed window); CIFAR-sized retrieval "
           f"sets ({plan['cifar_train']:,} + {plan['cifar_test']:,} each); random ViT teacher "
           f"(D={res['teacher']['embed_dim']}, {res['teacher']['prenet']} prenet + {res['teacher']['depth']} blocks, "
           f"{res['teacher']['input_size']} px) in data2vec2's checkpoint format; student {res['teacher']['student_depth']} blocks",
           f"- fairseq runs: seed config, batch {plan['batch']}, {plan['warmup_updates']} warm-up updates then "
           f"{plan['updates']} timed (from the trainer's log timestamps); data workers {plan['workers']} requested", "",
           "| path | images/s | vs core compile_step | vs core eager | notes |", "|---|---|---|---|---|"]
    for name in ("compile_step", "eager"):
        r = kd.get(name)
        if r:
            out.append(f"| core `{name}` (bench_gpu.py, same run) | {r.get('images_per_s', math.nan):.0f} | "
                       f"{_ratio(r.get('images_per_s'), c_ref):.2f} | {_ratio(r.get('images_per_s'), e_ref):.2f} | "
                       f"{r.get('error', '')} |")
    for name, r in e2e.items():
        compile_, decode = r.get("model.compile"), r.get("task.gpu_decode")
        label = f"fairseq-hydra-train `{name}` (model.compile={compile_}, task.gpu_decode={decode}"
        label += "".join(f", {o}" for o in VARIANTS.get(name, ("", "", ()))[2]) + ")"
        if "error" in r:
            out.append(f"| {label} | failed: {r['error']} | | | |")
            continue
        notes = f"startup {r.get('startup_s') or 0:.0f} s; {r['updates']} updates in {r['window_s']:.1f} s"
        if "gb_free_min" in r:
            notes += f"; min free GPU memory {r['gb_free_min']:.0f} GiB"
        out.append(f"| {label} | {r['images_per_s']:.0f} | {_ratio(r['images_per_s'], c_ref):.2f} | "
                   f"{_ratio(r['images_per_s'], e_ref):.2f} | {notes} |")
    for name, r in loader.items():
        label = ("data loader alone, workers read bytes + device decode" if r.get("device_decode")
                 else "data loader alone, workers decode + augment")
        if "error" in r:
            out.append(f"| {label} | failed: {r['error']} | | | |")
            continue
        out.append(f"| {label} ({r['workers']} workers) | {r['images_per_s']:.0f} | "
                   f"{_ratio(r['images_per_s'], c_ref):.2f} | {_ratio(r['images_per_s'], e_ref):.2f} | "
                   f"{r['batches']} batches |")
    valid = e2e.get("compiled", {}).get("validation_s") or next(
        (r.get("validation_s") for r in e2e.values() if r.get("validation_s")), None)
    if valid:
        core_v = core.get("validation_with_teacher_s")
        out += ["", f"- Validation round through fairseq (first round: student and teacher, CIFAR-sized): "
                    f"**{valid:.1f} s**" + (f"; core (bench_gpu.py, same sizes): {core_v:.1f} s" if core_v else "")]
    s = res.get("summary", {})
    if s.get("e2e_compiled"):
        out += [f"- Seed setting vs core: **{s['fraction_of_core']:.0%}** of `compile_step`'s images/s (goal >= "
                f"{GOAL_FRACTION:.0%}); the 30,000-update seed run projects to **{s['seed_run_min_upper_bound']:.1f} min** "
                f"(updates at the measured rate + 30 validation rounds at the first round's time, an upper bound; "
                f"goal < {GOAL_SEED_RUN_MIN:g} min)"]
    for what in ("core", "data"):
        if isinstance(res.get(what), dict) and res[what].get("error"):
            out += [f"- {what} stage failed: {res[what]['error']}"]
    out += [f"- Skipped (budget): {', '.join(res['skipped'])}"] if res.get("skipped") else []
    return "\n".join(out) + "\n"


def write_results(res: dict, args) -> None:
    json_path, md_path = output_paths(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    res["summary"] = summarize(res)
    json_path.write_text(json.dumps(res, indent=2, default=str))
    md_path.write_text(render(res))


def update_benchmarks(path: Path, section: str) -> None:
    from bench import update_marked_section

    update_marked_section(path, "bench_gpu_e2e", section)


def env_info(device: torch.device) -> dict:
    from bench_gpu import cpu_name

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        import fairseq

        info["fairseq"] = fairseq.__version__
    except Exception as e:  # reported; the fairseq runs then fail with the same cause
        info["fairseq"] = f"not importable: {e}"
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.paste:
        if not args.update_benchmarks:
            raise SystemExit("--paste needs --update-benchmarks BENCHMARKS.md")
        update_benchmarks(Path(args.update_benchmarks), Path(args.paste).read_text())
        print(f"[e2e] pasted {args.paste} into {args.update_benchmarks}")
        return 0
    plan = args.plan
    t0 = time.perf_counter()
    remaining = lambda: args.budget_s - (time.perf_counter() - t0)  # noqa: E731
    if args.cpu_tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --cpu-tiny for the CPU smoke run")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    res = {"command": "bash scripts/bench_gpu_e2e.sh" + "".join(f" {a}" for a in argv), "cpu_tiny": args.cpu_tiny,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "env": env_info(device),
           "plan": dataclasses.asdict(plan), "e2e": {}, "loader": {}, "skipped": []}
    print(f"[e2e] {res['env']}; plan {res['plan']}", flush=True)

    try:
        images = make_images(work / "images", plan.images, args.cpu_tiny)
        paths = images.pop("paths")
        teacher = make_teacher(work / "teacher_d2v2.pt", args.cpu_tiny)
        make_teacher.last = {k: v for k, v in teacher.items() if k != "core_sizes"}
        res["teacher"] = make_teacher.last
        entries = make_list(work / "train_list.txt", paths, plan.list_repeats)
        make_cifar(work / "cifar", plan.cifar_train, plan.cifar_test)
        res["data"] = {**images, "list_entries": entries}
        data = {"list": str(work / "train_list.txt"), "teacher": str(work / "teacher_d2v2.pt"),
                "cifar": str(work / "cifar")}
        print(f"[e2e] data: {res['data']}", flush=True)
    except Exception as e:
        res["data"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        write_results(res, args)
        print(res["data"]["traceback"], flush=True)
        return 1
    write_results(res, args)

    # stage order = importance; each stage gets at most what is left
    stages = [("core", None, 150.0 if not args.cpu_tiny else 60.0)]
    stages += [("e2e", v, 150.0 if v.startswith("compiled") else 90.0) for v in plan.variants[:1]]
    stages += [("loader", "workers", 40.0), ("loader", "device", 40.0)]
    stages += [("e2e", v, 150.0 if v.startswith("compiled") else 90.0) for v in plan.variants[1:]]
    first_e2e = True
    for kind, name, expected in stages:
        left = remaining() - 5.0
        label = kind if name is None else f"{kind} {name}"
        if left < (15.0 if args.cpu_tiny else min(expected, 60.0)):
            res["skipped"].append(label)
            print(f"[e2e] skipping {label}: {left:.0f} s of budget left", flush=True)
            continue
        try:
            if kind == "core":
                res["core"] = run_core(args, work, min(left, expected * 2))
            elif kind == "e2e":
                res["e2e"][name] = run_fairseq(args, name, data, validate=first_e2e, timeout=left)
                first_e2e = False
            elif name == "device" and not any(VARIANTS[v][1] != "false" for v in plan.variants):
                continue
            else:
                res["loader"][name] = bench_loader(args, paths, name == "device", device, timeout=min(left, expected))
        except Exception as e:  # report and go on: the other stages still tell something
            entry = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]}
            if kind == "core":
                res["core"] = entry
            else:
                res[kind][name] = entry
        print(f"[e2e] {label}: " + json.dumps(res[kind] if name is None else res[kind][name], default=str)[:1500],
              flush=True)
        write_results(res, args)

    res["wall_s"] = time.perf_counter() - t0
    write_results(res, args)
    json_path, md_path = output_paths(args)
    print()
    print(md_path.read_text())
    if args.update_benchmarks:
        update_benchmarks(Path(args.update_benchmarks), md_path.read_text())
        print(f"[e2e] updated {args.update_benchmarks}")
    print(f"[e2e] wrote {json_path} and {md_path}")
    ok = any("images_per_s" in r for r in res["e2e"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
