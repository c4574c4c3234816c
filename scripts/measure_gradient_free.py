#!/usr/bin/env python
"""Should the student parameters that the loss gives no gradient be trained? Measured on the image demo.

    python scripts/measure_gradient_free.py [--updates 300] [--out /tmp/fairseq_mmkd_gradient_free]

With ``prediction=layer_average`` and data2vec 2.0's target recipe, the last student block's closing LayerNorm and
its FFN output bias get no gradient by construction (``distill.gradient_free_parameters``, measured in
``tests/training/test_gradient_free.py``), but they shape what retrieval embeds: the last block's output. The script
runs the image demo's distillation twice, from the same seed and a student copied from the teacher's first blocks
(the seed recipe's init): as the plugin does by default (those tensors frozen) and with
``model.optimize_gradient_free=true`` (in the optimizer with the rest, as before). It prints, per run, every
logged training loss (equal when the frozen tensors cannot touch the objective), the final retrieval metrics,
how far each gradient-free tensor moved from its initial value, and the largest difference of every other
student tensor between the runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import demo

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/fairseq_mmkd_gradient_free", help="where data, teacher and runs go")
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def train(out: Path, prepared: dict, updates: int, *extra) -> str:
    save = out / "runs" / ("trained" if extra else "frozen")
    cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", "config", "--config-name", "kd_image", "preset=demo",
           f"task.data={prepared['DATA']}", f"task.cifar100_root={prepared['RETRIEVAL']}",
           f"model.teacher_checkpoint={prepared['TEACHER']}", "model.student_init=teacher_first",
           f"checkpoint.save_dir={save}", f"optimization.max_update={updates}",
           f"lr_scheduler.warmup_updates={updates // 5}", f"dataset.validate_interval_updates={updates}",
           "task.retrieval_teacher=false", "task.retrieval_examples=0", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return str(save)


def main(argv=None) -> int:
    import torch

    from fairseq_mmkd.d2v.loading import load_d2v

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = demo.prepare(out, None)
    runs = {"frozen": train(out, prepared, args.updates),
            "trained": train(out, prepared, args.updates, "model.optimize_gradient_free=true")}
    states = {k: torch.load(Path(v) / "checkpoint_last.pt", map_location="cpu", weights_only=True) for k, v in runs.items()}
    logs = {k: (Path(v) / "hydra" / "hydra_train.log").read_text() for k, v in runs.items()}
    marker = "keep their initial values (docs/architecture.md): "
    names = next(line.split(marker, 1)[1].strip().split(", ") for line in logs["frozen"].splitlines() if marker in line)
    teacher = load_d2v(prepared["TEACHER"]).blocks.state_dict()
    student_depth = 2  # preset=demo

    def initial(name):  # student block s was copied from teacher block s (teacher_first)
        return teacher[name.removeprefix("distiller.student_blocks.")]

    result = {"updates": args.updates, "gradient_free": names, "runs": {}}
    for k, state in states.items():
        rows = [json.loads(line[line.index("{"):]) for line in logs[k].splitlines() if "[valid][" in line]
        losses = [float(json.loads(line[line.index("{"):])["loss"]) for line in logs[k].splitlines()
                  if "[train_inner][" in line]
        drift = {n: float((state["model"][n] - initial(n)).abs().max()) for n in names}
        result["runs"][k] = {"losses": losses, "valid": {m: rows[-1][m] for m in rows[-1] if "cifar100" in m},
                             "drift_from_init": drift}
    others = [n for n in states["frozen"]["model"] if n.startswith("distiller.student_blocks.") and n not in names]
    result["other_student_max_difference"] = max(
        float((states["frozen"]["model"][n] - states["trained"]["model"][n]).abs().max()) for n in others)
    result["student_depth"] = student_depth
    print(f"{args.updates} updates of the image demo, student copied from the teacher's first {student_depth} blocks")
    print(f"gradient-free tensors: {', '.join(names)}")
    for k, r in result["runs"].items():
        print(f"\n{k}: losses {r['losses']}")
        print(f"  valid: {r['valid']}")
        for n, d in r["drift_from_init"].items():
            print(f"  {n}: moved {d:.3g} from its initial value")
    same = result["runs"]["frozen"]["losses"] == result["runs"]["trained"]["losses"]
    print(f"\nlogged losses identical: {same}; largest difference of the other student tensors: "
          f"{result['other_student_max_difference']:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
