"""The README and the seed config agree with the code they describe."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from conftest import REPO


def test_readme_configuration_reference_matches_the_dataclasses():
    proc = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


CONFIGS = ("kd_image.yaml", "kd_text.yaml", "kd_audio.yaml", "kd_multimodal.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_seed_config_writes_out_every_plugin_field(name):
    """fairseq imports the plugin after Hydra composes the config: only fields written in the YAML can be
    overridden with plain `task.x=...`, so every field must be there (and nothing that does not exist)."""
    from fairseq_mmkd.kd_criterion import D2vKDCriterionConfig
    from fairseq_mmkd.kd_model import D2vKDModelConfig
    from fairseq_mmkd.kd_multimodal import D2vKDMultimodalModelConfig, D2vKDMultimodalTaskConfig
    from fairseq_mmkd.kd_task import D2vKDTaskConfig
    from fairseq_mmkd.optim import TorchAdamWConfig

    multimodal = name == "kd_multimodal.yaml"
    task = D2vKDMultimodalTaskConfig if multimodal else D2vKDTaskConfig
    model = D2vKDMultimodalModelConfig if multimodal else D2vKDModelConfig
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    for section, cls in (("task", task), ("model", model),
                         ("criterion", D2vKDCriterionConfig), ("optimizer", TorchAdamWConfig)):
        # the optimizer's lr is fairseq's optimization.lr (as for fairseq's own optimizers)
        fields = {f.name for f in dataclasses.fields(cls)} - ({"lr"} if section == "optimizer" else set()) | {"_name"}
        assert set(cfg[section]) == fields, (section, set(cfg[section]) ^ fields)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_seed_config_value_carries_a_comment(name):
    for line in (REPO / "config" / name).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or stripped.endswith(":"):
            continue
        assert "#" in line, f"no comment saying where the value comes from: {line}"
