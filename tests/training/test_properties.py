"""Properties of the numerical core checked over generated inputs (hypothesis): data2vec2 target
construction (``make_targets``) and retrieval accuracy (``topk_accuracy``).

Inputs are drawn as shapes, settings and a seed for ``torch.randn`` (continuous values: no exact ties
unless a test builds them on purpose). Retrieval properties that hold exactly only away from floating-point
near-ties (a re-ordering of two scores within rounding changes top-k) skip such draws explicitly.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fairseq_mmkd.retrieval import faiss_available, topk_accuracy
from fairseq_mmkd.modules.targets import TargetConfig, make_targets

# derandomized: CI runs the same examples every time (a property failure is then reproducible, not flaky)
FAST = settings(max_examples=25, deadline=None, derandomize=True)
EPS = 1e-5  # the norms' epsilon (as upstream): unit variance means v / (v + EPS) for a variance v
BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


@st.composite
def layer_stacks(draw, min_tokens=2):
    """Per-layer outputs ``[B, T, C]`` with per-layer scale and offset, as real layers differ."""
    b, t = draw(st.integers(1, 3)), draw(st.integers(min_tokens, 12))
    c, n = draw(st.integers(2, 16)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scales = [draw(st.floats(0.1, 20.0)) for _ in range(n)]
    return [torch.randn(b, t, c, generator=g) * s + torch.randn(1, 1, c, generator=g) * s for s in scales]


def recipe(k, **norms):
    """Targets from the top ``k`` layers with only the given normalisations switched on."""
    cfg = TargetConfig(average_top_k_layers=k, instance_norm_target_layer=False, layer_norm_target_layer=False,
                       batch_norm_target_layer=False, layer_norm_targets=False, instance_norm_targets=False)
    return replace(cfg, **norms)


@FAST
@given(layers=layer_stacks(), data=st.data(), norms=st.fixed_dictionaries({
    name: st.booleans() for name in ("instance_norm_target_layer", "layer_norm_target_layer",
                                     "batch_norm_target_layer", "layer_norm_targets", "instance_norm_targets")}))
def test_targets_have_the_input_shape_and_are_fp32(layers, data, norms):
    k = data.draw(st.integers(1, len(layers)))
    out = make_targets([y.half() for y in layers], recipe(k, **norms))
    assert out.shape == layers[0].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@FAST
@given(layers=layer_stacks(min_tokens=4), data=st.data())
def test_instance_norm_normalises_each_layer_over_tokens_before_averaging(layers, data):
    k = data.draw(st.integers(1, len(layers)))
    cfg = recipe(k, instance_norm_target_layer=True)
    for y in layers[-k:]:  # each layer alone: zero mean, unit variance over tokens, per sample and channel
        alone = make_targets([y], replace(cfg, average_top_k_layers=1))
        v = y.var(1, unbiased=False)
        torch.testing.assert_close(alone.mean(1), torch.zeros_like(v), atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.var(1, unbiased=False), v / (v + EPS), atol=1e-4, rtol=1e-4)
    # ...and the target is the plain average of those normalised layers
    expected = sum(make_targets([y], replace(cfg, average_top_k_layers=1)) for y in layers[-k:]) / k
    torch.testing.assert_close(make_targets(layers, cfg), expected, atol=1e-5, rtol=1e-5)


@FAST
@given(layers=layer_stacks(), data=st.data(), instance_norm=st.booleans())
def test_layer_norm_targets_have_zero_mean_unit_variance_over_channels(layers, data, instance_norm):
    k = data.draw(st.integers(1, len(layers)))
    cfg = recipe(k, instance_norm_target_layer=instance_norm)
    before = make_targets(layers, cfg)
    out = make_targets(layers, replace(cfg, layer_norm_targets=True))
    v = before.var(-1, unbiased=False)  # per token, over channels
    torch.testing.assert_close(out.mean(-1), torch.zeros_like(v), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), v / (v + EPS), atol=1e-4, rtol=1e-4)


@FAST
@given(layers=layer_stacks(), data=st.data(), norms=st.fixed_dictionaries({
    "instance_norm_target_layer": st.booleans(), "layer_norm_target_layer": st.booleans(),
    "layer_norm_targets": st.booleans()}))
def test_only_the_last_k_layers_matter(layers, data, norms):
    k = data.draw(st.integers(1, len(layers)))
    cfg = recipe(k, **norms)
    changed = [torch.randn_like(y) * 100 for y in layers[:-k]] + layers[-k:]
    assert torch.equal(make_targets(changed, cfg), make_targets(layers, cfg))
    _, tokens, channels = layers[-k].shape
    # ...and the k-th from the top does. Not with 2 tokens or 2 channels: instance or layer norm then maps
    # every input to +-1, so a change of sign pattern alone would show.
    if k < len(layers) and tokens >= 3 and channels >= 3:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        bump = 1.0 + torch.randn(layers[-k].shape, generator=g)
        changed = layers[:-k] + [layers[-k] + bump] + layers[len(layers) - k + 1:]
        assert not torch.equal(make_targets(changed, cfg), make_targets(layers, cfg))


def test_top_k_outside_the_layers_is_refused():
    layers = [torch.randn(1, 3, 4)] * 2
    for k in (0, 3):
        with pytest.raises(ValueError, match="between 1 and the number of layers"):
            make_targets(layers, TargetConfig(average_top_k_layers=k))


# ---- retrieval ---------------------------------------------------------------------------------------------


@st.composite
def banks(draw):
    """A memory bank and queries with labels (random directions; classes drawn at random)."""
    n, q, d = draw(st.integers(1, 40)), draw(st.integers(1, 20)), draw(st.integers(2, 12))
    classes = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return (torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g),
            torch.randn(q, d, generator=g), torch.randint(0, classes, (q,), generator=g))


def min_gap(memory, queries, ks=(1, 3)) -> float:
    """Smallest distance (in float64 cosine) between the k-th and (k+1)-th score of any query."""
    s = F.normalize(queries.double(), dim=1) @ F.normalize(memory.double(), dim=1).T
    s = s.sort(1, descending=True).values
    gaps = [s[:, k - 1] - s[:, k] for k in ks if k < s.shape[1]]
    return float(torch.cat(gaps).min()) if gaps else 1.0


@FAST
@given(bank=banks(), seed=st.integers(0, 1000), backend=st.sampled_from(BACKENDS))
def test_memory_bank_order_does_not_matter(bank, seed, backend):
    memory, mlabels, queries, qlabels = bank
    assume(min_gap(memory, queries) > 1e-5)
    perm = torch.randperm(len(memory), generator=torch.Generator().manual_seed(seed))
    assert topk_accuracy(memory[perm], mlabels[perm], queries, qlabels, backend=backend) == \
        topk_accuracy(memory, mlabels, queries, qlabels, backend=backend)


@FAST
@given(bank=banks(), backend=st.sampled_from(BACKENDS))
def test_top3_is_at_least_top1(bank, backend):
    acc = topk_accuracy(*bank, ks=(1, 3), backend=backend)
    assert 0.0 <= acc[1] <= acc[3] <= 100.0
    assert all(type(v) is float for v in acc.values())


@FAST
@given(bank=banks(), data=st.data(), backend=st.sampled_from(BACKENDS))
def test_queries_that_copy_memory_items_score_perfectly(bank, data, backend):
    memory, mlabels, _, _ = bank
    idx = torch.tensor(data.draw(st.lists(st.integers(0, len(memory) - 1), min_size=1, max_size=15)))
    scale = data.draw(st.floats(0.01, 100.0))  # a copy at another length is the same direction
    assert topk_accuracy(memory, mlabels, memory[idx] * scale, mlabels[idx], backend=backend) == {1: 100.0, 3: 100.0}


@FAST
@given(bank=banks(), data=st.data(), backend=st.sampled_from(BACKENDS))
def test_rescaling_embeddings_does_not_change_accuracy(bank, data, backend):
    memory, mlabels, queries, qlabels = bank
    assume(min_gap(memory, queries) > 1e-4)
    pos = st.floats(1e-3, 1e3)
    mscale = torch.tensor(data.draw(st.lists(pos, min_size=len(memory), max_size=len(memory))))[:, None]
    qscale = torch.tensor(data.draw(st.lists(pos, min_size=len(queries), max_size=len(queries))))[:, None]
    assert topk_accuracy(memory * mscale, mlabels, queries * qscale, qlabels, backend=backend) == \
        topk_accuracy(memory, mlabels, queries, qlabels, backend=backend)
