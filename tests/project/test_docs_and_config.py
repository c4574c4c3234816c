"""The documents (README.md, docs/) and the seed configs agree with the code they describe, and the documents'
links lead somewhere."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def test_configuration_reference_matches_the_dataclasses():
    """docs/configuration.md's generated block is what scripts/config_reference.py makes of today's dataclasses."""
    proc = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[([^\]]*)\]\(([^()\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links and headings there are not ones)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        kept.append("" if fenced else line)
    return re.sub(r"`[^`]*`", "", "\n".join(kept))


def github_anchors(path: Path) -> set:
    """The #anchors GitHub gives the headings of a markdown file: the heading's text, lowercased, punctuation
    dropped but for `-` and `_`, spaces turned into `-`; a repeated anchor gets -1, -2, ..."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} +(.*?)(?: +#+)? *$", line)
        if not heading:
            continue
        text = LINK.sub(lambda m: m.group(1), heading.group(1))  # a link in a heading counts by its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_github_anchors_follow_githubs_slug_rule(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Validation: zero-shot retrieval and k-NN\n## fairseq's own tools\n```\n# not a heading\n```\n"
                   "## Log\n## Log\n### `retrieval_folder` [sets](x.md)\n")
    assert github_anchors(doc) == {"validation-zero-shot-retrieval-and-k-nn", "fairseqs-own-tools", "log", "log-1",
                                   "retrieval_folder-sets"}


def test_every_relative_link_in_the_documents_resolves():
    """Every relative [text](path) and [text](path#anchor) in README.md and docs/*.md names an existing file,
    and every #anchor a heading of the file it points into (GitHub's anchors)."""
    assert len(DOCUMENTS) > 5, DOCUMENTS
    broken, checked = [], 0
    for doc in DOCUMENTS:
        for _, target in LINK.findall(_prose(doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not a file of this repository
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            checked += 1
            if not resolved.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and anchor not in github_anchors(resolved):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no heading #{anchor} in {resolved.name})")
    assert not broken, "\n".join(broken)
    assert checked > 20, checked


def test_readme_is_a_front_door_of_at_most_260_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines: move the detail into docs/"


CONFIGS = ("kd_image.yaml", "kd_text.yaml", "kd_audio.yaml", "kd_multimodal.yaml", "kd_image_text.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_seed_config_writes_out_every_plugin_field(name):
    """fairseq imports the plugin after Hydra composes the config: only fields written in the YAML can be
    overridden with plain `task.x=...`, so every field must be there (and nothing that does not exist)."""
    from fairseq_mmkd.criterions.d2v_kd import D2vKDCriterionConfig
    from fairseq_mmkd.models.d2v_kd import D2vKDModelConfig
    from fairseq_mmkd.models.d2v_kd_multimodal import D2vKDMultimodalModelConfig
    from fairseq_mmkd.tasks.d2v_kd_multimodal import D2vKDMultimodalTaskConfig
    from fairseq_mmkd.tasks.d2v_kd import D2vKDTaskConfig
    from fairseq_mmkd.optim.torch_adamw import TorchAdamWConfig

    from fairseq_mmkd.criterions.d2v_kd_image_text import D2vKDImageTextCriterionConfig
    from fairseq_mmkd.models.d2v_kd_image_text import D2vKDImageTextModelConfig
    from fairseq_mmkd.tasks.d2v_kd_image_text import D2vKDImageTextTaskConfig

    task, model, criterion = {
        "kd_multimodal.yaml": (D2vKDMultimodalTaskConfig, D2vKDMultimodalModelConfig, D2vKDCriterionConfig),
        "kd_image_text.yaml": (D2vKDImageTextTaskConfig, D2vKDImageTextModelConfig, D2vKDImageTextCriterionConfig),
    }.get(name, (D2vKDTaskConfig, D2vKDModelConfig, D2vKDCriterionConfig))
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    for section, cls in (("task", task), ("model", model),
                         ("criterion", criterion), ("optimizer", TorchAdamWConfig)):
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
