"""Export a trained student as a standalone data2vec 2.0 checkpoint.

    python -m fairseq_mmkd.export --checkpoint checkpoints/kd_image/checkpoint_best.pt --output student_d2v2.pt

The result is a ``data2vec_multi`` file in fairseq's trainer layout: the shared image encoder plus the
student's blocks as the shared blocks (depth = student depth). fairseq's data2vec2 fine-tuning tooling and
``fairseq_mmkd.load_d2v_image`` start from it like from ``base_imagenet.pt``; no teacher file is needed.
A ``prediction=head`` regression head is a distillation-only part and is not exported.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .checkpoint import CheckpointError
from .d2v_format import save_d2v_checkpoint
from .d2v_model import D2vModel


def student_as_d2v(student) -> D2vModel:
    """A ``D2vModel`` whose encoder is the shared encoder and whose blocks are the student's."""
    distiller = student.distiller
    cfg = distiller.cfg
    if cfg.layer_norm_first:
        raise ValueError("exporting pre-LN students is not supported: fairseq's pre-LN data2vec2 block drops the "
                         "residual stream, so the exported file would not compute what the student computes")
    depth = len(distiller.student_blocks)
    targets = replace(cfg.targets, average_top_k_layers=min(cfg.targets.average_top_k_layers, depth))
    model = D2vModel(replace(cfg, depth=depth, targets=targets))
    model.encoder.load_state_dict(distiller.shared_encoder.state_dict())
    model.blocks.load_state_dict(distiller.student_blocks.state_dict())
    return model.eval().requires_grad_(False)


def export_student(checkpoint, output, trust_checkpoint: bool = False) -> D2vModel:
    from .kd_model import load_student

    model = student_as_d2v(load_student(checkpoint, trust_checkpoint=trust_checkpoint))
    save_d2v_checkpoint(model, output)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairseq_mmkd.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a d2v_kd training checkpoint (checkpoint_best.pt)")
    parser.add_argument("--output", required=True, help="where to write the data2vec2-format student")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow arbitrary pickled objects in the input (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        model = export_student(args.checkpoint, args.output, args.trust_checkpoint)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: data2vec_multi image model, depth {model.cfg.depth}, {n / 1e6:.2f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
