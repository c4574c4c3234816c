"""fairseq's own argparse command-line tools with the plugin: fairseq-train, fairseq-validate, averaged checkpoints.

fairseq-train and fairseq-validate build their flags from the registered dataclasses (``gen_parser_from_dataclass``)
and turn the parsed flags back into a config (``convert_namespace_to_omegaconf``): every dataclass the plugin
registers must survive both, or every argparse tool is closed to it.
"""
import json
import subprocess
import sys
from argparse import ArgumentParser
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch

import fairseq_mmkd  # noqa: F401  (registers the plugin)
from conftest import (PLUGIN, REPO, TINY_MULTIMODAL, assert_same_losses, assert_same_updates, fairseq_tool,
                      gradient_free_names, hydra_train, json_log_lines, learning_rates, load, modality_args,
                      training_flags, validate, write_tiny_cifar)


def registered():
    """(registry, name, dataclass) of every component this plugin registers with fairseq."""
    from fairseq.registry import REGISTRIES
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    found = [("task", n, dc) for n, dc in TASK_DATACLASS_REGISTRY.items()]
    found += [("model", n, dc) for n, dc in MODEL_DATACLASS_REGISTRY.items()]
    for registry, entry in REGISTRIES.items():
        found += [(registry, n, dc) for n, dc in entry["dataclass_registry"].items()]
    return [(r, n, dc) for r, n, dc in found if dc.__module__.startswith("fairseq_mmkd")]


def test_the_plugin_registers_its_components():
    assert {(r, n) for r, n, _ in registered()} == {
        ("task", "d2v_kd"), ("task", "d2v_kd_multimodal"), ("task", "d2v_kd_image_text"), ("model", "d2v_kd"),
        ("model", "d2v_kd_multimodal"), ("model", "d2v_kd_image_text"), ("criterion", "d2v_kd"),
        ("criterion", "d2v_kd_multimodal"), ("criterion", "d2v_kd_image_text"), ("optimizer", "torch_adamw")}


@pytest.mark.parametrize("registry,name,dataclass", registered(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_fairseqs_argparse_path_accepts_every_registered_dataclass(registry, name, dataclass):
    """Real types in every annotation (``from __future__ import annotations`` would make them strings), and flags
    that parse to the defaults."""
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    for f in fields(dataclass):
        assert not isinstance(f.type, str), f"{dataclass.__name__}.{f.name}: annotation {f.type!r} is a string"
    parser = ArgumentParser()
    gen_parser_from_dataclass(parser, dataclass())
    parsed = vars(parser.parse_args(["DATA"] if any(f.name == "data" for f in fields(dataclass)) else []))
    for f in fields(dataclass):
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name == "data" or f.name not in parsed or (isinstance(default, str) and default.startswith("${")):
            continue
        if default is None or isinstance(default, (bool, int, float)):
            assert parsed[f.name] == default, f.name
        elif hasattr(default, "value"):  # a ChoiceEnum
            assert parsed[f.name] == default.value, f.name


@pytest.mark.parametrize("task,arch", [("d2v_kd", "d2v_kd"), ("d2v_kd_multimodal", "d2v_kd_multimodal"),
                                       ("d2v_kd_image_text", "d2v_kd_image_text")])
def test_training_flags_become_the_plugins_config(task, arch):
    """fairseq-train's own parsing: the plugin's flags land in its task, model, criterion and optimizer configs."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    weights = ["--modality-weights", "{'image': 1.0, 'text': 0.5}"] if task == "d2v_kd_multimodal" else []
    teacher = {"d2v_kd_multimodal": ["--image-teacher", "t.pt", "--image-data", "photos"],
               "d2v_kd_image_text": ["--image-teacher", "t.pt", "--text-teacher", "x.pt", "--pairs", "p.json",
                                     "--contrastive-weight", "0.5"]}.get(task, ["photos", "--teacher-checkpoint", "t.pt"])
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        "--user-dir", PLUGIN, "--task", task, "--arch", arch, "--criterion", task,
        "--optimizer", "torch_adamw", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--lr", "0.0005",
        "--student-depth", "3", "--knn-k", "10", "--include-extra-tokens", *teacher, *weights])
    cfg = convert_namespace_to_omegaconf(args)
    assert (cfg.task._name, cfg.model._name, cfg.criterion._name, cfg.optimizer._name) == (task, arch, task,
                                                                                           "torch_adamw")
    assert cfg.model.student_depth == 3 and cfg.task.knn_k == 10 and cfg.optimizer.weight_decay == 0.01
    assert cfg.criterion.include_extra_tokens is False  # fairseq's rule: naming a true-by-default switch turns it off
    assert cfg.task.seed == cfg.common.seed and cfg.task.save_dir == cfg.checkpoint.save_dir
    if task == "d2v_kd":
        assert cfg.task.data == "photos" and cfg.model.teacher_checkpoint == "t.pt"
    elif task == "d2v_kd_image_text":
        assert cfg.task.pairs == "p.json" and cfg.model.text_teacher == "x.pt" and cfg.criterion.contrastive_weight == 0.5
    else:
        from fairseq_mmkd.tasks.d2v_kd_multimodal import parse_modality_weights

        assert parse_modality_weights(cfg.task.modality_weights) == {"image": 1.0, "text": 0.5}
        assert cfg.model.image_teacher == "t.pt" and cfg.task.image_data == "photos"


def test_modality_weights_that_are_not_a_mapping_are_one_line():
    from fairseq_mmkd.tasks.d2v_kd_multimodal import parse_modality_weights

    assert parse_modality_weights({"text": 2}) == {"text": 2} and parse_modality_weights("") == {}
    with pytest.raises(ValueError, match=r"must map modalities to weights, e.g. \{'image': 1"):
        parse_modality_weights("image=1")


@pytest.fixture(scope="module")
def hydra_run(tmp_path_factory, tiny_teacher, photo_folder, tiny_cifar):
    save = tmp_path_factory.mktemp("fairseq_cli") / "hydra"
    proc = hydra_train(save, f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                       f"task.cifar10_root={tiny_cifar}", f"task.cifar100_root={tiny_cifar}",
                       "optimization.max_update=10", "dataset.validate_interval_updates=10",
                       "checkpoint.save_interval_updates=5", "checkpoint.keep_interval_updates=2",
                       "common.log_interval=1")
    return save, proc.stdout + proc.stderr


def test_fairseq_train_with_flags_trains_exactly_as_fairseq_hydra_train(hydra_run, tmp_path):
    save, hydra_log = hydra_run
    cfg = load(save / "checkpoint_last.pt")["cfg"]
    cfg["checkpoint"]["save_dir"] = str(tmp_path / "argparse")
    argv = training_flags(cfg)
    assert "--user-dir" in argv and "--teacher-checkpoint" in argv and "--cifar10-root" in argv, argv
    proc = fairseq_tool("fairseq-train", *argv)
    log = proc.stdout + proc.stderr
    a, b = load(save / "checkpoint_last.pt"), load(tmp_path / "argparse" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 10
    assert gradient_free_names(log) == gradient_free_names(hydra_log) != []
    assert_same_updates(a, b, learning_rates(hydra_log), gradient_free_names(hydra_log))
    assert_same_losses(hydra_log, log)
    va, vb = (json_log_lines(t, "valid")[-1] for t in (hydra_log, log))
    assert {k: v for k, v in va.items() if "cifar" in k} == {k: v for k, v in vb.items() if "cifar" in k}
    from fairseq_mmkd.optim.torch_adamw import _betas

    for key in ("task", "model", "criterion", "optimizer"):  # the same configuration, as fairseq stored it
        stored = [{k: _betas(v) if k == "adam_betas" else v for k, v in run["cfg"][key].items() if k != "save_dir"}
                  for run in (a, b)]  # betas: a list from YAML, the flag's string "0.9,0.98" from argparse
        assert stored[0] == stored[1], key


def retrieval_cli(checkpoint, out_json, *sets) -> dict:
    subprocess.run([sys.executable, "-m", "fairseq_mmkd.retrieval", "--checkpoint", str(checkpoint), *sets,
                    "--json", str(out_json), "--no-progress"], cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    return json.loads(Path(out_json).read_text())


def assert_same_retrieval(valid: dict, cli: dict) -> None:
    """fairseq-validate prints each metric rounded to 2 decimals; the evaluator's JSON holds the full value."""
    names = [k for k in cli if k.startswith("cifar") and not k.endswith(("_images", "_items"))]
    assert names
    for name in names:
        assert float(valid[f"valid_{name}"]) == pytest.approx(cli[name], abs=0.005 + 1e-9), name


def test_fairseq_validate_prints_the_loss_and_the_retrieval_of_a_training_checkpoint(hydra_run, tiny_cifar,
                                                                                     tmp_path):
    save, hydra_log = hydra_run
    before = {p.name: p.stat().st_mtime_ns for p in save.rglob("*") if p.is_file()}
    valid, out = validate(save / "checkpoint_last.pt")
    trained = json_log_lines(hydra_log, "valid")[-1]  # the run's own validation of the same weights
    assert valid["valid_loss"] == trained["valid_loss"]
    same = lambda row: {k: v for k, v in row.items() if "cifar" in k and "_best_" not in k}  # noqa: E731
    assert same(valid) == same(trained)
    cli = retrieval_cli(save / "checkpoint_last.pt", tmp_path / "cli.json", "--cifar10", str(tiny_cifar),
                        "--cifar100", str(tiny_cifar))
    assert_same_retrieval(valid, cli)
    assert "teacher_cifar10_top1" in " ".join(valid)
    after = {p.name: p.stat().st_mtime_ns for p in save.rglob("*") if p.is_file()}
    assert after == before, "fairseq-validate wrote into the training run's folder"


def test_fairseq_validate_without_the_teacher_file_validates_retrieval_with_one_line(hydra_run, tmp_path):
    save, _ = hydra_run
    other = write_tiny_cifar(tmp_path / "other", "cifar10", 10, seed=5)
    valid, out = validate(save / "checkpoint_last.pt", "--model-overrides", "{'teacher_checkpoint': '/gone/t.pt'}",
                          "--cifar10-root", str(other), "--cifar100-root", "")
    warnings = [line for line in out.splitlines() if "without the distillation loss" in line]
    assert len(warnings) == 1 and "/gone/t.pt" in warnings[0], out[-3000:]
    assert "valid_loss" not in valid and not any("cifar100" in k or "teacher_" in k for k in valid)
    cli = retrieval_cli(save / "checkpoint_last.pt", tmp_path / "cli.json", "--cifar10", str(other))
    assert_same_retrieval(valid, cli)


def average_checkpoints(paths) -> dict:
    """What fairseq's ``scripts/average_checkpoints.py`` writes (it is not installed with fairseq's wheel): the
    mean of the ``model`` tensors of the given files (integer tensors floor-divided), everything else of the first."""
    states = [load(p) for p in paths]
    assert all(list(s["model"]) == list(states[0]["model"]) for s in states)
    averaged = {}
    for k in states[0]["model"]:
        total = sum(s["model"][k].clone() for s in states)
        averaged[k] = total / len(states) if total.is_floating_point() else total // len(states)
    return {**states[0], "model": averaged}


def test_averaged_checkpoints_load_evaluate_and_resume(hydra_run, tiny_cifar, tiny_teacher, photo_folder, tmp_path):
    from fairseq_mmkd.models._student import load_student

    save, _ = hydra_run
    intervals = sorted(save.glob("checkpoint_*_*.pt"))
    assert len(intervals) == 2, intervals
    avg = tmp_path / "averaged.pt"
    torch.save(average_checkpoints(intervals), avg)
    model = load_student(avg)
    first, second = (load(p)["model"] for p in intervals)
    name = "distiller.student_blocks.0.attn.qkv.weight"
    torch.testing.assert_close(model.state_dict()[name], (first[name] + second[name]) / 2)
    valid, _ = validate(avg)
    assert float(valid["valid_cifar10_top1"]) >= 0 and "valid_loss" in valid
    resumed = hydra_train(tmp_path / "resumed", f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                          "task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                          "checkpoint.maximize_best_checkpoint_metric=false", f"checkpoint.restore_file={avg}",
                          "optimization.max_update=12", "lr_scheduler.max_update=10")
    out = resumed.stdout + resumed.stderr
    assert f"Loaded checkpoint {avg}" in out and "@ 5 updates" in out, out[-3000:]
    assert load(tmp_path / "resumed" / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 12


def test_multimodal_runs_through_fairseq_train_and_fairseq_validate(tmp_path, sequence_setup, photo_folder,
                                                                   tiny_teacher, tiny_cifar, retrieval_folders):
    """d2v_kd_multimodal (image and text teachers): fairseq-train from flags trains as fairseq-hydra-train, and
    fairseq-validate prints every modality's loss and retrieval, the same as the run's own validation."""
    text_folder = retrieval_folders["text"]
    proc = hydra_train(tmp_path / "hydra", *TINY_MULTIMODAL,
                       *modality_args(sequence_setup, photo_folder, tiny_teacher, ("image", "text")),
                       f"task.cifar10_root={tiny_cifar}", f"task.text_retrieval_folder={text_folder}",
                       "task.cifar100_root=null", "checkpoint.best_checkpoint_metric=cifar10_top1",
                       "task.knn_k=3", "optimization.max_update=6", "dataset.validate_interval_updates=6",
                       "common.log_interval=1", config="kd_multimodal")
    hydra_log = proc.stdout + proc.stderr
    a = load(tmp_path / "hydra" / "checkpoint_last.pt")
    cfg = a["cfg"]
    cfg["checkpoint"]["save_dir"] = str(tmp_path / "argparse")
    log = "".join(fairseq_tool("fairseq-train", *training_flags(cfg)).__getattribute__(k) for k in ("stdout", "stderr"))
    b = load(tmp_path / "argparse" / "checkpoint_last.pt")
    assert_same_updates(a, b, learning_rates(hydra_log), gradient_free_names(hydra_log))
    assert_same_losses(hydra_log, log)

    valid, _ = validate(tmp_path / "hydra" / "checkpoint_last.pt", task="d2v_kd_multimodal")
    trained = json_log_lines(hydra_log, "valid")[-1]
    for key in ("valid_loss", "valid_loss_image", "valid_loss_text", "valid_cifar10_top1",
                f"valid_{Path(text_folder).name}_top1", "valid_teacher_cifar10_top1"):
        assert valid[key] == trained[key], key


def test_readmes_fairseq_train_command_is_the_seed_config():
    """The documented fairseq-train line (docs/tools.md, "fairseq's own tools") parses with fairseq's own parser
    into the values of config/kd_image.yaml."""
    import shlex

    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    text = (REPO / "docs" / "tools.md").read_text()
    block = text[text.index("\nfairseq-train IMAGES"):]
    command = block[:block.index("\n#")].replace("\\\n", " ")
    argv = shlex.split(command)[1:]
    argv[argv.index("--user-dir") + 1] = PLUGIN
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    seed = OmegaConf.load(REPO / "config" / "kd_image.yaml")
    checked = 0
    names = ("--user-dir", "--task", "--arch", "--criterion", "--optimizer", "--lr-scheduler")
    for flag in [a for a in argv if a.startswith("--") and a not in names]:
        key = flag[2:].replace("-", "_")
        group = next(g for g in ("optimizer", "lr_scheduler", "optimization", "dataset", "checkpoint", "common",
                                 "distributed_training", "model", "task", "criterion") if key in seed.get(g, {}).keys())
        expected, got = OmegaConf.select(seed, f"{group}.{key}"), cfg[group][key]
        if key == "adam_betas":
            from fairseq_mmkd.optim.torch_adamw import _betas

            expected, got = _betas(expected), _betas(got)
        if isinstance(expected, str) and expected.startswith("${") or key in ("save_dir", "teacher_checkpoint",
                                                                              "cifar10_root", "cifar100_root"):
            continue
        assert got == (OmegaConf.to_container(expected) if OmegaConf.is_config(expected) else expected), flag
        checked += 1
    assert checked >= 15


def setup_py_requirements() -> list:
    """``install_requires`` of setup.py, read from its source (the installed metadata may be older)."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))


def test_installing_the_plugin_picks_the_tested_versions_that_fairseq_accepts():
    """docs/install.md's "Install into your own environment" (and README's copy of its pip lines): the plugin's
    requirements admit the versions pinned in requirements/ and, where fairseq-fixed pins a version, only that
    one, so pip installs nothing fairseq's metadata refuses; fairseq-fixed goes in last with --no-deps (pip then
    runs no conflict check)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    ours = {Requirement(r).name: Requirement(r) for r in setup_py_requirements()}
    theirs = {r.name: r for r in map(Requirement, requires("fairseq-fixed")) if r.marker is None}
    tested = {}
    for line in (REPO / "requirements" / "runtime.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#") and "==" in line:
            r = Requirement(line)
            tested[r.name] = next(iter(r.specifier)).version
    for name, r in ours.items():
        assert name in tested and r.specifier.contains(tested[name]), (name, str(r.specifier), tested.get(name))
        pinned = [s.version for s in theirs.get(name, Requirement(name)).specifier if s.operator == "=="]
        if pinned:
            assert [s.operator for s in r.specifier] == ["=="] and r.specifier.contains(pinned[0]), (name, pinned)
        if name in theirs:
            assert theirs[name].specifier.contains(tested[name]), name
    def pip_lines(path, heading):
        text = path.read_text()
        block = text[text.index(heading):]
        block = block[:block.index("```\n\n")]
        return [line for line in block.splitlines() if line.startswith("pip install")]

    lines = pip_lines(REPO / "docs" / "install.md", "# Install into your own environment")
    assert lines[-1].startswith("pip install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1"), lines
    assert any(line.startswith("pip install -e .") for line in lines[:-1])
    assert pip_lines(REPO / "README.md", "\n## Install\n") == lines  # the front door shows the same lines
