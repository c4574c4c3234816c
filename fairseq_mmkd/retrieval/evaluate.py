"""Zero-shot retrieval evaluation: embed labelled images with a frozen encoder, then top-k retrieval.

For each set the train split is the memory bank and the test split the queries (``<set>_top1``,
``<set>_top3``), then the other way round (``<set>_inv_top1``, ``<set>_inv_top3``). ``evaluate_retrieval``
is the one entry point: the fairseq task's validation and the standalone evaluator
(``python -m fairseq_mmkd.retrieval``) both call it, so their numbers are the same computation.

Under ``torch.distributed`` every rank embeds one contiguous shard of each split and the shards are
all-gathered, so every rank ends up with the full, ordered embeddings and computes the same metrics.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .search import topk_accuracy
from .sets import RetrievalSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("cls", "mean")
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")  # set names prefix metric names: no spaces or dots

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def metric_names(set_name: str, ks: Sequence[int] = (1, 3)) -> list:
    """The metrics ``evaluate_retrieval`` reports for one set, in order (``cifar10_top1``, ...)."""
    return [f"{set_name}_top{k}" for k in ks] + [f"{set_name}_inv_top{k}" for k in ks]


def preprocess(images: torch.Tensor, input_size: int, device) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, S, S]`` on ``device``, resized and ImageNet-normalised.

    The whole batch is converted and resized on the device; no per-image Python or PIL work. Resizing is
    bicubic. Upsampling (CIFAR's 32 -> 224) uses ``antialias=False``: antialiasing only matters when
    shrinking, and without it torch uses its standard bicubic kernel (a = -0.75, like torchvision's tensor
    ``Resize``), which differs from PIL's bicubic (a = -0.5) by a small interpolation detail. Shrinking
    (larger custom images) uses ``antialias=True`` to avoid aliasing. The result is clamped to the valid
    pixel range, as a uint8 resize would be, before normalisation.
    """
    x = images.to(device, non_blocking=True).float().div_(255.0)
    height, width = x.shape[-2:]
    if (height, width) != (input_size, input_size):
        shrink = height > input_size or width > input_size
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False,
                          antialias=shrink).clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def pool_features(features: torch.Tensor, num_extra_tokens: int, pooling: str) -> torch.Tensor:
    """``[B, T, D]`` token features -> ``[B, D]``: the first extra (CLS) token, or the mean of patch tokens."""
    if features.ndim != 3 or features.shape[1] <= num_extra_tokens:
        raise ValueError(f"feature_fn must return [B, T, D] with T > num_extra_tokens={num_extra_tokens}, "
                         f"got {list(features.shape)}")
    if pooling == "cls":
        return features[:, 0]
    if pooling == "mean":
        return features[:, num_extra_tokens:].mean(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _check_pooling(pooling: str, num_extra_tokens: int) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "cls" and num_extra_tokens < 1:
        raise ValueError("pooling='cls' needs an extra (CLS) token, but the model has num_extra_tokens=0; "
                         "use pooling='mean'")


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's equally sized ``local`` rows in rank order and drop the padding."""
    # gloo collectives take CPU tensors; NCCL takes the rank's GPU tensors.
    comm_device = local.device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = local.to(comm_device).contiguous()
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return torch.cat(parts)[:total].to(local.device)


def embed(feature_fn: FeatureFn, images: torch.Tensor, input_size: int, num_extra_tokens: int,
          pooling: str = "cls", batch_size: int = 256, device="cpu", dtype: Optional[torch.dtype] = None,
          progress: bool = True, desc: str = "embed") -> torch.Tensor:
    """Embed uint8 images with a frozen encoder, in batches, under ``torch.inference_mode``.

    Under an initialised ``torch.distributed`` group, rank r embeds images ``[r*n, (r+1)*n)`` with
    ``n = ceil(N / world_size)``; a short last shard is padded with copies of the last image, so every rank
    runs the same number of batches (a model wrapper that communicates in ``forward`` stays in step) and
    the all-gather sees equal sizes. The padding is dropped after gathering.

    Args:
        feature_fn: normalised float ``[B, 3, S, S]`` -> token features ``[B, T, D]`` (extra tokens first).
        images: uint8 ``[N, 3, H, W]`` (CPU; each batch is moved to ``device``).
        input_size: the encoder's input size ``S``; images are resized to it (see ``preprocess``).
        num_extra_tokens: how many extra (CLS) tokens lead the sequence.
        pooling: ``"cls"`` (first extra token) or ``"mean"`` (mean of the patch tokens, extra tokens excluded).
        batch_size: images per forward pass.
        device: where preprocessing and the forward pass run.
        dtype: compute dtype (e.g. ``torch.bfloat16``): the input is cast to it and the forward runs under
            autocast for it on the device (bf16 autocast on CUDA; on CPU it also serves a model whose weights
            are already bf16). ``None`` runs in float32.
        progress: show a tqdm bar (rank 0 only).
        desc: the progress bar's label.

    Returns:
        float32 ``[N, D]`` embeddings on ``device``, in the order of ``images``, on every rank.
    """
    _check_pooling(pooling, num_extra_tokens)
    device = torch.device(device)
    rank, world = _world()
    total = len(images)
    if total == 0:
        raise ValueError("no images to embed")
    per_rank = math.ceil(total / world)
    start, stop = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
    shard = images[start:stop]
    if stop - start < per_rank:
        pad = images[-1:].expand(per_rank - (stop - start), *images.shape[1:])
        shard = torch.cat([shard, pad])

    low_precision = dtype in (torch.bfloat16, torch.float16)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if low_precision
                else contextlib.nullcontext())
    out = []
    with torch.inference_mode(), autocast:
        for lo in tqdm(range(0, len(shard), batch_size), desc=desc, unit="batch",
                       disable=not progress or rank != 0, leave=False):
            x = preprocess(shard[lo:lo + batch_size], input_size, device)
            if dtype is not None:
                x = x.to(dtype)
            # Pool in float32: a bf16 mean over hundreds of tokens loses precision.
            out.append(pool_features(feature_fn(x).float(), num_extra_tokens, pooling))
    local = torch.cat(out)
    return _all_gather_rows(local, total) if world > 1 else local


def evaluate_retrieval(feature_fn: FeatureFn, sets: Mapping[str, RetrievalSet], input_size: int,
                       num_extra_tokens: int, pooling: str = "cls", batch_size: int = 256, device=None,
                       dtype: Optional[torch.dtype] = None, ks: Sequence[int] = (1, 3), backend: str = "auto",
                       progress: bool = True, on_embedded: Optional[Callable] = None) -> Dict[str, float]:
    """Retrieval accuracy of an encoder on labelled image sets, in both directions.

    The caller puts the model in eval mode; this function only runs ``feature_fn`` without gradients.

    Args:
        feature_fn: normalised float ``[B, 3, S, S]`` -> token features ``[B, T, D]`` (extra tokens first).
        sets: set name (the metric prefix, e.g. ``"cifar10"``) -> its ``RetrievalSet``.
        input_size: the encoder's input size ``S``.
        num_extra_tokens: how many extra (CLS) tokens lead the feature sequence.
        pooling: ``"cls"`` or ``"mean"``; see ``embed``.
        batch_size: images per forward pass.
        device: where to embed; default CUDA when available, else CPU.
        dtype: compute dtype (``torch.bfloat16`` for bf16 autocast), ``None`` for float32.
        ks: the k of each top-k metric.
        backend: nearest-neighbour search backend (``"auto"``, ``"faiss"``, ``"torch"``); see ``topk_accuracy``.
        progress: show tqdm bars (rank 0 only).
        on_embedded: optional ``fn(name, data, train_embeddings, test_embeddings)`` called per set, so callers
            can reuse the embeddings (e.g. to draw retrieval examples) instead of computing them again.

    Returns:
        ``{f"{name}_top{k}": percent, f"{name}_inv_top{k}": percent}`` for every set and k, Python floats,
        identical on every rank; ordered as ``metric_names``.
    """
    _check_pooling(pooling, num_extra_tokens)
    for name in sets:
        if not SET_NAME.fullmatch(name):
            raise ValueError(f"set name {name!r} is used as a metric prefix: use letters, digits, '_' or '-'")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(input_size=input_size, num_extra_tokens=num_extra_tokens, pooling=pooling,
                  batch_size=batch_size, device=device, dtype=dtype, progress=progress)
    metrics: Dict[str, float] = {}
    for name, data in sets.items():
        train = embed(feature_fn, data.train_images, desc=f"{name} train", **kwargs)
        test = embed(feature_fn, data.test_images, desc=f"{name} test", **kwargs)
        if on_embedded is not None:
            on_embedded(name, data, train, test)
        forward = topk_accuracy(train, data.train_labels, test, data.test_labels, ks, backend=backend)
        inverse = topk_accuracy(test, data.test_labels, train, data.train_labels, ks, backend=backend)
        metrics.update({f"{name}_top{k}": forward[k] for k in ks})
        metrics.update({f"{name}_inv_top{k}": inverse[k] for k in ks})
    return metrics
