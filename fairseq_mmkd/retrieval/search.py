"""Exact cosine-similarity top-k retrieval accuracy, with faiss or plain torch.

A query counts as correct at top-k when any of its k most similar memory-bank items has the query's
class. Both backends search exhaustively (no approximation), so they agree; the only freedom exact search
leaves is which of several equally similar items fill the last of the k places. That choice can change
the answer (a collapsed model embeds everything identically), so it is fixed here for both backends:
**items with the lower memory-bank index win ties**. Each backend fetches k+1 neighbours; queries whose
k-th and (k+1)-th scores are equal are re-decided by ``_tie_aware_hits``, which applies that rule over the
whole memory bank.
"""
from __future__ import annotations

import functools
import logging
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


def _tie_aware_hits(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor,
                    query_labels: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k hits with ties at the k-th score broken towards lower memory indices (bool ``[Q]``).

    Every item scoring above the k-th score is in the top k; the remaining places go to the items scoring
    exactly the k-th score, in memory-bank order.
    """
    hits = []
    step = _row_chunk(len(memory), memory.device)
    for start in range(0, len(queries), step):
        scores = queries[start:start + step] @ memory.T
        kth = scores.topk(k, dim=1).values[:, -1:]
        above = scores > kth
        at = scores == kth
        free = k - above.sum(1, keepdim=True)
        chosen = above | (at & (at.cumsum(1, dtype=torch.int32) <= free))
        same = memory_labels[None, :] == query_labels[start:start + step, None]
        hits.append((chosen & same).any(1))
    return torch.cat(hits)


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


def topk_accuracy(memory, memory_labels, queries, query_labels, ks: Sequence[int] = (1, 3),
                  backend: str = "auto") -> Dict[int, float]:
    """Top-k retrieval accuracy (percent) of ``queries`` against ``memory`` by cosine similarity.

    Args:
        memory: float ``[N, D]`` memory-bank embeddings (torch or numpy; need not be normalised).
        memory_labels: integer ``[N]`` classes of the memory bank.
        queries: float ``[Q, D]`` query embeddings.
        query_labels: integer ``[Q]`` classes of the queries.
        ks: the k values to report; k larger than ``N`` counts the whole memory bank.
        backend: ``"faiss"`` (``IndexFlatIP``; on a GPU when faiss and CUDA have one), ``"torch"`` (chunked
            matmul + topk on the tensors' device), or ``"auto"`` (faiss when importable, else torch).

    Returns:
        ``{k: accuracy}`` with Python floats in ``[0, 100]`` (never numpy scalars: fairseq pickles logged
        metrics into checkpoints, and a numpy scalar there breaks resuming with a safe load).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ImportError("backend='faiss' but faiss cannot be imported; install faiss-gpu or faiss-cpu, "
                          "or use backend='torch'")
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    memory, queries = _embeddings(memory, "memory"), _embeddings(queries, "queries")
    memory_labels, query_labels = _labels(memory_labels, "memory_labels"), _labels(query_labels, "query_labels")
    if len(memory) != len(memory_labels) or len(queries) != len(query_labels):
        raise ValueError(f"{len(memory)} memory items with {len(memory_labels)} labels, "
                         f"{len(queries)} queries with {len(query_labels)} labels")
    if len(memory) == 0 or len(queries) == 0:
        raise ValueError("memory bank and queries must both be non-empty")
    if memory.shape[1] != queries.shape[1]:
        raise ValueError(f"embedding sizes differ: memory {memory.shape[1]}, queries {queries.shape[1]}")
    for name, t in (("memory", memory), ("queries", queries)):
        bad = (~torch.isfinite(t)).any(1).sum().item()
        if bad:
            raise ValueError(f"{name}: {bad} of {len(t)} embeddings contain NaN or inf (did training diverge?)")

    device = memory.device
    queries, query_labels = queries.to(device), query_labels.to(device)
    memory_labels = memory_labels.to(device)
    memory, queries = F.normalize(memory, dim=1), F.normalize(queries, dim=1)

    num_memory = len(memory)
    fetch = min(max(ks) + 1, num_memory)
    search = _search_faiss if use_faiss else _search_torch
    scores, ids = search(memory, queries, fetch)
    scores, ids = scores.to(device), ids.to(device)

    result = {}
    for k in ks:
        k_eff = min(k, num_memory)
        hits = (memory_labels[ids[:, :k_eff]] == query_labels[:, None]).any(1)
        if k_eff < num_memory:
            tied = (scores[:, k_eff - 1] == scores[:, k_eff]).nonzero().flatten()
            if len(tied):
                hits[tied] = _tie_aware_hits(memory, memory_labels, queries[tied], query_labels[tied], k_eff)
        result[k] = float(hits.double().mean().item() * 100.0)
    return result
