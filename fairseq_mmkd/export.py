"""Export a trained student as a standalone data2vec 2.0 checkpoint.

    python -m fairseq_mmkd.export --checkpoint checkpoints/kd_image/checkpoint_best.pt --output student_d2v2.pt
    python -m fairseq_mmkd.export --checkpoint checkpoints/kd_multimodal/checkpoint_best.pt --output multi.pt
    python -m fairseq_mmkd.export --checkpoint checkpoints/kd_multimodal/checkpoint_best.pt --output text.pt \\
        --modality text --text-dict /data/books-wiki-bin/dict.txt

The result is a ``data2vec_multi`` file in fairseq's trainer layout: the shared (frozen) modality encoder plus
the student's blocks as the shared blocks (depth = student depth). A ``d2v_kd_multimodal`` student becomes one
multimodal file (every modality encoder, ``modality_encoders.IMAGE/TEXT/AUDIO.*``, each with its own section
under ``cfg.model.modalities``, in front of the one stack of student blocks; ``fairseq_mmkd.load_d2v(path,
modality=...)`` runs any of them), or with ``--modality`` the single-modality file of one of them. fairseq's
data2vec2 fine-tuning tooling and ``fairseq_mmkd.load_d2v`` start from a single-modality file like from
``base_imagenet.pt``, ``nlp_base.pt`` or ``base_libri.pt``; no teacher file is needed. fairseq's own code sizes a
text model's vocabulary from ``task.data``/dict.txt: ``--text-dict`` writes that folder into the file.

Each encoder computes exactly what it computed in training, with its teacher's LayerNorm eps: where that differs
from the student blocks' (an image teacher has 1e-6, text and audio teachers 1e-5), the file keeps the blocks'
eps as ``cfg.model.norm_eps`` and the encoder's as ``cfg.model.modalities.<modality>.norm_eps``, which
``load_d2v`` reads; fairseq's own code drops that key and builds every LayerNorm with ``norm_eps`` (docs/tools.md).
A ``prediction=head`` regression head is a distillation-only part and is not exported. A ``d2v_kd_image_text``
student becomes the multimodal file of its image and text encoders and stack, plus what aligns them under the file's
top-level ``alignment`` entry (pooling, projection heads, the learned logit scale, the caption tokenizer's files):
``fairseq_mmkd.distill.alignment.AlignedEncoders.from_file(path)`` embeds images and captions with it.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

from .d2v.loading import CheckpointError
from .d2v.writing import save_d2v_checkpoint, save_multimodal_d2v_checkpoint
from .d2v.model import D2vConfig, D2vModel


def is_multimodal(student) -> bool:
    """Whether ``student`` (from ``kd_model.load_student``) is a ``d2v_kd_multimodal`` model."""
    return hasattr(student, "modality_model")


def student_modalities(student) -> list:
    return list(student.modalities) if is_multimodal(student) else [student.modality]


def pick_modality(student, modality: Optional[str], path="the checkpoint") -> str:
    """The modality to use of ``student``: ``modality``, which must be one of its own; required for a multimodal one."""
    have = student_modalities(student)
    if modality is None:
        if len(have) > 1:
            raise CheckpointError(f"{path}: is a multimodal student ({', '.join(have)}); choose one with --modality "
                                  f"({'|'.join(have)})")
        return have[0]
    if modality not in have:
        kind = "multimodal student" if len(have) > 1 else "student"
        raise CheckpointError(f"{path}: is a {kind} of {', '.join(have)}, not {modality}; pass --modality "
                              f"{'|'.join(have)}")
    return modality


def distiller_as_d2v(distiller, block_cfg: D2vConfig) -> D2vModel:
    """A ``D2vModel`` made of a distiller's shared encoder and its student blocks.

    ``distiller.cfg`` is the teacher of the encoder (its encoder settings and eps, its target settings);
    ``block_cfg`` the teacher whose block settings the student blocks were built with (the same one for a
    single-modality student; ``student_init``'s teacher, else the first, for a multimodal one).
    """
    cfg = distiller.cfg
    if cfg.layer_norm_first:
        raise ValueError("exporting pre-LN students is not supported: fairseq's pre-LN data2vec2 block drops the "
                         "residual stream, so the exported file would not compute what the student computes")
    for attr in ("embed_dim", "num_heads"):
        if getattr(cfg, attr) != getattr(block_cfg, attr):
            raise ValueError(f"the {cfg.modality} encoder was built with {attr}={getattr(cfg, attr)}, the student "
                             f"blocks with {getattr(block_cfg, attr)}; a data2vec_multi file has one {attr}")
    depth = len(distiller.student_blocks)
    enc_cls = type(distiller.shared_encoder)
    encoder_cfg, encoder_state = cfg.encoder, distiller.shared_encoder.state_dict()
    if hasattr(enc_cls, "for_block_layers"):  # e.g. per-layer ALiBi scales: those of the layers the blocks used
        encoder_cfg, encoder_state = enc_cls.for_block_layers(cfg.encoder, encoder_state,
                                                              distiller.student_bias_layers)
    targets = replace(cfg.targets, average_top_k_layers=min(cfg.targets.average_top_k_layers, depth))
    new = replace(cfg, depth=depth, norm_eps=block_cfg.norm_eps, mlp_ratio=block_cfg.mlp_ratio,
                  norm_affine=block_cfg.norm_affine, end_of_block_targets=block_cfg.end_of_block_targets,
                  encoder=encoder_cfg, targets=targets, encoder_norm_eps=None)
    model = D2vModel(new)
    if _norm_eps(model.encoder) != _norm_eps(distiller.shared_encoder):  # the teacher's eps differs and is used
        model = D2vModel(replace(new, encoder_norm_eps=cfg.encoder_eps))
        if _norm_eps(model.encoder) != _norm_eps(distiller.shared_encoder):
            raise ValueError(f"the {cfg.modality} encoder's normalisation layers cannot be rebuilt with their eps")
    try:
        model.encoder.load_state_dict(encoder_state)
    except RuntimeError:  # its prenet blocks or LayerNorms are of another shape than the student blocks'
        raise ValueError(f"the {cfg.modality} encoder's blocks or LayerNorms differ from the student blocks' "
                         f"(mlp_ratio {cfg.mlp_ratio} vs {block_cfg.mlp_ratio}, norm_affine {cfg.norm_affine} vs "
                         f"{block_cfg.norm_affine}); a data2vec_multi file builds both alike") from None
    model.blocks.load_state_dict(distiller.student_blocks.state_dict())
    return model.eval().requires_grad_(False)


def _norm_eps(module) -> list:
    return [m.eps for m in module.modules() if hasattr(m, "eps")]


def student_as_d2v(student, modality: Optional[str] = None) -> D2vModel:
    """The student of ``modality`` (default: a single-modality student's own) as a ``D2vModel``: that modality's
    shared encoder in front of the student blocks."""
    modality = pick_modality(student, modality)
    if is_multimodal(student):
        multi = student.distiller
        return distiller_as_d2v(multi.view(modality), multi.cfgs[multi.student_source])
    return distiller_as_d2v(student.distiller, student.distiller.cfg)


def teacher_settings(student, modality: str) -> dict:
    """What the student's checkpoint recorded of the teacher's pretraining task (audio: ``normalize``)."""
    if is_multimodal(student):
        return dict((getattr(student, "teacher_task_cfgs", None) or {}).get(modality) or {})
    return dict(getattr(student, "teacher_task_cfg", None) or {})


def text_dict_folder(path, vocab_size: int) -> str:
    """The folder to write as a text model's ``task.data``: the one holding ``dict.txt``, checked to give the
    encoder's ``vocab_size`` embedding rows the way fairseq's ``masked_lm`` task counts them."""
    from fairseq.data import Dictionary

    path = Path(path).expanduser()
    file = path / "dict.txt" if path.is_dir() else path
    if not path.exists():
        raise CheckpointError(f"--text-dict {path}: not found; pass the text teacher's dict.txt (or the folder holding "
                              "it, e.g. its fairseq-preprocess output)")
    if file.name != "dict.txt" or not file.is_file():
        raise CheckpointError(f"--text-dict {path}: fairseq reads the dictionary from <folder>/dict.txt; pass a file "
                              "named dict.txt or the folder holding it")
    try:
        dictionary = Dictionary.load(str(file))
    except Exception as e:  # fairseq raises ValueError/RuntimeError for malformed lines
        raise CheckpointError(f"--text-dict {file}: not a fairseq dictionary ({e})") from None
    rows = len(dictionary) + (0 if "<mask>" in dictionary.indices else 1)  # masked_lm adds <mask>
    if rows != vocab_size:
        raise CheckpointError(f"--text-dict {file}: gives {rows} embedding rows (4 specials + symbols + <mask>), but "
                              f"the student's text encoder has {vocab_size}; pass the text teacher's dict.txt")
    return str(file.parent.resolve())


def task_cfg_for(model: D2vModel, settings: dict, text_data: Optional[str] = None) -> dict:
    """The ``cfg.task`` section of ``model``'s modality, with the teacher's recorded settings and text's data folder."""
    task = type(model.encoder).fairseq_task_cfg(model.cfg.encoder)
    task.update({k: v for k, v in settings.items() if k in task})
    if model.cfg.modality == "text" and text_data:
        task["data"] = text_data
    return task


def _load(checkpoint, trust_checkpoint: bool, text_dict):
    from .models._student import load_student

    if text_dict is not None and not Path(text_dict).expanduser().exists():  # before loading the checkpoint
        raise CheckpointError(f"--text-dict {text_dict}: not found; pass the text teacher's dict.txt (or the folder "
                              "holding it)")
    return load_student(checkpoint, trust_checkpoint=trust_checkpoint)


def _text_data(models: Dict[str, D2vModel], text_dict) -> Optional[str]:
    if text_dict is None:
        return None
    if "text" not in models:
        raise CheckpointError(f"--text-dict is for a text model, and this export holds {', '.join(models)}; drop it")
    return text_dict_folder(text_dict, models["text"].cfg.encoder.vocab_size)


def write_student(student, output, modality: Optional[str] = None, text_dict=None,
                  checkpoint="the checkpoint") -> Dict[str, D2vModel]:
    """Write a loaded student (``kd_model.load_student``) as :func:`export` does; returns modality -> model written."""
    if modality is None and is_multimodal(student) and len(student.modalities) > 1:
        models = {m: student_as_d2v(student, m) for m in student.modalities}
        text_data = _text_data(models, text_dict)
        tasks = {m: task_cfg_for(model, teacher_settings(student, m), text_data) for m, model in models.items()}
        extra = {"alignment": alignment_entry(student)} if hasattr(student, "alignment") else None
        save_multimodal_d2v_checkpoint(models, output, tasks, shared=student.distiller.student_source, extra=extra)
        return models
    modality = pick_modality(student, modality, checkpoint)
    model = student_as_d2v(student, modality)
    task = task_cfg_for(model, teacher_settings(student, modality), _text_data({modality: model}, text_dict))
    save_d2v_checkpoint(model, output, task_cfg=task)
    return {modality: model}


def alignment_entry(student) -> dict:
    """An image-text student's alignment as plain tensors and values (``AlignedEncoders`` reads it back)."""
    a = student.alignment
    return {"pooling": dict(a.pooling), "embed_dim": int(a.embed_dim), "logit_scale": float(a.logit_scale),
            "heads": ({m: h.weight.detach().cpu().float().clone() for m, h in a.heads.items()}
                      if a.heads is not None else None),
            "captions": dict(getattr(student, "caption_settings", None) or {})}


def export(checkpoint, output, trust_checkpoint: bool = False, modality: Optional[str] = None,
           text_dict=None) -> Dict[str, D2vModel]:
    """What the command line does: a multimodal student without ``modality`` becomes the multimodal file (every
    modality encoder in front of the one stack of student blocks), anything else the single-modality file of
    ``modality`` (default: the student's own). Returns modality -> the model ``load_d2v(output, modality=...)``
    builds."""
    return write_student(_load(checkpoint, trust_checkpoint, text_dict), output, modality, text_dict, checkpoint)


def export_student(checkpoint, output, trust_checkpoint: bool = False, modality: Optional[str] = None,
                   text_dict=None) -> D2vModel:
    """Write the single-modality data2vec2 file of one modality of a student checkpoint (``d2v_kd``, or
    ``d2v_kd_multimodal`` with ``modality``); returns the model written."""
    student = _load(checkpoint, trust_checkpoint, text_dict)
    modality = pick_modality(student, modality, checkpoint)
    return write_student(student, output, modality, text_dict, checkpoint)[modality]


def notes(models: Dict[str, D2vModel], text_dict) -> list:
    """What a user should know about the written file (one line each)."""
    out = []
    for m, model in models.items():
        cfg = model.cfg
        if cfg.encoder_norm_eps is not None:
            out.append(f"note: the {m} encoder's LayerNorm eps ({cfg.encoder_norm_eps:g}) differs from the student "
                       f"blocks' ({cfg.norm_eps:g}); the file records both (cfg.model.modalities.{m}.norm_eps) and "
                       "fairseq_mmkd.load_d2v uses both, while fairseq's own data2vec2 code builds every LayerNorm "
                       "with cfg.model.norm_eps")
    if "text" in models and text_dict is None:
        out.append("note: fairseq's own data2vec2 code sizes the text vocabulary from task.data/dict.txt, which this "
                   "file does not name; pass --text-dict DICT.TXT for a file fairseq loads (load_d2v does not need it)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairseq_mmkd.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a d2v_kd or d2v_kd_multimodal training checkpoint (checkpoint_best.pt)")
    parser.add_argument("--output", required=True, help="where to write the data2vec2-format student")
    parser.add_argument("--modality", choices=("image", "text", "audio"),
                        help="write the single-modality file of this modality (default: a multimodal student's "
                             "multimodal file; a single-modality student's own modality)")
    parser.add_argument("--text-dict", metavar="DICT",
                        help="text: the teacher's dict.txt (or the folder holding it), written as the file's "
                             "task.data, from which fairseq's own data2vec2 code sizes the vocabulary")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow arbitrary pickled objects in the input (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        models = export(args.checkpoint, args.output, args.trust_checkpoint, args.modality, args.text_dict)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = next(iter(models.values()))
    n = sum(p.numel() for p in first.blocks.parameters()) + sum(
        p.numel() for model in models.values() for p in model.encoder.parameters())
    kind = (f"{next(iter(models))} model" if len(models) == 1 else
            f"multimodal model ({', '.join(models)}; one encoder each, shared blocks)")
    print(f"wrote {args.output}: data2vec_multi {kind}, depth {first.cfg.depth}, {n / 1e6:.2f}M parameters")
    for line in notes(models, args.text_dict):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
