"""Plot a d2v_kd run from fairseq's json log: loss, target/prediction spread, and retrieval vs the teacher.

    python scripts/plot_metrics.py CHECKPOINT_DIR/hydra/hydra_train.log --output metrics.png

Reads the lines fairseq writes with ``common.log_format=json`` (any file holding them: hydra_train.log or a
captured stdout). One PNG with three panels; retrieval curves are solid for the student and dashed for the
teacher (computed once per run), so the student-teacher gap is visible at a glance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> dict:
    """``{"train_inner": [...], "valid": [...]}`` parsed from fairseq's json log lines."""
    rows = {"train_inner": [], "valid": []}
    for line in Path(path).read_text(errors="replace").splitlines():
        for kind in rows:
            if (f"[{kind}][" in line or f"| {kind} |" in line) and "{" in line:
                try:
                    rows[kind].append(json.loads(line[line.index("{"):]))
                except json.JSONDecodeError:
                    pass
    return rows


def plot(rows: dict, output: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = rows["train_inner"], rows["valid"]
    if not train and not valid:
        raise ValueError("no fairseq json log lines found (was the run started with common.log_format=json?)")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    steps = [int(float(r["num_updates"])) for r in train]
    axes[0].plot(steps, [float(r["loss"]) for r in train], label="train")
    if valid and "valid_loss" in valid[0]:
        axes[0].plot([int(float(r["valid_num_updates"])) for r in valid],
                     [float(r["valid_loss"]) for r in valid], "o-", label="valid")
    axes[0].set(title="distillation loss (MSE)", xlabel="update", yscale="log")
    for key in ("target_var", "pred_var"):
        if train and key in train[0]:
            axes[1].plot(steps, [float(r[key]) for r in train], label=key)
    axes[1].set(title="feature spread (collapse monitor)", xlabel="update")
    metrics = sorted({k[len("valid_"):] for r in valid for k in r
                      if k.startswith("valid_") and "_top" in k
                      and not k.startswith(("valid_teacher_", "valid_best_"))})
    vsteps = [int(float(r["valid_num_updates"])) for r in valid]
    for name in metrics:
        line, = axes[2].plot(vsteps, [float(r.get(f"valid_{name}", "nan")) for r in valid], "o-", label=name)
        teacher = [float(r[f"valid_teacher_{name}"]) for r in valid if f"valid_teacher_{name}" in r]
        if teacher:
            axes[2].axhline(teacher[-1], linestyle="--", color=line.get_color(), alpha=0.6)
    axes[2].set(title="zero-shot retrieval (%; dashed: teacher)", xlabel="update", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path, help="fairseq log with json lines (e.g. SAVE_DIR/hydra/hydra_train.log)")
    p.add_argument("--output", type=Path, default=Path("metrics.png"))
    args = p.parse_args(argv)
    try:
        metrics = plot(read_log(args.log), args.output)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(metrics)} retrieval curves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
