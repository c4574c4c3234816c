"""Embedding and the shared evaluation entry point: preprocessing, pooling, metric names, distributed runs."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fairseq_mmkd import D2vConfig, D2vModel
from fairseq_mmkd.encoders.image import ImageEncoderConfig
from fairseq_mmkd.retrieval import RetrievalSet, embed, evaluate_retrieval, metric_names, pool_features, preprocess
from fairseq_mmkd.retrieval.evaluate import IMAGENET_MEAN, IMAGENET_STD

RGB = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def colour_set(n_train=30, n_test=12, size=32, seed=0) -> RetrievalSet:
    """Three classes: noisy red, green and blue images (cosine-separable by their mean colour)."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n) % 3
        imgs = np.clip(RGB[labels][:, :, None, None] + rng.normal(0, 20, (n, 3, size, size)), 0, 255)
        return torch.from_numpy(imgs.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))

    return RetrievalSet(*split(n_train), *split(n_test))


def colour_in_cls(x):
    """Token 0 carries the image's mean colour; the 4 patch tokens are the same for every image."""
    colour = x.mean((2, 3))
    return torch.cat([colour[:, None], torch.ones(len(x), 4, 3)], 1)


def colour_in_patches(x):
    """Patch tokens carry the mean colour of image quarters; a huge identical extra token would swamp them."""
    quarters = F.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # [B, 4, 3]
    return torch.cat([torch.full((len(x), 1, 3), 1000.0), quarters], 1)


def tiny_d2v(seed=0, input_size=32) -> D2vModel:
    torch.manual_seed(seed)
    cfg = D2vConfig(embed_dim=32, depth=1, num_heads=4,
                    encoder=ImageEncoderConfig(input_size=input_size, patch_size=8, embed_dim=32, prenet_depth=1))
    return D2vModel(cfg).eval()


def test_preprocess_resizes_on_device_and_normalises():
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    images[1] = 255
    x = preprocess(images, 224, "cpu")
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    # A constant image stays constant under bicubic resizing (and the clamp keeps 255 at 1.0).
    torch.testing.assert_close(x[:, :, 100, 7], ((torch.tensor([128 / 255, 1.0])[:, None] - mean) / std))
    # Upsampling is plain bicubic without antialiasing; the input size passes through untouched.
    ramp = torch.arange(32, dtype=torch.uint8).repeat(1, 3, 32, 1) * 8
    expected = F.interpolate(ramp.float() / 255, size=(64, 64), mode="bicubic", antialias=False).clamp(0, 1)
    torch.testing.assert_close(preprocess(ramp, 64, "cpu"), (expected - mean[:, None, None]) / std[:, None, None])
    unresized = (ramp.float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(preprocess(ramp, 32, "cpu"), unresized)


def test_pool_features_cls_and_mean_exclude_the_right_tokens():
    features = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    torch.testing.assert_close(pool_features(features, 1, "cls"), features[:, 0])
    torch.testing.assert_close(pool_features(features, 1, "mean"), features[:, 1:].mean(1))
    torch.testing.assert_close(pool_features(features, 2, "mean"), features[:, 2:].mean(1))
    with pytest.raises(ValueError, match="T > num_extra_tokens"):
        pool_features(features[:, :1], 1, "mean")


def test_cls_pooling_without_extra_tokens_is_an_error():
    with pytest.raises(ValueError, match="pooling='mean'"):
        embed(colour_in_cls, colour_set().test_images, 32, num_extra_tokens=0, pooling="cls", progress=False)


def test_embed_is_batch_size_independent_and_ordered():
    model = tiny_d2v()
    images = colour_set().train_images
    full = embed(lambda x: model(x)["x"], images, 32, 1, "mean", batch_size=64, progress=False)
    small = embed(lambda x: model(x)["x"], images, 32, 1, "mean", batch_size=7, progress=False)
    with torch.no_grad():
        direct = model(preprocess(images[5:6], 32, "cpu"))["x"][:, 1:].mean(1)
    assert full.shape == (30, 32) and full.dtype == torch.float32
    torch.testing.assert_close(full, small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[5:6], direct, rtol=1e-5, atol=1e-5)


def test_bf16_dtype_runs_a_float32_model_and_returns_float32():
    model = tiny_d2v()
    images = colour_set().train_images[:8]
    ref = embed(lambda x: model(x)["x"], images, 32, 1, "cls", progress=False)
    low = embed(lambda x: model(x)["x"], images, 32, 1, "cls", dtype=torch.bfloat16, progress=False)
    assert low.dtype == torch.float32
    assert F.cosine_similarity(ref, low).min() > 0.98


def test_evaluate_retrieval_reports_retrieval_and_knn_metrics_per_set():
    sets = {"cifar10": colour_set(), "cifar100": colour_set(20, 10, seed=1)}
    model = tiny_d2v()
    metrics = evaluate_retrieval(lambda x: model(x)["x"], sets, input_size=32, num_extra_tokens=1, device="cpu",
                                 progress=False)
    expected = [f"{s}_{m}" for s in ("cifar10", "cifar100")
                for m in ("top1", "top3", "knn20", "knn20_uniform", "inv_top1", "inv_top3")]
    assert list(metrics) == expected == metric_names("cifar10") + metric_names("cifar100")
    assert all(type(v) is float and 0.0 <= v <= 100.0 for v in metrics.values())
    assert all(metrics[f"{s}_top3"] >= metrics[f"{s}_top1"] for s in ("cifar10", "cifar100", "cifar10_inv"))
    # knn_k=0: the retrieval metrics alone, unchanged
    plain = evaluate_retrieval(lambda x: model(x)["x"], sets, input_size=32, num_extra_tokens=1, device="cpu",
                               progress=False, knn_k=0)
    assert plain == {k: v for k, v in metrics.items() if "knn" not in k}
    assert list(plain) == metric_names("cifar10", knn_k=0) + metric_names("cifar100", knn_k=0)


def test_cls_and_mean_pooling_read_different_tokens():
    sets = {"colours": colour_set()}
    cls_only = dict(input_size=32, num_extra_tokens=1, device="cpu", progress=False)
    # Colour in the CLS token: CLS pooling retrieves perfectly; the identical patch tokens carry nothing
    # (all scores tie, so every query retrieves memory items 0, 1, 2 = one of each class: top-3 is perfect).
    by_cls = evaluate_retrieval(colour_in_cls, sets, pooling="cls", **cls_only)
    assert set(by_cls.values()) == {100.0}
    by_mean = evaluate_retrieval(colour_in_cls, sets, pooling="mean", **cls_only)
    assert by_mean["colours_top1"] == pytest.approx(100 / 3)
    # All 30 memory items tie: the 20 voters are items 0..19 (classes 0, 1, 2 cyclic: 7, 7 and 6 votes); the
    # tie between classes 0 and 1 goes to the nearest, item 0 (class 0), in both votes: a third are right.
    assert by_mean["colours_knn20"] == by_mean["colours_knn20_uniform"] == pytest.approx(100 / 3)
    # Colour in the patch tokens: mean pooling ignores the huge extra token, so it retrieves perfectly.
    assert set(evaluate_retrieval(colour_in_patches, sets, pooling="mean", **cls_only).values()) == {100.0}
    by_cls = evaluate_retrieval(colour_in_patches, sets, pooling="cls", **cls_only)
    assert by_cls["colours_top1"] == pytest.approx(100 / 3)


def test_set_names_must_be_metric_prefixes():
    with pytest.raises(ValueError, match="metric prefix"):
        evaluate_retrieval(colour_in_cls, {"my set": colour_set()}, 32, 1, progress=False)


# ------------------------------------------------------------------------------------------ torch.distributed

def distributed_sets():
    # Uneven shards over 2 ranks (13 = 7 + 6, 7 = 4 + 3) and a split smaller than the world (1 image).
    return {"colours": colour_set(13, 7), "tiny": colour_set(3, 1, seed=2)}


def _distributed_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_d2v()
        fn = lambda x: model(x)["x"]  # noqa: E731
        sets = distributed_sets()
        metrics = evaluate_retrieval(fn, sets, input_size=32, num_extra_tokens=1, pooling="mean",
                                     batch_size=3, device="cpu", progress=False)
        emb = embed(fn, sets["colours"].train_images, 32, 1, "mean", batch_size=3, progress=False)
        torch.save({"metrics": metrics, "embeddings": emb}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_get_the_single_process_result(tmp_path):
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = tiny_d2v()
    fn = lambda x: model(x)["x"]  # noqa: E731
    sets = distributed_sets()
    single = evaluate_retrieval(fn, sets, input_size=32, num_extra_tokens=1, pooling="mean", batch_size=3,
                                device="cpu", progress=False)
    single_emb = embed(fn, sets["colours"].train_images, 32, 1, "mean", batch_size=3, progress=False)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["metrics"] == single
        torch.testing.assert_close(result["embeddings"], single_emb, rtol=1e-5, atol=1e-5)
