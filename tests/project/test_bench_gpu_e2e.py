"""``scripts/bench_gpu_e2e.sh --cpu-tiny``: the end-to-end GPU benchmark's whole path, on CPU at tiny sizes.

On the GPU machine the same script generates ImageNet-sized JPEGs, a ViT-B/16 teacher and CIFAR-sized sets
and times the seed config; here every stage runs at toy sizes so that a broken stage shows up in the suite.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_e2e_benchmark_cpu_tiny_runs_every_stage(tmp_path):
    out, benchmarks = tmp_path / "out", tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nkept\n")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/bench_gpu_e2e.sh", "--cpu-tiny", "--update-benchmarks", str(benchmarks)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    res = json.loads((out / "bench_gpu_e2e.json").read_text())

    assert res["data"]["count"] == 48 and res["data"]["list_entries"] == 48 * 4
    assert res["core"]["kd"]["eager"]["images_per_s"] > 0  # bench_gpu.py's figure from the same run
    assert set(res["e2e"]) == {"eager", "eager_worker_decode"} and not res["skipped"]
    device, workers = res["e2e"]["eager"], res["e2e"]["eager_worker_decode"]
    assert device["task.gpu_decode"] == "true" and workers["task.gpu_decode"] == "false"
    for r in (device, workers):
        assert "error" not in r, r.get("log_tail")
        assert r["updates"] == res["plan"]["updates"] and r["images_per_s"] > 0 and r["startup_s"] > 0
        assert math.isfinite(r["loss_first"]) and r["loss_first"] > 0
    assert device["validation_s"] >= 0 and "valid_cifar100_top1" in device["valid"]  # one validation round
    for name in ("workers", "device"):
        assert res["loader"][name]["images_per_s"] > 0 and res["loader"][name]["batches"] == 4

    md = (out / "bench_gpu_e2e.md").read_text()
    assert "| fairseq-hydra-train `eager` (model.compile=false, task.gpu_decode=true) |" in md
    assert "data loader alone, workers read bytes + device decode" in md and "Validation round" in md
    text = benchmarks.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count("<!-- bench_gpu_e2e:begin -->") == 1
    assert md.strip() in text


def test_benchmarks_section_is_replaced_not_duplicated(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_gpu_e2e import update_benchmarks

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- bench_gpu:begin -->\ncore\n<!-- bench_gpu:end -->\n")
    update_benchmarks(path, "## E2E\nfirst\n")
    update_benchmarks(path, "## E2E\nsecond\n")
    text = path.read_text()
    assert "first" not in text and text.count("second") == 1 and "core" in text


def test_a_result_brought_back_is_pasted_without_running_anything(tmp_path):
    md, path = tmp_path / "bench_gpu_e2e.md", tmp_path / "BENCHMARKS.md"
    md.write_text("## End-to-end GPU benchmark\n\n| compiled | 4000 |\n")
    path.write_text("# Benchmarks\n\n<!-- bench_gpu_e2e:begin -->\nNot run yet.\n<!-- bench_gpu_e2e:end -->\n")
    proc = subprocess.run([sys.executable, "scripts/bench_gpu_e2e.py", "--paste", str(md), "--update-benchmarks",
                           str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert "| compiled | 4000 |" in text and "Not run yet" not in text
