"""Zero-shot image-text retrieval and zero-shot classification through the text side, as the image-text literature
measures them (CLIP, ALBEF, BLIP, LiT; docs/image_text.md).

Retrieval, on L2-normalised embeddings and cosine similarity: image->text, an image's rank is the best rank among its
captions (Recall@K: the fraction of images with a caption among the K nearest captions); text->image, a caption's rank
is that of its one image. Ties count against the query: an item that scores the same as the right one is ranked
before it, so equal embeddings never inflate a recall. ``<set>_rmean`` is the mean of the six recalls (R@1/5/10 both
ways), the usual summary.

Zero-shot classification: one prototype per class, the mean of its L2-normalised prompt embeddings (CLIP's 18 CIFAR
templates, "a photo of a {}."), renormalised; an image's class is its most similar prototype (top-1 and top-5).

Everything is chunked: a COCO-sized set (5,000 images, 25,000 captions) never holds the 5,000 x 25,000 similarity
matrix at once. Nothing here imports fairseq.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .evaluate import _all_gather_rows, _world

RECALL_AT = (1, 5, 10)

# CLIP's prompt templates for CIFAR-10 and CIFAR-100 (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb,
# "cifar10"/"cifar100": the same 18 for both).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)


def metric_names(name: str) -> list:
    return [f"{name}_{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT] + [f"{name}_rmean"]


def image_text_ranks(image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor, chunk: int = 1024) -> tuple:
    """``(image->text ranks [I], text->image ranks [T])``, 0-based, of normalised ``image`` ``[I, D]`` and ``text``
    ``[T, D]`` embeddings, caption ``j`` belonging to image ``text_image[j]`` (every image has at least one)."""
    image, text = image.float(), text.float()
    text_image = text_image.to(image.device).long()
    i2t = torch.empty(image.shape[0], dtype=torch.long)
    for s in range(0, image.shape[0], chunk):
        sims = image[s:s + chunk] @ text.t()  # [c, T]
        mine = text_image[None, :] == torch.arange(s, s + sims.shape[0], device=sims.device)[:, None]
        best = sims.masked_fill(~mine, float("-inf")).max(1).values
        i2t[s:s + sims.shape[0]] = ((sims >= best[:, None]) & ~mine).sum(1).cpu()
    t2i = torch.empty(text.shape[0], dtype=torch.long)
    for s in range(0, text.shape[0], chunk):
        sims = text[s:s + chunk] @ image.t()  # [c, I]
        right = text_image[s:s + sims.shape[0]]
        score = sims.gather(1, right[:, None])
        others = torch.ones_like(sims, dtype=torch.bool).scatter_(1, right[:, None], False)
        t2i[s:s + sims.shape[0]] = ((sims >= score) & others).sum(1).cpu()
    return i2t, t2i


def image_text_retrieval(image: torch.Tensor, text: torch.Tensor, text_image, name: str, chunk: int = 1024) -> dict:
    """Recall@1/5/10 in percent both ways and their mean, named ``<name>_i2t_r1`` ... ``<name>_rmean``."""
    i2t, t2i = image_text_ranks(image, text, torch.as_tensor(np.asarray(text_image)), chunk)
    out = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_AT:
            out[f"{name}_{direction}_r{k}"] = 100.0 * float((ranks < k).float().mean())
    out[f"{name}_rmean"] = sum(out[n] for n in metric_names(name)[:-1]) / (2 * len(RECALL_AT))
    return out


def class_prototypes(embed_text: Callable[[Sequence[str]], torch.Tensor], class_names: Sequence[str],
                     templates: Sequence[str] = CIFAR_TEMPLATES) -> torch.Tensor:
    """``[C, D]``: per class, the renormalised mean of the normalised embeddings of its prompts."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = F.normalize(embed_text(prompts).float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zero_shot_accuracy(image: torch.Tensor, labels, prototypes: torch.Tensor, name: str, ks=(1, 5)) -> dict:
    """Top-k accuracy in percent of classifying normalised ``image`` embeddings by their nearest prototype:
    ``<name>_zeroshot_top1`` ... (k larger than the number of classes is capped)."""
    labels = torch.as_tensor(np.asarray(labels), device=image.device).long()
    sims = image.float() @ prototypes.float().t()
    top = sims.topk(min(max(ks), sims.shape[1]), dim=1).indices
    return {f"{name}_zeroshot_top{k}": 100.0 * float((top[:, :k] == labels[:, None]).any(1).float().mean())
            for k in ks}


def embed_sharded(embed_batch: Callable[[torch.Tensor], torch.Tensor], total: int, batch_size: int,
                  order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[total, D]``: ``embed_batch(indices)`` over every item, in batches, under ``torch.inference_mode``.

    Under an initialised ``torch.distributed`` group rank r takes the items at positions r, r + W, ... of ``order``
    (default: as given; captions come longest first, so every rank's batches are equally long), padded with the
    last one so that every rank runs the same number of batches; the gathered rows are put back in item order.
    """
    if total == 0:
        raise ValueError("nothing to embed")
    order = torch.arange(total) if order is None else torch.as_tensor(order).long()
    rank, world = _world()
    per_rank = math.ceil(total / world)
    mine = order[(rank + world * torch.arange(per_rank)).clamp(max=total - 1)]
    with torch.inference_mode():
        local = torch.cat([embed_batch(mine[lo:lo + batch_size]).float() for lo in range(0, per_rank, batch_size)])
    if world > 1:
        gathered = _all_gather_rows(local, per_rank * world)
        where = (torch.arange(world)[:, None] + world * torch.arange(per_rank)[None, :]).flatten()
        keep = where < total
        local, rows = gathered[keep.to(gathered.device)], order[where[keep]]
    else:
        rows = mine
    out = torch.empty_like(local)
    out[rows.to(local.device)] = local
    return out


def embed_images(embed: Callable, images: torch.Tensor, input_size: int, batch_size: int = 256, device="cpu",
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[I, D]`` embeddings of uint8 ``images`` ``[I, 3, H, W]``, resized to ``input_size`` and normalised as
    retrieval does (``sets.image_preprocess``), with ``embed("image", x, None)``."""
    from .sets.image_preprocess import preprocess

    device = torch.device(device)

    def batch(idx):
        x = preprocess(images[idx], input_size, device)
        return embed("image", x.to(dtype) if dtype is not None else x, None)

    return embed_sharded(batch, len(images), batch_size)


def embed_captions(embed: Callable, tokens: Sequence[torch.Tensor], pad: int, batch_size: int = 256,
                   device="cpu") -> torch.Tensor:
    """``[T, D]`` embeddings of token-id captions (``<s> ... </s>``), padded per batch, longest first, with
    ``embed("text", ids, padding_mask)``."""
    device = torch.device(device)

    def batch(idx):
        rows = [tokens[int(i)] for i in idx]
        lengths = torch.tensor([len(t) for t in rows])
        ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
        for i, t in enumerate(rows):
            ids[i, :len(t)] = t
        mask = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
        return embed("text", ids.to(device), mask.to(device) if bool(mask.any()) else None)

    order = torch.argsort(torch.tensor([len(t) for t in tokens]), descending=True, stable=True)
    return embed_sharded(batch, len(tokens), batch_size, order)


def zero_shot_classification(embed: Callable, tokenize: Callable[[str], torch.Tensor], pad: int, class_names,
                             images: torch.Tensor, labels, input_size: int, name: str, batch_size: int = 256,
                             device="cpu", dtype: Optional[torch.dtype] = None,
                             templates: Sequence[str] = CIFAR_TEMPLATES) -> dict:
    """Zero-shot top-1/top-5 of uint8 ``images`` through prompts of ``class_names`` (``<name>_zeroshot_top1`` ...)."""
    prompts = [tokenize(t.format(c)) for c in class_names for t in templates]
    prompt_emb = embed_captions(embed, prompts, pad, batch_size, device)
    protos = class_prototypes(lambda _: prompt_emb, class_names, templates)
    image = embed_images(embed, images, input_size, batch_size, device, dtype)
    return zero_shot_accuracy(image, labels, protos, name)
