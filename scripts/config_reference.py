"""Generate docs/configuration.md from the plugin's dataclasses, so the two cannot drift.

    python scripts/config_reference.py            # print the reference (markdown)
    python scripts/config_reference.py --write    # replace the block between the markers in docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 if docs/configuration.md is out of date (used by the tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "configuration.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    text = str(value)
    if text.startswith("${"):
        return f"`{text}`"
    return "`null`" if value is None else f"`{text}`"


def reference() -> str:
    from fairseq_mmkd.criterions.d2v_kd import D2vKDCriterionConfig
    from fairseq_mmkd.models.d2v_kd import D2vKDModelConfig
    from fairseq_mmkd.tasks.d2v_kd import D2vKDTaskConfig
    from fairseq_mmkd.optim.torch_adamw import TorchAdamWConfig

    from fairseq_mmkd.criterions.d2v_kd_image_text import D2vKDImageTextCriterionConfig
    from fairseq_mmkd.models.d2v_kd_image_text import D2vKDImageTextModelConfig
    from fairseq_mmkd.models.d2v_kd_multimodal import D2vKDMultimodalModelConfig
    from fairseq_mmkd.tasks.d2v_kd_image_text import D2vKDImageTextTaskConfig, _PairFields
    from fairseq_mmkd.tasks.d2v_kd_multimodal import D2vKDMultimodalTaskConfig, _MultimodalFields

    criterion_fields = {f.name for f in dataclasses.fields(D2vKDCriterionConfig)}

    out = []
    for section, name, cls, note in (
            ("task", "d2v_kd", D2vKDTaskConfig, ""), ("model", "d2v_kd", D2vKDModelConfig, ""),
            ("criterion", "d2v_kd", D2vKDCriterionConfig, " (also `d2v_kd_multimodal`'s)"),
            ("optimizer", "torch_adamw", TorchAdamWConfig, ""),
            ("task", "d2v_kd_multimodal", _MultimodalFields,
             ": these, then every field of `d2v_kd`'s task but `data`, `retrieval_folder` and `retrieval_examples`"),
            ("model", "d2v_kd_multimodal", D2vKDMultimodalModelConfig, ""),
            ("task", "d2v_kd_image_text", _PairFields,
             ": these, then every field of `d2v_kd`'s task but `data` and the text and audio data fields"),
            ("model", "d2v_kd_image_text", D2vKDImageTextModelConfig, ""),
            ("criterion", "d2v_kd_image_text", D2vKDImageTextCriterionConfig,
             ": these, then every field of `d2v_kd`'s criterion")):
        shown = {_MultimodalFields: D2vKDMultimodalTaskConfig, _PairFields: D2vKDImageTextTaskConfig}.get(cls, cls)
        module = f"{shown.__module__}.{shown.__name__}"
        out += [f"**`{section}`** (`_name: {name}`, `{module}`){note}", "",
                "| option | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.name.startswith("_") or (section == "optimizer" and f.name == "lr"):  # lr: optimization.lr
                continue
            if cls is D2vKDImageTextCriterionConfig and f.name in criterion_fields:
                continue
            meaning = (f.metadata.get("help") or f.metadata.get("doc", "")).replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{section}.{f.name}` | {_default(f)} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def doc_block(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true")
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    ref = reference()
    if not (args.write or args.check):
        print(ref, end="")
        return 0
    text = DOC.read_text()
    if args.check:
        if doc_block(text) != ref:
            print("docs/configuration.md is out of date: run python scripts/config_reference.py --write",
                  file=sys.stderr)
            return 1
        return 0
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + ref + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
