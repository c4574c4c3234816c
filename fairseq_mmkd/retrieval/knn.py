"""k-nearest-neighbour classification accuracy from one exact neighbour search.

The memory bank's labelled embeddings vote for each query's class; the query is right when the winning class
is its own. Two votes are computed from the same ``search.Neighbours`` answer (the one retrieval top-k uses):

- **weighted**, as DINO's ``eval_knn.py`` (and DINOv2, solo-learn, lightly, MIM-Refiner): each of the k
  neighbours adds ``exp(cosine / T)`` to its class (T = 0.07 in all of them);
- **uniform**: each neighbour adds one vote, the majority wins; what the only published CIFAR figures of the
  data2vec2 teacher used (kNN-20).

Ties between classes go to the class of the nearest neighbour among the tied classes (for the uniform vote the
published rule; for the weighted vote a tie needs exactly equal sums, and this makes it deterministic). The
neighbour lists themselves follow ``search.nearest_neighbours``: ties in similarity go to the lower memory
index. Nothing here depends on the modality: it sees embeddings' similarities and integer labels only.
"""
from __future__ import annotations

from typing import Dict

import torch

from .search import Neighbours

VOTES = ("weighted", "uniform")


def knn_predict(neighbours: Neighbours, memory_labels: torch.Tensor, k: int, temperature: float = 0.07,
                vote: str = "weighted", num_classes: int = 0) -> torch.Tensor:
    """Predicted class ``[Q]`` of each query from its ``k`` nearest neighbours.

    Args:
        neighbours: ``search.nearest_neighbours`` output with at least ``k`` columns (fewer when the memory
            bank is smaller than ``k``: then every memory item votes).
        memory_labels: int64 ``[N]`` classes of the memory bank.
        k: neighbours that vote.
        temperature: T of the weighted vote, ``exp(cosine / T)``.
        vote: ``"weighted"`` or ``"uniform"``.
        num_classes: number of classes (default: the largest memory label + 1).
    """
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    memory_labels = memory_labels.to(neighbours.ids.device)
    labels = memory_labels[neighbours.ids[:, :k]]  # [Q, k], nearest first
    num_classes = max(int(num_classes), int(memory_labels.max()) + 1)
    if vote == "weighted":
        # float64: exp(1 / 0.07) is 1.6e6, and sums of such weights must not lose the small ones.
        weights = (neighbours.scores[:, :k].double() / temperature).exp()
    else:
        weights = torch.ones(labels.shape, dtype=torch.float64, device=labels.device)
    votes = torch.zeros(len(labels), num_classes, dtype=torch.float64, device=labels.device)
    votes.scatter_add_(1, labels, weights)
    winners = votes == votes.max(1, keepdim=True).values  # [Q, C]: every class with the top vote
    first = winners.gather(1, labels).to(torch.uint8).argmax(1, keepdim=True)  # nearest neighbour of a winner
    return labels.gather(1, first).squeeze(1)


def knn_accuracy(neighbours: Neighbours, memory_labels: torch.Tensor, query_labels: torch.Tensor, k: int,
                 temperature: float = 0.07) -> Dict[str, float]:
    """k-NN accuracy (percent) of both votes: ``{"weighted": ..., "uniform": ...}``, Python floats."""
    query_labels = query_labels.to(neighbours.ids.device)
    num_classes = int(max(memory_labels.max(), query_labels.max())) + 1
    return {vote: float((knn_predict(neighbours, memory_labels, k, temperature, vote, num_classes)
                         == query_labels).double().mean().item() * 100.0)
            for vote in VOTES}
