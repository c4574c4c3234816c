#!/usr/bin/env python3
"""Which defaults should ``kd_image_text`` have? Pooling per modality, projection heads and the contrastive weight,
measured on the image-text demo's data.

    python scripts/measure_image_text.py [--updates 300] [--json OUT]

Every variant is the demo's run (``preset=demo_image_text``: captioned pictures of coloured shapes, random image and
text teachers of one width, a 2-block student, 300 updates) with the settings named in its row, through the real ``fairseq-hydra-train``. Reported per
variant: the held-out pairs' ``rmean`` (mean of R@1/5/10 both ways), R@1 both ways, zero-shot top-1 of the ten
colour classes, and the regression terms at the end (what alignment costs the distillation). Random teachers on
synthetic pictures are a weak proxy for base_imagenet.pt and nlp_base.pt on COCO: the figures choose between
settings that are otherwise equal in the literature, they do not predict COCO numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from demo import json_lines
from demo_image_text import prepare_image_text

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VARIANTS = {  # every setting named, so the table does not move when a default does
    "no heads, cls / mean pooling, weight 1": ["model.projection_dim=0"],
    "no heads, image pooling mean": ["model.projection_dim=0", "model.image_pooling=mean"],
    "no heads, text pooling <s>": ["model.projection_dim=0", "model.text_pooling=cls"],
    "no heads, contrastive weight 0.5": ["model.projection_dim=0", "criterion.contrastive_weight=0.5"],
    "no heads, contrastive weight 2": ["model.projection_dim=0", "criterion.contrastive_weight=2"],
    "heads of the student's width (the default)": ["model.projection_dim=-1"],
    "heads, image pooling mean": ["model.projection_dim=-1", "model.image_pooling=mean"],
    "no heads, another seed (the noise)": ["model.projection_dim=0", "common.seed=2"],
    "heads, another seed": ["model.projection_dim=-1", "common.seed=2"],
}


def run(out: Path, prepared: dict, name: str, extra: list, updates: int) -> dict:
    save = out / "runs" / str(list(VARIANTS).index(name))
    shutil.rmtree(save, ignore_errors=True)
    cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", "config", "--config-name", "kd_image_text",
           "preset=demo_image_text", f"task.pairs={prepared['PAIRS']}", f"task.valid_pairs={prepared['VALID_PAIRS']}",
           f"task.text_dict={prepared['TEXT_DICT']}", f"task.cifar10_root={prepared['CIFAR']}",
           f"model.image_teacher={prepared['IMAGE_TEACHER']}", f"model.text_teacher={prepared['TEXT_TEACHER']}",
           f"checkpoint.save_dir={save}", f"optimization.max_update={updates}",
           f"lr_scheduler.warmup_updates={updates // 5}", f"dataset.validate_interval_updates={updates}",
           "task.retrieval_teacher=false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name}: training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log = save / "hydra" / "hydra_train.log"
    valid, train = json_lines(log, "valid")[-1], json_lines(log, "train")[-1]
    pick = lambda k: float(valid[f"valid_{k}"])  # noqa: E731
    return {"rmean": pick("dataset_coco_rmean"), "i2t_r1": pick("dataset_coco_i2t_r1"),
            "t2i_r1": pick("dataset_coco_t2i_r1"), "zeroshot_top1": pick("cifar10_zeroshot_top1"),
            "regression_image": float(train["train_regression_image"]),
            "regression_text": float(train["train_regression_text"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/fairseq_mmkd_image_text"))
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--json")
    args = p.parse_args(argv)
    prepared = {k: str(v) for k, v in prepare_image_text(args.out).items()}
    results = {}
    previous = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    for name, extra in VARIANTS.items():
        results[name] = previous.get(name) or run(args.out, prepared, name, extra, args.updates)
        print(f"[measure] {name}: {results[name]}", file=sys.stderr, flush=True)
    print(f"| variant ({args.updates} updates of the image-text demo) | rmean | R@1 i->t | R@1 t->i | zero-shot top-1 "
          "| regression image / text |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rmean']:.1f} | {r['i2t_r1']:.1f} | {r['t2i_r1']:.1f} | {r['zeroshot_top1']:.0f} | "
              f"{r['regression_image']:.3f} / {r['regression_text']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
