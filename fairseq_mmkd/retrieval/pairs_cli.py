"""``python -m fairseq_mmkd.retrieval --checkpoint C --pairs FILE``: zero-shot image<->text retrieval (and with
``--zeroshot``, zero-shot CIFAR classification) of an aligned ``d2v_kd_image_text`` student, the numbers its
training validation logs, computed by the same functions (``cross_modal``).

``--save-embeddings E.npz`` writes ``image_embeddings`` ``[images, D]``, ``text_embeddings`` ``[captions, D]`` and
``text_image_index`` ``[captions]`` (the image each caption belongs to), so the metrics can be recomputed anywhere.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Dict

import numpy as np

from ..files import atomic_write
from .cli import DTYPES, UsageError, resolve_device
from .cross_modal import (embed_captions, embed_images, image_text_retrieval, metric_names,
                          zero_shot_classification)


def add_pair_arguments(p) -> None:
    p.add_argument("--pairs", metavar="FILE", help="image-caption pairs (ALBEF/BLIP JSON list or Karpathy's "
                                                   "dataset_coco.json / dataset_flickr30k.json): zero-shot image<->text "
                                                   "retrieval of a d2v_kd_image_text student")
    p.add_argument("--image-root", metavar="DIR", help="folder the pairs' image paths are relative to (default: the "
                                                       "file's folder)")
    p.add_argument("--split", help="split of a Karpathy file (default: the checkpoint's task.valid_split)")
    p.add_argument("--text-dict", metavar="DIR", help="folder with the text teacher's dict.txt (default: the "
                                                      "checkpoint's task.text_dict)")
    p.add_argument("--save-embeddings", metavar="E.npz", help="write the image and caption embeddings and the "
                                                              "caption->image index")
    p.add_argument("--zeroshot", action="store_true", help="zero-shot classification of --cifar10/--cifar100 through "
                                                           "the text side (CLIP's 18 templates)")


def _tokenizer(args, task_cfg, text_positions: int):
    from ..data.captions import CaptionTokenizer

    folder = args.text_dict or task_cfg.get("text_dict")
    if not folder:
        raise UsageError("pass --text-dict DIR (the folder with the text teacher's dict.txt)")
    tok = CaptionTokenizer(folder, task_cfg.get("bpe_encoder_json") or None, task_cfg.get("bpe_vocab") or None,
                           min(int(task_cfg.get("max_caption_tokens") or 40), text_positions))
    return tok


def run_pairs(args) -> Dict[str, object]:
    from ..d2v.loading import read_checkpoint
    from ..data.image import load_eval_crops
    from ..data.pairs import read_pairs
    from ..models import load_student
    from .sets.cifar import cifar_class_names, load_cifar

    device, dtype_name = resolve_device(args)
    if args.zeroshot and not (args.cifar10 or args.cifar100):
        raise UsageError("--zeroshot classifies --cifar10 DIR and/or --cifar100 DIR")
    state = read_checkpoint(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    task_cfg = dict(((state.get("cfg") or {}).get("task") or {}) if isinstance(state, dict) else {})
    split = args.split or task_cfg.get("valid_split") or "test"
    pairs = read_pairs(args.pairs, args.image_root, (split,)) if args.pairs else None
    model = load_student(args.checkpoint, device=device, trust_checkpoint=args.trust_checkpoint)
    if not hasattr(model, "alignment"):
        raise UsageError(f"{args.checkpoint} is not an image-text student (d2v_kd_image_text): --pairs and --zeroshot "
                         "need aligned image and caption embeddings")
    dtype = DTYPES[dtype_name]
    if dtype is not None:
        model = model.to(dtype)
    text = model.distiller.cfgs["text"].encoder
    tok = _tokenizer(args, task_cfg, text.max_source_positions)
    tok.check_teacher(text.vocab_size)
    size = model.modality_model("image").input_size
    settings = dict(batch_size=args.batch_size, device=device)
    start = time.perf_counter()
    result: Dict[str, object] = {}
    if pairs is not None:
        tokens = tok.encode_all(pairs.captions, pairs.source)
        image = embed_images(model.embed, load_eval_crops(pairs.images, size), size, dtype=dtype, **settings)
        caption = embed_captions(model.embed, tokens, tok.pad, **settings)
        result.update(image_text_retrieval(image, caption, pairs.caption_image, pairs.name))
        result[f"{pairs.name}_images"], result[f"{pairs.name}_captions"] = len(pairs.images), len(pairs.captions)
        if args.save_embeddings:
            buffer = io.BytesIO()
            np.savez(buffer, image_embeddings=image.cpu().numpy(), text_embeddings=caption.cpu().numpy(),
                     text_image_index=np.asarray(pairs.caption_image))
            with atomic_write(args.save_embeddings) as f:
                f.write(buffer.getvalue())
        print(" ".join(f"{n}={result[n]:.2f}" for n in metric_names(pairs.name)))
    if args.zeroshot:
        for name in ("cifar10", "cifar100"):
            root = getattr(args, name)
            if not root:
                continue
            data = load_cifar(root, name, limit=args.limit)
            scores = zero_shot_classification(model.embed, lambda p: tok.encode(p, f"prompt {p!r}"), tok.pad,
                                              cifar_class_names(root, name), data.test_images, data.test_labels,
                                              size, name, dtype=dtype, **settings)
            result.update(scores)
            print(" ".join(f"{n}={v:.2f}" for n, v in scores.items()))
    result.update(checkpoint=str(Path(args.checkpoint).resolve()), model="student", modality="image-text",
                  device=device, dtype=dtype_name, seconds=round(time.perf_counter() - start, 2),
                  pairs=None if pairs is None else {"file": pairs.source, "split": split},
                  embedding={m: model.alignment.pooling[m] for m in ("image", "text")})
    return result


__all__ = ["add_pair_arguments", "run_pairs"]
