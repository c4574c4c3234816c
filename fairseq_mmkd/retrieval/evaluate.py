"""Zero-shot evaluation of a frozen encoder on labelled sets: top-k retrieval and k-NN classification.

For each set the train split is the memory bank and the test split the queries (``<set>_top1``,
``<set>_top3``, and the k-NN accuracies ``<set>_knn20`` (DINO's weighted vote) and ``<set>_knn20_uniform``
(majority vote)), then retrieval the other way round (``<set>_inv_top1``, ``<set>_inv_top3``). One exact
search per direction serves every metric of that direction (``search.nearest_neighbours``).
``evaluate_retrieval`` is the one entry point: the fairseq task's validation and the standalone evaluator
(``python -m fairseq_mmkd.retrieval``) both call it, so their numbers are the same computation, and
``evaluation_protocol`` records how it ran (pooling, layer, standardisation, k, T, votes, preprocessing,
splits and sizes, precision) so that every number can be compared with the right published one.

The embeddings can be standardised per dimension with the memory bank's mean and standard deviation
(``standardize``, as MIM-Refiner does) before L2 normalisation. Everything after embedding sees only
embeddings and labels; what differs between modalities is how a set's items reach the encoder and its
``protocol``:

* image sets (``RetrievalSet``, uint8 images): ``embed`` resizes and normalises each batch on the device and
  calls ``feature_fn(images) -> [B, T, D]``;
* text and audio sets (``sequences.SequenceRetrievalSet``): ``embed_sequences`` batches items of similar length
  (sorted, longest first), right-padded, and calls ``feature_fn(source, padding_mask) -> (features [B, T, D],
  padding_mask [B, T] or None)``: the mask at sequence resolution (tokens, audio frames) that mean pooling needs.

Under ``torch.distributed`` every rank embeds one shard of each split (images: a contiguous slice; sequences:
every world-size-th item of the length order, so ranks get batches of similar lengths) and the shards are
all-gathered, so every rank ends up with the full embeddings in the set's order and computes the same metrics.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .knn import knn_accuracy
from .search import nearest_neighbours, resolve_backend, topk_hits
from .sets.base import RetrievalSet
from .sets.image_preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess  # noqa: F401  (re-exported)
from .sets.sequences import SequenceRetrievalSet

POOLINGS = ("cls", "mean", "cls+mean")
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")  # set names prefix metric names: no spaces or dots

FeatureFn = Callable[..., object]  # images -> features; or (source, padding_mask) -> (features, padding_mask)


def knn_metric_names(set_name: str, knn_k: int = 20) -> list:
    """``<set>_knn<k>`` (weighted vote) and ``<set>_knn<k>_uniform``; none when ``knn_k`` is 0."""
    return [f"{set_name}_knn{knn_k}", f"{set_name}_knn{knn_k}_uniform"] if knn_k else []


def metric_names(set_name: str, ks: Sequence[int] = (1, 3), knn_k: int = 20) -> list:
    """The metrics ``evaluate_retrieval`` reports for one set, in order (``cifar10_top1``, ...)."""
    return ([f"{set_name}_top{k}" for k in ks] + knn_metric_names(set_name, knn_k)
            + [f"{set_name}_inv_top{k}" for k in ks])


def pool_features(features: torch.Tensor, num_extra_tokens: int, pooling: str,
                  padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, T, D]`` token features -> one vector per item.

    Args:
        features: token features, extra (CLS) tokens first.
        num_extra_tokens: how many extra tokens lead the sequence.
        pooling: ``"cls"`` (the first extra token, ``[B, D]``), ``"mean"`` (the mean of the other tokens, extra
            tokens excluded, ``[B, D]``) or ``"cls+mean"`` (both concatenated, ``[B, 2D]``, as DINO's ViT-B
            linear probe).
        padding_mask: optional bool ``[B, T]``, True at padded positions, which the mean leaves out (for
            variable-length inputs; images have none).
    """
    if features.ndim != 3 or features.shape[1] <= num_extra_tokens:
        raise ValueError(f"feature_fn must return [B, T, D] with T > num_extra_tokens={num_extra_tokens}, "
                         f"got {list(features.shape)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    cls = features[:, 0]
    if pooling == "cls":
        return cls
    tokens = features[:, num_extra_tokens:]
    if padding_mask is None:
        mean = tokens.mean(1)
    else:
        keep = (~padding_mask[:, num_extra_tokens:].bool()).to(tokens.dtype).unsqueeze(-1)
        mean = (tokens * keep).sum(1) / keep.sum(1).clamp_min(1)
    return mean if pooling == "mean" else torch.cat([cls, mean], dim=1)


def standardize_embeddings(memory: torch.Tensor, queries: torch.Tensor) -> tuple:
    """Subtract the memory bank's per-dimension mean from memory and queries and divide by its standard
    deviation (population std; a constant dimension keeps scale 1, as scikit-learn's ``StandardScaler``)."""
    mean = memory.double().mean(0)
    std = memory.double().std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (((memory.double() - mean) / std).to(memory.dtype),
            ((queries.double() - mean) / std).to(queries.dtype))


def _check_pooling(pooling: str, num_extra_tokens: int, sets: Optional[Mapping] = None) -> None:
    """``cls`` reads the first position: an extra (CLS) token, or for text the ``<s>`` every sequence starts with
    (a set's ``leading_token``); anything else has nothing there to read."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    leading = sets is not None and len(sets) > 0 and all(
        getattr(data, "leading_token", None) for data in sets.values())
    if pooling in ("cls", "cls+mean") and num_extra_tokens < 1 and not leading:
        raise ValueError(f"pooling={pooling!r} needs an extra (CLS) token, but the model has num_extra_tokens=0; "
                         "use pooling='mean'")


def pooling_description(pooling: str, num_extra_tokens: int, sets: Mapping) -> str:
    """What ``pooling`` reads, in words, for the protocol record."""
    firsts = {getattr(data, "leading_token", None) for data in sets.values()}
    first = ("the first extra (CLS) token" if num_extra_tokens > 0 else
             f"the first token ({', '.join(sorted(f for f in firsts if f))}, what RoBERTa-style heads read)")
    rest = (f"the mean over positions after the {num_extra_tokens} extra token(s)" if num_extra_tokens > 0 else
            "the mean over all positions")
    if any(isinstance(data, SequenceRetrievalSet) for data in sets.values()):
        rest += ", padded positions left out"
    return {"cls": first, "mean": rest, "cls+mean": f"{first} concatenated with {rest}"}[pooling]


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
        pooling: ``"cls"``, ``"mean"`` or ``"cls+mean"``; see ``pool_features``.
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


def _features_and_mask(output, batch: int) -> tuple:
    """A sequence feature function's ``(features [B, T, D], padding_mask [B, T] or None)``, checked."""
    if not isinstance(output, (tuple, list)) or len(output) != 2:
        raise ValueError("for text and audio sets, feature_fn(source, padding_mask) must return (features [B, T, D], "
                         f"padding_mask [B, T] or None), got {type(output).__name__}")
    features, mask = output
    if mask is not None and (mask.shape != features.shape[:2] or features.shape[0] != batch):
        raise ValueError(f"feature_fn returned features {list(features.shape)} with a padding mask "
                         f"{list(mask.shape)}; the mask must be [B, T] at the features' resolution")
    return features, mask


def embed_sequences(feature_fn: FeatureFn, data: SequenceRetrievalSet, split: str, num_extra_tokens: int,
                    pooling: str = "mean", batch_size: int = 256, device="cpu", dtype: Optional[torch.dtype] = None,
                    progress: bool = True, desc: str = "embed") -> torch.Tensor:
    """Embed one split of a text or audio set with a frozen encoder, in batches of similar length.

    Items are taken in ``data.order(split)`` (longest first) and right-padded per batch; the padding mask goes to
    ``feature_fn`` and the one it returns (at sequence resolution) keeps padded positions out of mean pooling.
    Under an initialised ``torch.distributed`` group rank r embeds the items at positions r, r + W, r + 2W, ... of
    that order (W: world size), padded with the shortest item to ``ceil(N / W)`` so every rank runs the same
    number of batches; the gathered rows are put back into the set's order on every rank.

    Args:
        feature_fn: ``(source [B, L], padding_mask [B, L]) -> (features [B, T, D], padding_mask [B, T] or None)``;
            ``padding_mask`` is None for a batch without padding.
        data: the set.
        split: ``"train"`` or ``"test"``.
        num_extra_tokens, pooling, batch_size, device, dtype, progress, desc: as for ``embed`` (``batch_size``
            counts items).

    Returns:
        float32 ``[N, D]`` embeddings on ``device``, in the order of the split's items, on every rank.
    """
    _check_pooling(pooling, num_extra_tokens, {"": data})
    device = torch.device(device)
    rank, world = _world()
    order = data.order(split)
    total = len(order)
    per_rank = math.ceil(total / world)
    positions = rank + world * torch.arange(per_rank)
    mine = order[positions.clamp(max=total - 1)]  # past the end: the shortest item again (dropped after gathering)

    low_precision = dtype in (torch.bfloat16, torch.float16)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if low_precision
                else contextlib.nullcontext())
    out = []
    with torch.inference_mode(), autocast:
        for lo in tqdm(range(0, per_rank, batch_size), desc=desc, unit="batch",
                       disable=not progress or rank != 0, leave=False):
            index = mine[lo:lo + batch_size]
            source, padding_mask = data.batch(split, index)
            padded = bool(padding_mask.any())  # on the CPU: no device sync
            source = source.to(device, non_blocking=True)
            if dtype is not None and source.is_floating_point():
                source = source.to(dtype)
            mask = padding_mask.to(device, non_blocking=True) if padded else None
            features, seq_mask = _features_and_mask(feature_fn(source, mask), len(index))
            out.append(pool_features(features.float(), num_extra_tokens, pooling, seq_mask))
    local = torch.cat(out)
    if world > 1:
        gathered = _all_gather_rows(local, per_rank * world)
        where = (torch.arange(world)[:, None] + world * torch.arange(per_rank)[None, :]).flatten()
        valid = where < total
        local = gathered[valid.to(gathered.device)]
        rows = order[where[valid]]
    else:
        rows = order
    result = torch.empty_like(local)
    result[rows.to(local.device)] = local
    return result


def embed_split(feature_fn: FeatureFn, data, split: str, input_size: Optional[int], **kwargs) -> torch.Tensor:
    """Embeddings of one split of any set: ``embed`` for images, ``embed_sequences`` for text and audio."""
    if isinstance(data, SequenceRetrievalSet):
        return embed_sequences(feature_fn, data, split, **kwargs)
    if input_size is None:
        raise ValueError("image sets need the encoder's input_size")
    return embed(feature_fn, getattr(data, f"{split}_images"), input_size, **kwargs)


def _check_settings(sets: Mapping[str, RetrievalSet], pooling: str, num_extra_tokens: int, ks: Sequence[int],
                    knn_k: int, knn_temperature: float) -> None:
    _check_pooling(pooling, num_extra_tokens, sets)
    for name in sets:
        if not SET_NAME.fullmatch(name):
            raise ValueError(f"set name {name!r} is used as a metric prefix: use letters, digits, '_' or '-'")
    if not ks or min(int(k) for k in ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    if int(knn_k) < 0:
        raise ValueError(f"knn_k must be >= 0 (0: no k-NN metrics), got {knn_k}")
    if knn_k and not knn_temperature > 0:
        raise ValueError(f"knn_temperature must be positive, got {knn_temperature}")


def evaluate_retrieval(feature_fn: FeatureFn, sets: Mapping[str, RetrievalSet], input_size: Optional[int] = None,
                       num_extra_tokens: int = 0, pooling: str = "cls", batch_size: int = 256, device=None,
                       dtype: Optional[torch.dtype] = None, ks: Sequence[int] = (1, 3), backend: str = "auto",
                       progress: bool = True, on_embedded: Optional[Callable] = None, knn_k: int = 20,
                       knn_temperature: float = 0.07, standardize: bool = False) -> Dict[str, float]:
    """Retrieval and k-NN accuracy of an encoder on labelled sets (retrieval in both directions).

    The caller puts the model in eval mode and picks the layer (``feature_fn``); this function only runs
    ``feature_fn`` without gradients. ``evaluation_protocol`` with the same arguments describes the run.

    Args:
        feature_fn: for image sets, normalised float ``[B, 3, S, S]`` -> token features ``[B, T, D]`` (extra
            tokens first); for text and audio sets, ``(source, padding_mask) -> (features [B, T, D], padding_mask
            [B, T] or None)`` (see ``embed_sequences``).
        sets: set name (the metric prefix, e.g. ``"cifar10"``) -> its ``RetrievalSet`` (images) or
            ``SequenceRetrievalSet`` (text, audio).
        input_size: the encoder's input size ``S`` (image sets only; None for text and audio).
        num_extra_tokens: how many extra (CLS) tokens lead the feature sequence.
        pooling: ``"cls"``, ``"mean"`` or ``"cls+mean"``; see ``pool_features``. For text, ``cls`` reads the
            ``<s>`` position when the encoder has no extra tokens.
        batch_size: images (or sequences) per forward pass.
        device: where to embed; default CUDA when available, else CPU.
        dtype: compute dtype (``torch.bfloat16`` for bf16 autocast), ``None`` for float32.
        ks: the k of each top-k retrieval metric.
        backend: nearest-neighbour search backend (``"auto"``, ``"faiss"``, ``"torch"``); see
            ``search.nearest_neighbours``.
        progress: show tqdm bars (rank 0 only).
        on_embedded: optional ``fn(name, data, train_embeddings, test_embeddings)`` called per set with the
            embeddings the train -> test search uses (standardised when ``standardize``), so callers can
            reuse them (e.g. to draw retrieval examples) instead of computing them again.
        knn_k: neighbours voting in the k-NN metrics (train split as memory, test split as queries); 0: none.
        knn_temperature: T of the weighted vote, ``exp(cosine / T)``.
        standardize: standardise each direction's memory bank and queries with the memory bank's
            per-dimension mean and std before L2 normalisation.

    Returns:
        ``{f"{name}_top{k}", f"{name}_knn{knn_k}", f"{name}_knn{knn_k}_uniform", f"{name}_inv_top{k}": percent}``
        for every set and k, Python floats, identical on every rank; ordered as ``metric_names``.
    """
    _check_settings(sets, pooling, num_extra_tokens, ks, knn_k, knn_temperature)
    ks = [int(k) for k in ks]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(input_size=input_size, num_extra_tokens=num_extra_tokens, pooling=pooling,
                  batch_size=batch_size, device=device, dtype=dtype, progress=progress)
    prepare = standardize_embeddings if standardize else (lambda memory, queries: (memory, queries))
    metrics: Dict[str, float] = {}
    for name, data in sets.items():
        train = embed_split(feature_fn, data, "train", desc=f"{name} train", **kwargs)
        test = embed_split(feature_fn, data, "test", desc=f"{name} test", **kwargs)
        memory, queries = prepare(train, test)
        if on_embedded is not None:
            on_embedded(name, data, memory, queries)
        train_labels, test_labels = data.train_labels.to(memory.device), data.test_labels.to(memory.device)
        # One search serves top-k and the k-NN votes: neighbours are ordered, so the first k are the top k.
        forward = nearest_neighbours(memory, queries, max(max(ks), knn_k), backend=backend)
        metrics.update({f"{name}_top{k}": v for k, v in topk_hits(forward, train_labels, test_labels, ks).items()})
        if knn_k:
            knn = knn_accuracy(forward, train_labels, test_labels, knn_k, knn_temperature)
            weighted, uniform = knn_metric_names(name, knn_k)
            metrics.update({weighted: knn["weighted"], uniform: knn["uniform"]})
        memory, queries = prepare(test, train)
        inverse = nearest_neighbours(memory, queries, max(ks), backend=backend)
        metrics.update({f"{name}_inv_top{k}": v for k, v in topk_hits(inverse, test_labels, train_labels, ks).items()})
    return metrics


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``None`` -> ``"float32"``, ``torch.bfloat16`` -> ``"bfloat16"``."""
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def evaluation_protocol(sets: Mapping[str, RetrievalSet], input_size: Optional[int] = None,
                        num_extra_tokens: int = 0, pooling: str = "cls", device=None,
                        dtype: Optional[torch.dtype] = None,
                        ks: Sequence[int] = (1, 3), backend: str = "auto", knn_k: int = 20,
                        knn_temperature: float = 0.07, standardize: bool = False, layer: int = -1,
                        weights: str = "", batch_size: Optional[int] = None, progress=None, on_embedded=None,
                        **described) -> dict:
    """How ``evaluate_retrieval`` with the same arguments computes its numbers, as a JSON-ready dict.

    Takes ``evaluate_retrieval``'s keyword arguments (those that do not change a number are accepted and
    ignored), plus what only the caller knows: ``layer`` (the block ``feature_fn`` reads, -1 the last, -k the
    k-th from last), ``weights`` (``"student"``, or the teacher's ``"model"``/``"ema"``) and any further
    ``described`` facts (model, checkpoint, ...), which lead the record. Each set contributes its own part
    (``RetrievalSet.protocol``: splits, sizes, source, resize and normalisation; ``SequenceRetrievalSet.protocol``:
    splits, sizes, source, lengths, truncation, padding, and the modality's own facts). ``input_size`` is recorded
    only when an image set is evaluated.
    """
    _check_settings(sets, pooling, num_extra_tokens, ks, knn_k, knn_temperature)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    weighted, uniform = (f"knn{knn_k}", f"knn{knn_k}_uniform")
    images = any(not isinstance(data, SequenceRetrievalSet) for data in sets.values())
    if images and input_size is None:
        raise ValueError("image sets need the encoder's input_size")
    modalities = sorted({data.modality for data in sets.values()})
    record = {
        **described,
        "modality": modalities[0] if len(modalities) == 1 else modalities,
        "weights": weights,
        "layer": int(layer),
        "pooling": pooling,
        "pooling_reads": pooling_description(pooling, num_extra_tokens, sets) if sets else None,
        "num_extra_tokens": int(num_extra_tokens),
        "standardize": bool(standardize),
        "standardize_statistics": ("per-dimension mean and population std of the memory bank, applied to memory "
                                   "and queries (each direction uses its own memory bank)") if standardize else None,
        "l2_normalize": True,
        "similarity": "cosine",
        "search": f"exact ({resolve_backend(backend)})",
        "ties": "equal similarities: the lower memory-bank index is nearer",
        "retrieval_ks": [int(k) for k in ks],
        "retrieval_hit": "a query is right at top-k when any of its k nearest memory items has its class",
        "retrieval_inverse": "<set>_inv_top<k>: the test split is the memory bank and the train split the queries",
        "knn_k": int(knn_k),
        "knn_temperature": float(knn_temperature) if knn_k else None,
        "knn_weighting": {
            weighted: "weighted: sum of exp(cosine / T) per class (DINO); ties to the class of the nearest",
            uniform: "uniform: one vote per neighbour, majority wins; ties to the class of the nearest",
        } if knn_k else {},
        "knn_memory_split": "train" if knn_k else None,
        "knn_query_split": "test" if knn_k else None,
        "input_size": int(input_size) if images else None,
        "dtype": dtype_name(dtype),
        "device": torch.device(device).type,
        "sets": {name: data.protocol(input_size) for name, data in sets.items()},
    }
    if not images:
        del record["input_size"]
    return record
