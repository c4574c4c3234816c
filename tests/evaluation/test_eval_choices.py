"""What is embedded: pooling (cls, mean, cls+mean), the block read (layer) and standardisation each change
what they should, and nothing else."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fairseq_mmkd import D2vConfig, D2vModel
from fairseq_mmkd.distill.distiller import Distiller, block_features
from fairseq_mmkd.encoders.image import ImageEncoderConfig
from fairseq_mmkd.retrieval import RetrievalSet, evaluate_retrieval, pool_features, standardize_embeddings

from test_knn import digit_images, pixels_as_cls
from test_retrieval_eval import colour_set


def tokens_fn(x):
    """CLS: the mean colour; 3 patch tokens: colours of image rows (so cls and mean carry different views)."""
    thirds = torch.nn.functional.adaptive_avg_pool2d(x, (3, 1)).flatten(2).transpose(1, 2)  # [B, 3, 3]
    return torch.cat([x.mean((2, 3))[:, None], thirds], 1)


def test_cls_plus_mean_is_the_concatenation_and_mean_leaves_out_extra_and_padded_tokens():
    features = torch.randn(4, 6, 5)
    torch.testing.assert_close(pool_features(features, 2, "cls+mean"),
                               torch.cat([features[:, 0], features[:, 2:].mean(1)], 1))
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[1, 4:] = True  # item 1 has 2 real tokens after the 2 extra ones
    pooled = pool_features(features, 2, "mean", padding_mask=padding)
    torch.testing.assert_close(pooled[1], features[1, 2:4].mean(0))
    torch.testing.assert_close(pooled[[0, 2, 3]], features[[0, 2, 3], 2:].mean(1))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_features(features, 1, "max")


def test_pooling_choice_changes_only_the_embedding():
    """cls+mean evaluates exactly like an encoder whose CLS token already is [cls, mean]."""
    sets = {"colours": colour_set(24, 12)}
    kwargs = dict(input_size=32, num_extra_tokens=1, device="cpu", progress=False, knn_k=5)
    both = evaluate_retrieval(tokens_fn, sets, pooling="cls+mean", **kwargs)

    def concatenated_as_cls(x):
        t = tokens_fn(x)
        joined = torch.cat([t[:, 0], t[:, 1:].mean(1)], 1)
        return torch.cat([joined[:, None], torch.zeros(len(x), 1, joined.shape[1])], 1)

    assert both == evaluate_retrieval(concatenated_as_cls, sets, pooling="cls", **kwargs)
    assert list(both) == list(evaluate_retrieval(tokens_fn, sets, pooling="mean", **kwargs))
    with pytest.raises(ValueError, match="needs an extra \\(CLS\\) token"):
        evaluate_retrieval(tokens_fn, sets, pooling="cls+mean", **{**kwargs, "num_extra_tokens": 0})


def test_standardize_uses_the_memory_banks_statistics_like_standard_scaler():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    memory = rng.normal(3, [1, 5, 0.1, 2], size=(50, 4)).astype(np.float32)
    memory[:, 3] = 7.0  # a constant dimension keeps scale 1
    queries = rng.normal(0, 1, size=(20, 4)).astype(np.float32)
    m, q = standardize_embeddings(torch.from_numpy(memory), torch.from_numpy(queries))
    scaler = StandardScaler().fit(memory)
    np.testing.assert_allclose(m.numpy(), scaler.transform(memory), atol=1e-5)
    np.testing.assert_allclose(q.numpy(), scaler.transform(queries), atol=1e-5)
    assert m.dtype == torch.float32


def test_standardized_metrics_ignore_per_dimension_scales_and_offsets():
    """With standardisation the metrics cannot see a per-dimension affine change of the features; without, they
    do. The off setting is the plain cosine evaluation. Real images: 8x8 handwritten digits, pixels as features."""
    train_images, train_labels = digit_images(0, 150)
    test_images, test_labels = digit_images(150, 300)
    sets = {"digits": RetrievalSet(train_images, train_labels, test_images, test_labels)}
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.empty(64).uniform_(-3, 3, generator=gen))
    offset = torch.empty(64).uniform_(-5, 5, generator=gen)

    def distorted(x):
        t = pixels_as_cls(x)
        return torch.cat([t[:, :1] * scale + offset, t[:, 1:]], 1)

    kwargs = dict(input_size=8, num_extra_tokens=1, pooling="cls", device="cpu", progress=False, knn_k=10)
    plain, warped = (evaluate_retrieval(fn, sets, **kwargs) for fn in (pixels_as_cls, distorted))
    assert all(plain[k] != warped[k] for k in plain)  # the distortion matters to a cosine ...
    standardized = evaluate_retrieval(pixels_as_cls, sets, standardize=True, **kwargs)
    assert standardized != plain
    for name, value in evaluate_retrieval(distorted, sets, standardize=True, **kwargs).items():
        assert value == pytest.approx(standardized[name], abs=1e-9), name  # ... not after standardisation
    assert evaluate_retrieval(pixels_as_cls, sets, standardize=False, **kwargs) == plain


# ------------------------------------------------------------------------------------------------ layers

def tiny_teacher_model(layer_norm_first: bool) -> D2vModel:
    torch.manual_seed(0)
    cfg = D2vConfig(embed_dim=16, depth=4, num_heads=2, layer_norm_first=layer_norm_first,
                    encoder=ImageEncoderConfig(input_size=16, patch_size=8, embed_dim=16, prenet_depth=1))
    model = D2vModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so that applying one or not shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layer_norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_layer_picks_the_kth_block_from_last_for_student_and_teacher(layer_norm_first):
    teacher = tiny_teacher_model(layer_norm_first)
    distiller = Distiller(teacher, student_depth=3, student_init="teacher_first").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = teacher(x)
        encoded = distiller.encode(x)
        # Student: layer -1 is what it always returned; -k is block (3 - k + 1), through the final norm.
        torch.testing.assert_close(distiller.forward_features(x), distiller.run_student(encoded)["x"])
        h = encoded.x
        outputs = []
        for blk in distiller.student_blocks:
            h, _ = blk(h)
            outputs.append(distiller.student_norm(h) if layer_norm_first else h)
        for k in (1, 2, 3):
            torch.testing.assert_close(distiller.forward_features(x, layer=-k), outputs[-k])
        # Teacher blocks of the distiller: -k is the teacher's own block_out[-k].
        for k in (1, 2, 4):
            torch.testing.assert_close(distiller.teacher_features(x, layer=-k), out["block_out"][-k])
        # The standalone evaluator's teacher path: layer -1 is the model's own output x (final norm included).
        torch.testing.assert_close(block_features(teacher.blocks, teacher.encoder(x), teacher.cfg.num_heads, -1,
                                                  teacher.norm), out["x"])
        assert not torch.allclose(distiller.forward_features(x, layer=-2), distiller.forward_features(x))
    for bad in (0, 1, -4):
        with pytest.raises(ValueError, match="-k for the k-th from last, with k at most 3"):
            distiller.forward_features(x, layer=bad)
