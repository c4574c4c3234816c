"""The benchmark scripts run end to end at tiny sizes, and the GPU one needs nothing but torch.

``scripts/bench_gpu.sh`` is run once on a GPU machine that has torch but no fairseq, faiss, omegaconf or
hydra; these tests hide those packages (``sys.modules[name] = None`` in a ``sitecustomize``) and run its
``--cpu-tiny`` mode, the same code path on CPU, so a stray import or a broken stage shows up here first.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HIDDEN = ("fairseq", "faiss", "omegaconf", "hydra")
CORE_MODULES = ("fairseq_mmkd.d2v.model", "fairseq_mmkd.modules.layers", "fairseq_mmkd.distill.distiller",
                "fairseq_mmkd.losses.regression", "fairseq_mmkd.modules.targets", "fairseq_mmkd.retrieval.evaluate", "fairseq_mmkd.retrieval.search",
                "fairseq_mmkd.retrieval.knn", "fairseq_mmkd.retrieval.linear")


@pytest.fixture
def hidden_env(tmp_path):
    """Environment for a subprocess in which fairseq, faiss, omegaconf and hydra cannot be imported."""
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in HIDDEN))
    return {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def test_core_imports_without_fairseq_faiss_or_omegaconf(hidden_env):
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE_MODULES)
            + "import fairseq_mmkd.retrieval.search as s\n"
            + "assert not s.faiss_available()\n"
            + f"print([m for m in {HIDDEN!r} if sys.modules.get(m) is not None])\n")
    env = {**hidden_env, "PYTHONPATH": f"{REPO}:{hidden_env['PYTHONPATH']}"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_gpu_bench_cpu_tiny_runs_with_torch_only(hidden_env, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/bench_gpu.sh", "--cpu-tiny"], cwd=REPO, env={**hidden_env, "OUT": str(out)},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "bench_gpu.json").read_text())

    assert not any(res["env"]["importable"].values()), res["env"]  # the hiding worked ...
    assert not any(res["env"]["loaded"].values()), res["env"]  # ... and nothing loaded them anyway
    assert res["matmul_tflops"] > 0
    assert res["flops"]["total_gflop"] > 0 and "block = " in res["flops"]["formula"]
    assert set(res["kd"]) == {"eager", "eager_forward", "compile_blocks", "compile_step", "naive"}
    for name, r in res["kd"].items():
        assert "error" not in r, (name, r)
        for key in ("images_per_s", "step_ms", "peak_mem_gib", "achieved_tflops", "mfu_vs_measured",
                    "mfu_vs_nominal"):
            assert r[key] > 0, (name, key, r)
    assert res["kd"]["compile_step"]["compile_s"] >= 0
    assert res["embed"]["student_s"] > 0 and res["embed"]["teacher_s"] > 0
    assert len(res["search"]["searches"]) == 4 and res["search"]["total_s"] > 0
    assert res["validation_s"] > 0 and res["best_kd"]["images_per_s"] > 0

    md = (out / "bench_gpu.md").read_text()
    for row in ("| eager |", "| compile_blocks |", "| compile_step |", "| naive |", "vs the naive baseline",
                "Validation round"):
        assert row in md
    assert "MFU vs matmul" in proc.stdout  # the table is printed too


def test_cpu_bench_quick_replaces_only_its_section(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\nkept above\n\n<!-- bench.py:begin -->\nstale numbers\n<!-- bench.py:end -->\n"
                      "\nkept below\n")
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--output", str(output)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = output.read_text()
    assert "kept above" in text and "kept below" in text and "stale numbers" not in text
    assert text.count("<!-- bench.py:begin -->") == 1
    assert re.search(r"Date: .*commit `\w+`", text) and "Command: `python scripts/bench.py --quick" in text
    assert "torch " in text and "cores" in text

    def ratio_row(*words):
        rows = [line for line in text.splitlines() if line.startswith("|") and all(w in line for w in words)]
        assert rows, f"no table row with {words}:\n{text}"
        assert re.search(r"×\d+\.\d\d", rows[0]), rows[0]

    ratio_row("KD update", "throughput", "naive")
    ratio_row("KD update", "peak memory", "naive")
    ratio_row("KD update, text", "throughput", "sequences/s", "naive")
    ratio_row("KD update, audio", "throughput", "clips/s", "naive")
    ratio_row("Teacher forward vs fairseq", "image")
    ratio_row("Teacher forward vs fairseq", "text")
    ratio_row("Teacher forward vs fairseq", "audio")
    ratio_row("Retrieval embedding")
    ratio_row("Exact search", "torch")
    ratio_row("Data pipeline", "500x375")
    ratio_row("Data pipeline", "1600x1200")
    diffs = re.findall(r"max abs difference of the last layer output \| ([0-9.e+-]+) \|", text)
    assert len(diffs) == 3 and all(float(d) < 1e-4 for d in diffs), text


def test_gpu_results_paste_into_their_own_section(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    gpu_md = tmp_path / "bench_gpu.md"
    gpu_md.write_text("## GPU benchmark\n\n| eager | 4000 |\n")
    for _ in range(2):  # the second paste replaces the first
        proc = subprocess.run([sys.executable, "scripts/bench.py", "--gpu-md", str(gpu_md), "--output", str(output)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    text = output.read_text()
    assert text.count("| eager | 4000 |") == 1 and "Not run yet" not in text
    assert "<!-- bench.py:begin -->" not in text  # the CPU section is written by a benchmark run only


def multimodal_result(device: str, size: str) -> dict:
    """A bench_multimodal.py result as its --json writes it (the numbers chosen so the ratios are exact)."""
    run = lambda ups, free=None: {"updates_per_s": ups, "wall_s": 10.0, "peak_rss_mb": 1000.0,  # noqa: E731
                                  "min_gb_free": free, "precision": "student float32 (1.00M)"}
    gpu = device == "cuda"
    best = {"image": run(10.0, 100.0 if gpu else None), "text": run(20.0, 120.0 if gpu else None),
            "audio": run(20.0, 110.0 if gpu else None), "multimodal": run(5.0, 90.0 if gpu else None),
            "multimodal_other": {**run(4.0, 80.0 if gpu else None), "setting": "common.bf16=false"}}
    best["multimodal"]["wall_s"] = 15.0
    return {"date": "d", "machine": "m", "torch": "t", "size": size, "device": device, "rounds": 1, "updates": 40,
            "warmup": 10, "threads": 2, "gpu_total_gb": 140.0 if gpu else None, "command": "c", "best": best}


def test_multimodal_benchmark_renders_ratios_and_keeps_one_section_per_device(tmp_path):
    """The ratios are those of the measured numbers (200 ms sequential vs 200 ms multimodal per update, 30 s vs 15 s
    of wall time), a GPU result adds peak GPU memory and lands in its own section beside the CPU one."""
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n")
    for device, size in (("cpu", "demo"), ("cuda", "base"), ("cpu", "demo")):
        path = tmp_path / f"{device}.json"
        path.write_text(json.dumps(multimodal_result(device, size)))
        proc = subprocess.run([sys.executable, "scripts/bench_multimodal.py", "--from-json", str(path),
                               "--update-benchmarks", str(benchmarks)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    text = benchmarks.read_text()
    assert text.count("<!-- bench_multimodal:begin -->") == 1
    assert text.count("<!-- bench_multimodal_base_cuda:begin -->") == 1
    cpu = text.split("<!-- bench_multimodal:begin -->")[1].split("<!-- bench_multimodal:end -->")[0]
    gpu = text.split("<!-- bench_multimodal_base_cuda:begin -->")[1].split("<!-- bench_multimodal_base_cuda:end -->")[0]
    assert "| the three one after the other | - | 200 ms | 30 s |" in cpu
    assert "| `kd_multimodal`, one student | 5.00 | 200 ms (x1.00 vs sequential) | 15 s (x2.00) | 1000 MB |" in cpu
    assert "peak GPU memory" not in cpu and "CPU, reduced size" in cpu
    assert "GPU, base size" in gpu and "| `kd_multimodal`, one student | 5.00 | 200 ms (x1.00 vs sequential) | 15 s " \
        "(x2.00) | 1000 MB | 50.0 GB |" in gpu
    assert "| the three one after the other | - | 200 ms | 30 s | 1000 MB (largest) | 40.0 GB |" in gpu


def test_image_text_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path):
    """scripts/bench_image_text.py: both updates in their own processes, the validation timing and the projection."""
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "scripts/bench_image_text.py", "--steps", "1", "--warmup", "1", "--rounds",
                           "1", "--valid-images", "20", "--data", str(tmp_path / "data"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for kind in ("image_text", "multimodal"):
        assert res[kind]["ms_per_update"] > 0 and res[kind]["saved_mb"] > 0
    assert "| `kd_image_text` (regressions + contrastive) |" in proc.stdout and "Goal: a round under 10 s" in proc.stdout
