"""Exact cosine-similarity top-k retrieval accuracy, with faiss or plain torch.

A query counts as correct at top-k when any of its k most similar memory-bank items has the query's
class. Both backends search exhaustively (no approximation), so they agree; the only freedom exact search
leaves is which of several equally similar items fill the last of the k places, and in which order equal
items are listed. That choice can change the answer (a collapsed model embeds everything identically), so
it is fixed here for both backends: **items with the lower memory-bank index win ties**. Each backend
fetches k+1 neighbours; queries whose k-th and (k+1)-th scores are equal are re-decided by
``_tie_aware_topk``, which applies that rule over the whole memory bank. ``nearest_neighbours`` returns
the ordered neighbour lists, which retrieval top-k (``topk_hits``) and the k-NN votes (``knn.py``) share.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "faiss", "torch")


@functools.lru_cache(maxsize=1)
def _faiss():
    """The faiss module, or None when it cannot be imported (then ``auto`` uses torch)."""
    # faiss's loader logs each instruction set it tries (AVX512, AVX2, ...) at INFO/DEBUG: noise in a
    # training log, where fairseq has set the root logger to INFO.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except Exception:  # ImportError, or a broken binary build (missing shared libraries)
        return None
    return faiss


def faiss_available() -> bool:
    return _faiss() is not None


@functools.lru_cache(maxsize=None)
def _faiss_gpu_resources(gpu: int):
    # Creating StandardGpuResources reserves scratch memory on the GPU: do it once per device, not per call.
    return _faiss().StandardGpuResources()


def _faiss_gpu_id(device: torch.device) -> Optional[int]:
    """The GPU faiss should search on, or None for a CPU search."""
    faiss = _faiss()
    if not torch.cuda.is_available() or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() < 1:
        return None
    return device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()


def _search_faiss(memory: torch.Tensor, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search (``IndexFlatIP``), on a GPU when faiss and CUDA both have one."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(memory.shape[1])
    gpu = _faiss_gpu_id(memory.device)
    if gpu is not None:
        index = faiss.index_cpu_to_gpu(_faiss_gpu_resources(gpu), gpu, index)
    index.add(np.ascontiguousarray(memory.detach().cpu().numpy(), dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k)
    return torch.from_numpy(scores), torch.from_numpy(ids).long()


def _row_chunk(num_memory: int, device: torch.device) -> int:
    """Query rows per matmul chunk, so one chunk of scores stays around 64 MB (CPU) or 512 MB (GPU)."""
    budget = 2 ** 27 if device.type == "cuda" else 2 ** 24
    return max(1, budget // max(1, num_memory))


def _search_torch(memory: torch.Tensor, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search: chunked ``queries @ memory.T`` and ``topk``, on the tensors' device."""
    scores, ids = [], []
    step = _row_chunk(len(memory), memory.device)
    for start in range(0, len(queries), step):
        s, i = (queries[start:start + step] @ memory.T).topk(k, dim=1)
        scores.append(s)
        ids.append(i)
    return torch.cat(scores), torch.cat(ids)


def _sort_neighbours(scores: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Order each row by score, highest first, and equal scores by memory index, lowest first."""
    by_id = ids.argsort(dim=1)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = scores.sort(dim=1, descending=True, stable=True).indices  # stable: keeps the index order
    return scores.gather(1, by_score), ids.gather(1, by_score)


def _tie_aware_topk(memory: torch.Tensor, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the whole memory bank with ties at the k-th score broken towards lower memory indices.

    Every item scoring above the k-th score is in the top k; the remaining places go to the items scoring
    exactly the k-th score, in memory-bank order. Returns unsorted ``[Q, k]`` scores and ids.
    """
    all_scores, all_ids = [], []
    step = _row_chunk(len(memory), memory.device)
    for start in range(0, len(queries), step):
        scores = queries[start:start + step] @ memory.T
        kth = scores.topk(k, dim=1).values[:, -1:]
        above = scores > kth
        at = scores == kth
        free = k - above.sum(1, keepdim=True)
        chosen = above | (at & (at.cumsum(1, dtype=torch.int32) <= free))
        ids = chosen.nonzero()[:, 1].view(len(scores), k)  # exactly k per row, in memory-bank order
        all_scores.append(scores.gather(1, ids))
        all_ids.append(ids)
    return torch.cat(all_scores), torch.cat(all_ids)


def _embeddings(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be a float [N, D] array, got {t.dtype} {list(t.shape)}")
    return t.float()


def _labels(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer [N] array, got {t.dtype} {list(t.shape)}")
    return t.long()


@dataclass
class Neighbours:
    """The k nearest memory items of each query, nearest first (ties: lower memory index first).

    Attributes:
        scores: float32 ``[Q, k]`` cosine similarities.
        ids: int64 ``[Q, k]`` memory-bank indices.
    """

    scores: torch.Tensor
    ids: torch.Tensor


def resolve_backend(backend: str) -> str:
    """``"faiss"`` or ``"torch"``: what ``backend`` (``"auto"`` included) searches with here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ImportError("backend='faiss' but faiss cannot be imported; install faiss-gpu or faiss-cpu, "
                          "or use backend='torch'")
    return "faiss" if backend == "faiss" or (backend == "auto" and faiss_available()) else "torch"


def _check_inputs(memory, memory_labels, queries, query_labels):
    memory, queries = _embeddings(memory, "memory"), _embeddings(queries, "queries")
    memory_labels, query_labels = _labels(memory_labels, "memory_labels"), _labels(query_labels, "query_labels")
    if len(memory) != len(memory_labels) or len(queries) != len(query_labels):
        raise ValueError(f"{len(memory)} memory items with {len(memory_labels)} labels, "
                         f"{len(queries)} queries with {len(query_labels)} labels")
    device = memory.device
    return memory, memory_labels.to(device), queries.to(device), query_labels.to(device)


def nearest_neighbours(memory, queries, k: int, backend: str = "auto") -> Neighbours:
    """Exact cosine-similarity k nearest neighbours, in the fixed order of this module.

    Rows are ordered by similarity, highest first; equal similarities by memory index, lowest first, and
    the same rule decides which of several equally similar items fill the last places. So the first j
    columns of a k-neighbour answer are the j-neighbour answer, for every j <= k: one search serves top-1,
    top-3 and a k-NN vote alike.

    Args:
        memory: float ``[N, D]`` memory-bank embeddings (torch or numpy; need not be normalised).
        queries: float ``[Q, D]`` query embeddings.
        k: neighbours per query; more than ``N`` returns all ``N``.
        backend: ``"faiss"`` (``IndexFlatIP``; on a GPU when faiss and CUDA have one), ``"torch"`` (chunked
            matmul + topk on the tensors' device), or ``"auto"`` (faiss when importable, else torch).
    """
    use_faiss = resolve_backend(backend) == "faiss"
    memory, queries = _embeddings(memory, "memory"), _embeddings(queries, "queries")
    if int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if len(memory) == 0 or len(queries) == 0:
        raise ValueError("memory bank and queries must both be non-empty")
    if memory.shape[1] != queries.shape[1]:
        raise ValueError(f"embedding sizes differ: memory {memory.shape[1]}, queries {queries.shape[1]}")
    for name, t in (("memory", memory), ("queries", queries)):
        bad = (~torch.isfinite(t)).any(1).sum().item()
        if bad:
            raise ValueError(f"{name}: {bad} of {len(t)} embeddings contain NaN or inf (did training diverge?)")

    device = memory.device
    memory, queries = F.normalize(memory, dim=1), F.normalize(queries.to(device), dim=1)
    num_memory = len(memory)
    k = min(int(k), num_memory)
    fetch = min(k + 1, num_memory)  # one more: a tie across the k-th place shows as equal k-th and (k+1)-th
    search = _search_faiss if use_faiss else _search_torch
    scores, ids = search(memory, queries, fetch)
    scores, ids = _sort_neighbours(scores.to(device), ids.to(device))
    if k < num_memory:
        tied = (scores[:, k - 1] == scores[:, k]).nonzero().flatten()
        if len(tied):  # the tied items outside the fetched ones may have lower indices: decide over the bank
            scores, ids = scores[:, :k].clone(), ids[:, :k].clone()
            scores[tied], ids[tied] = _sort_neighbours(*_tie_aware_topk(memory, queries[tied], k))
    return Neighbours(scores[:, :k].contiguous(), ids[:, :k].contiguous())


def topk_hits(neighbours: Neighbours, memory_labels: torch.Tensor, query_labels: torch.Tensor,
              ks: Sequence[int]) -> Dict[int, float]:
    """Top-k accuracy (percent) for each k from one ``nearest_neighbours`` answer with at least max(ks)
    columns (or the whole memory bank)."""
    result = {}
    for k in ks:
        labels = memory_labels[neighbours.ids[:, :k]]
        result[int(k)] = float((labels == query_labels[:, None]).any(1).double().mean().item() * 100.0)
    return result


def topk_accuracy(memory, memory_labels, queries, query_labels, ks: Sequence[int] = (1, 3),
                  backend: str = "auto") -> Dict[int, float]:
    """Top-k retrieval accuracy (percent) of ``queries`` against ``memory`` by cosine similarity.

    Args:
        memory: float ``[N, D]`` memory-bank embeddings (torch or numpy; need not be normalised).
        memory_labels: integer ``[N]`` classes of the memory bank.
        queries: float ``[Q, D]`` query embeddings.
        query_labels: integer ``[Q]`` classes of the queries.
        ks: the k values to report; k larger than ``N`` counts the whole memory bank.
        backend: see ``nearest_neighbours``.

    Returns:
        ``{k: accuracy}`` with Python floats in ``[0, 100]`` (never numpy scalars: fairseq pickles logged
        metrics into checkpoints, and a numpy scalar there breaks resuming with a safe load).
    """
    resolve_backend(backend)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    memory, memory_labels, queries, query_labels = _check_inputs(memory, memory_labels, queries, query_labels)
    neighbours = nearest_neighbours(memory, queries, max(ks), backend=backend)
    return topk_hits(neighbours, memory_labels, query_labels, ks)
