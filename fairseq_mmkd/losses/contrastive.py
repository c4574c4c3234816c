"""The image-text contrastive objective (CLIP, Radford et al. 2021): symmetric InfoNCE over a batch of pairs, with
the negatives of every data-parallel worker.

Each worker holds ``B_r`` pairs. ``gather_rows`` concatenates every worker's embeddings in rank order (``all_gather``,
variable batch sizes allowed), keeping the gradient through this worker's own rows only. Every worker then
computes the loss of the whole global batch: its gradient is the gradient of that loss through its own
embeddings, so the sum over workers that data parallelism makes is exactly the gradient of the global-batch loss:
two workers of ``B`` pairs train as one of ``2B`` (tested). The learned scale enters every worker's whole loss, so its
gradient is taken from worker 0 alone (fairseq's sharding leaves worker 0 the longest shard: it never runs the
stand-in batch whose loss is zeroed). Only ``torch.distributed`` is used; nothing here
imports fairseq.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

CLIP_INIT_TEMPERATURE = 0.07  # CLIP: logit scale initialised at log(1 / 0.07)
CLIP_MAX_LOGIT_SCALE = 100.0  # CLIP: the learned scale is clipped at 100 (a temperature of at least 0.01)


def initial_logit_scale(temperature: float = CLIP_INIT_TEMPERATURE) -> float:
    return math.log(1.0 / temperature)


def world() -> tuple:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> tuple:
    """``(every worker's rows [sum B_r, D] in rank order, offset of this worker's rows)``; gradient flows through this
    worker's rows only (the others arrive as constants)."""
    rank, size = world()
    if size == 1:
        return x, 0
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    longest = max(counts)
    padded = x.detach().new_zeros((longest,) + x.shape[1:])
    padded[:x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:n] for p, n in zip(parts, counts)]
    parts[rank] = x
    return torch.cat(parts), sum(counts[:rank])


def clip_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp`` of the learned log-scale, clamped at CLIP's maximum of 100."""
    return logit_scale.clamp(max=math.log(CLIP_MAX_LOGIT_SCALE)).exp()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True) -> dict:
    """Symmetric InfoNCE of L2-normalised ``image`` / ``text`` embeddings ``[B_r, D]`` (row ``i`` of each is a pair),
    against the negatives of every worker (``gather``; else of this worker's rows only, as for a validation batch).

    Returns ``loss`` (the mean over the global batch of the image->text and text->image cross-entropies, averaged:
    CLIP's loss; differentiable), ``batch`` (the global number of pairs), ``accuracy`` (the fraction of the global
    batch whose own partner scores highest, both directions averaged; detached) and ``scale`` (``exp`` of the clamped
    logit scale; detached). Computed in fp32.
    """
    all_image, _ = gather_rows(image.float()) if gather else (image.float(), 0)
    all_text, _ = gather_rows(text.float()) if gather else (text.float(), 0)
    scale = clip_logit_scale(logit_scale.float())
    rank, workers = world() if gather else (0, 1)
    if workers > 1 and rank > 0:  # every worker computes the whole loss: the scale's gradient is counted on rank 0 only
        scale = scale.detach()
    if all_image.shape[0] == 0:
        zero = logit_scale.float() * 0
        return {"loss": zero, "batch": 0, "accuracy": zero.detach(), "scale": clip_logit_scale(logit_scale).detach()}
    logits = scale * all_image @ all_text.t()  # [G, G]: row i, image i against every caption
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    with torch.no_grad():
        hits = (logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()
    return {"loss": loss, "batch": logits.shape[0], "accuracy": hits / 2, "scale": scale.detach()}
