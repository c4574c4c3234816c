"""A picture of what retrieval does: fixed test queries with their nearest memory-bank images.

Numbers say how often retrieval is right; a grid shows *how* it is wrong (colour? texture? layout?). The
queries are the same at every validation, so successive grids show the student's neighbours changing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sets.base import RetrievalSet

CELL = 64  # pixels per thumbnail (CIFAR's 32 px upscaled 2x)


def fixed_queries(labels: torch.Tensor, count: int) -> list:
    """The first test image of each of the first ``count`` classes (fallback: the first images)."""
    seen, picked = set(), []
    for i, label in enumerate(labels.tolist()):
        if label not in seen:
            seen.add(label)
            picked.append(i)
        if len(picked) == count:
            return picked
    return (picked + [i for i in range(len(labels)) if i not in picked])[:count]


def nearest(memory: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[Q, k]`` of the most cosine-similar memory rows."""
    sims = F.normalize(queries.float(), dim=1) @ F.normalize(memory.float(), dim=1).T
    return sims.topk(min(k, memory.shape[0]), dim=1).indices.cpu()


def _thumb(image: torch.Tensor):
    from PIL import Image

    arr = image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return Image.fromarray(arr).resize((CELL, CELL), Image.NEAREST)


def draw_grid(data: RetrievalSet, queries: list, neighbours: torch.Tensor, title: str):
    """Rows: query | its k neighbours, framed green when the neighbour has the query's class, red otherwise."""
    from PIL import Image, ImageDraw

    k = neighbours.shape[1]
    pad, head = 6, 40
    width = max(pad + (k + 1) * (CELL + pad) + pad, 320)
    height = head + len(queries) * (CELL + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 5), title, fill="black")
    for row, q in enumerate(queries):
        y = head + row * (CELL + pad)
        canvas.paste(_thumb(data.test_images[q]), (pad, y))
        for col, m in enumerate(neighbours[row].tolist()):
            x = pad + (col + 1) * (CELL + pad) + pad
            ok = int(data.train_labels[m]) == int(data.test_labels[q])
            draw.rectangle([x - 3, y - 3, x + CELL + 2, y + CELL + 2], outline="green" if ok else "red", width=3)
            canvas.paste(_thumb(data.train_images[m]), (x, y))
    return canvas


def save_examples(path, name: str, data: RetrievalSet, train_emb: torch.Tensor, test_emb: torch.Tensor,
                  count: int = 8, k: int = 3, step=None) -> Path:
    """Draw ``count`` fixed test queries of set ``name`` with their top-``k`` train neighbours to ``path``."""
    queries = fixed_queries(data.test_labels, count)
    neighbours = nearest(train_emb, test_emb[queries], k)
    hits = sum(int(data.train_labels[n[0]]) == int(data.test_labels[q]) for q, n in zip(queries, neighbours))
    title = (f"{name}" + (f", update {step}" if step is not None else "") + f": top-1 {hits}/{len(queries)}\n"
             f"test query | top-{k} train neighbours (green: same class)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(data, queries, neighbours, title).save(path)
    return path
