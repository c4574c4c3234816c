"""The offline installer's decisions, checked cheaply: no network, no wheel is really installed.

``scripts/install_offline.sh --dry-run`` probes the node and prints the pip commands it would run; the real
build and install (a ~100 MB wheelhouse, a fresh Python 3.12 venv with torch 2.11, a training run) is
recorded in docs/install.md and BENCHMARKS.md, being far too slow for the suite.
"""
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYVER = "%d.%d" % sys.version_info[:2]


def _wheelhouse(path: Path, python=PYVER, torch=None, wheels=("fairseq_fixed-0.12.3.1-cp311-cp311-linux_x86_64.whl",
                                                                "fairseq_mmkd-0.1.0-py3-none-any.whl")):
    path.mkdir()
    for w in wheels:
        (path / w).write_bytes(b"")
    (path / "requirements.txt").write_text("hydra-core==1.3.2\nomegaconf==2.3.0\n")
    (path / "wheelhouse.json").write_text(json.dumps({
        "python": python, "torch": torch or version("torch").split("+")[0], "built": "2026-11-30 10:00 UTC",
        "wheels": list(wheels)}))
    return path


def _install(wheelhouse, *extra):
    return subprocess.run(["bash", "scripts/install_offline.sh", str(wheelhouse), "--dry-run", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                             "PYTHON": sys.executable})


def test_offline_install_pins_the_nodes_torch_and_never_reaches_an_index(tmp_path):
    wh = _wheelhouse(tmp_path / "wh")
    proc = _install(wh)

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"constraints: torch=={version('torch')} torchvision=={version('torchvision')}" in out
    commands = [line for line in out.splitlines() if "would run:" in line]
    assert len(commands) == 2 and all("--no-index" in c and f"--find-links {wh}" in c for c in commands)
    assert f"-r {wh}/requirements.txt" in commands[0]
    assert "--no-deps" in commands[1] and "fairseq_fixed-" in commands[1] and "fairseq_mmkd-" in commands[1]
    assert "[install] torch " in proc.stderr and "CPU cores" in proc.stderr  # the probe of the node


def test_offline_install_without_plugin_installs_fairseq_only(tmp_path):
    proc = _install(_wheelhouse(tmp_path / "wh"), "--no-plugin")
    assert proc.returncode == 0, proc.stderr
    assert "fairseq_mmkd-" not in proc.stdout and "fairseq_fixed-" in proc.stdout


@pytest.mark.parametrize("case, message", [
    ("python", f"rebuild it with scripts/build_wheelhouse.sh --python {PYVER}"),
    ("missing", "is not a folder"),
    ("not_ours", "not a folder written by scripts/build_wheelhouse.sh"),
])
def test_offline_install_refuses_a_wheelhouse_it_cannot_use_naming_the_fix(tmp_path, case, message):
    if case == "python":
        wh = _wheelhouse(tmp_path / "wh", python="3.99")
    elif case == "missing":
        wh = tmp_path / "nowhere"
    else:
        wh = tmp_path / "plain"
        wh.mkdir()
    proc = _install(wh)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_offline_install_warns_when_the_wheelhouse_was_built_for_another_torch(tmp_path):
    proc = _install(_wheelhouse(tmp_path / "wh", torch="2.0.0"))
    assert proc.returncode == 0, proc.stderr
    assert "built against torch 2.0.0" in proc.stderr and "--torch " in proc.stderr


def test_wheelhouse_build_checks_its_arguments_before_downloading(tmp_path):
    def build(*args):
        return subprocess.run(["bash", "scripts/build_wheelhouse.sh", *args, "--out", str(tmp_path / "o")], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    assert "--python must look like 3.12" in build("--python", "twelve").stderr
    assert "--torch must look like 2.11.0" in build("--torch", "latest").stderr
    assert "no such file" in build("--node-freeze", str(tmp_path / "absent.txt")).stderr
    proc = subprocess.run(["bash", "scripts/build_wheelhouse.sh", "--python", "3.12", "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no_python")})
    assert proc.returncode == 2 and "not found" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing was started
