"""The plugin registers once, whether fairseq imports it as a user dir or Python imports the package."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

CHECK = textwrap.dedent("""
    import argparse, sys
    from fairseq import utils
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY
    {first}
    {second}
    classes = (TASK_REGISTRY["d2v_kd"], MODEL_REGISTRY["d2v_kd"], CRITERION_REGISTRY["d2v_kd"])
    print(sorted({{c.__module__ for c in classes}}))
    print(sorted(m for m in sys.modules if m.endswith(".d2v_kd")))
""")
AS_PACKAGE = "import fairseq_mmkd"
REGISTERED = "['fairseq_mmkd.criterions.d2v_kd', 'fairseq_mmkd.models.d2v_kd', 'fairseq_mmkd.tasks.d2v_kd']"
AS_USER_DIR = f"utils.import_user_module(argparse.Namespace(user_dir={str(REPO / 'fairseq_mmkd')!r}))"


def run(first, second):
    proc = subprocess.run([sys.executable, "-c", CHECK.format(first=first, second=second)], cwd="/",
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-2:]


def test_user_dir_then_package_registers_one_set_of_classes():
    modules, loaded = run(AS_USER_DIR, AS_PACKAGE)
    assert modules == REGISTERED
    assert loaded == REGISTERED


def test_package_then_user_dir_is_recognised_as_already_imported():
    modules, loaded = run(AS_PACKAGE, AS_USER_DIR)
    assert modules == REGISTERED
    assert loaded == REGISTERED


def test_a_second_copy_under_the_same_name_is_refused_not_silently_mixed(tmp_path):
    """fairseq keeps the first class when a name is registered twice; a stray second copy of the plugin
    must therefore fail loudly instead of shadowing this one."""
    import shutil

    copy = tmp_path / "fairseq_mmkd"
    shutil.copytree(REPO / "fairseq_mmkd", copy, ignore=shutil.ignore_patterns("__pycache__"))
    stray = f"utils.import_user_module(argparse.Namespace(user_dir={str(copy)!r}))"
    proc = subprocess.run([sys.executable, "-c", CHECK.format(first=AS_PACKAGE, second=stray)], cwd="/",
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "not globally unique" in proc.stderr


def test_fairseq_silently_keeps_the_first_class_for_a_duplicate_name():
    """The host behaviour the plugin's single top-level package protects against."""
    code = textwrap.dedent("""
        import fairseq_mmkd
        from fairseq.tasks import register_task, TASK_REGISTRY
        from fairseq_mmkd.tasks.d2v_kd import D2vKDTask, D2vKDTaskConfig
        class Impostor(D2vKDTask):
            pass
        got = register_task("d2v_kd", dataclass=D2vKDTaskConfig)(Impostor)
        print(TASK_REGISTRY["d2v_kd"] is D2vKDTask, got is D2vKDTask)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True True"
