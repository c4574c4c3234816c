"""The newcomer's path: the demo in a reduced mode, its pictures, and the metrics plot."""
from __future__ import annotations

import re
import subprocess

import pytest
from PIL import Image

from conftest import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(["bash", "scripts/demo.sh", "--updates", "30", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_prints_a_table_with_real_numbers(demo):
    out, stdout = demo
    assert "RANDOMLY INITIALISED" in stdout
    rows = {m.group(1): [float(x) for x in m.group(2).split()]
            for m in re.finditer(r"^(top-1|top-3|inverse top-1|inverse top-3)\s+([\d.\s]+)$", stdout, re.M)}
    assert set(rows) == {"top-1", "top-3", "inverse top-1", "inverse top-3"}, stdout[-2000:]
    for values in rows.values():
        assert len(values) == 3 and all(0 <= v <= 100 for v in values)
    assert rows["top-1"][0] > 3 * 5, "the random teacher retrieves photo crops far above chance (5%)"
    assert re.search(r"training speed: \d+ images/s", stdout)
    assert re.search(r"trainable student [\d.]+M \| frozen shared encoder [\d.]+M", stdout)
    assert re.search(r"demo took \d+ s", stdout)
    assert (out / "checkpoints" / "checkpoint_best.pt").exists()


def test_validation_writes_a_retrieval_grid_and_the_plot_script_a_png(demo):
    out, _ = demo
    for png in (out / "checkpoints" / "retrieval_examples.png", out / "metrics.png"):
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    per_update = sorted((out / "checkpoints" / "retrieval_examples").glob("update_*.png"))
    assert [p.name for p in per_update] == ["update_000025.png", "update_000030.png"]


def test_plot_script_reports_a_log_without_json_lines(tmp_path):
    log = tmp_path / "empty.log"
    log.write_text("nothing here\n")
    proc = subprocess.run([str(REPO / ".venv/bin/python"), "scripts/plot_metrics.py", str(log), "--output",
                           str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no fairseq json log lines" in proc.stderr
