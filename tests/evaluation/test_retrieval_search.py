"""Exact top-k retrieval accuracy: numpy reference, hand-made geometry, backend agreement, ties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_mmkd.retrieval import search, topk_accuracy

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not search.faiss_available(),
                                                                    reason="faiss not importable"))]


def reference_accuracy(memory, memory_labels, queries, query_labels, ks):
    """Brute force in numpy: cosine similarity, stable sort (ties: lower memory index first)."""
    m = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    order = np.argsort(-(q @ m.T), axis=1, kind="stable")
    return {k: 100.0 * np.mean([(memory_labels[row[:k]] == label).any() for row, label in zip(order, query_labels)])
            for k in ks}


def random_set(seed, n_memory=300, n_queries=120, dim=16, classes=5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))
    memory_labels = rng.integers(0, classes, n_memory)
    query_labels = rng.integers(0, classes, n_queries)
    memory = (centers[memory_labels] + 1.5 * rng.normal(size=(n_memory, dim))).astype(np.float32)
    queries = (centers[query_labels] + 1.5 * rng.normal(size=(n_queries, dim))).astype(np.float32)
    return memory, memory_labels, queries, query_labels


def angles(*degrees):
    rad = np.deg2rad(degrees)
    return torch.tensor(np.stack([np.cos(rad), np.sin(rad)], 1), dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_equals_numpy_brute_force(seed, backend):
    memory, memory_labels, queries, query_labels = random_set(seed)
    ks = (1, 3, 10)
    expected = reference_accuracy(memory, memory_labels, queries, query_labels, ks)
    got = topk_accuracy(torch.from_numpy(memory), torch.from_numpy(memory_labels), torch.from_numpy(queries),
                        torch.from_numpy(query_labels), ks, backend=backend)
    assert 0 < got[1] < 100  # the data is neither trivial nor hopeless
    for k in ks:
        assert got[k] == pytest.approx(expected[k], abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_angles_both_directions(backend):
    # Memory on the unit circle at 0, 10, 20 (class 0), 90 (class 1) and 180 degrees (class 2).
    memory, memory_labels = angles(0, 10, 20, 90, 180), torch.tensor([0, 0, 0, 1, 2])
    # Query at 80 deg (class 0): nearest 90 (class 1), then 20, 10 (class 0) -> top-1 miss, top-3 hit.
    # Query at 170 deg (class 1): nearest 180 (class 2), then 90 (class 1) -> top-1 miss, top-3 hit.
    # Query at 5 deg (class 0): nearest 0 or 10 (class 0) -> hit at both.
    # Query at 250 deg (class 0): 70 deg from 180 (class 2), then 110 from 0 and 120 from 10 (class 0)
    #   -> top-1 miss, top-3 hit.
    queries, query_labels = angles(80, 170, 5, 250), torch.tensor([0, 1, 0, 0])
    got = topk_accuracy(memory, memory_labels, queries, query_labels, (1, 3), backend=backend)
    assert got == {1: 25.0, 3: 100.0}

    # Inverse: the four queries become the memory bank.
    # 0 deg (class 0) -> nearest 5 (class 0): hit.  10, 20 -> nearest 5: hits.
    # 90 deg (class 1) -> 10 deg from 80 (class 0), 80 from 170 (class 1), 85 from 5: top-1 miss, top-3 hit.
    # 180 deg (class 2) -> no class-2 item in the bank: miss at every k.
    inverse = topk_accuracy(queries, query_labels, memory, memory_labels, (1, 3), backend=backend)
    assert inverse == {1: 60.0, 3: 80.0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_memory_index(backend):
    # Three identical memory vectors with different labels: the query's top-1 is index 0, its top-2 are 0 and 1.
    memory, memory_labels = angles(0, 0, 0, 90), torch.tensor([7, 8, 9, 9])
    query = angles(0)
    for label, expected in [(7, {1: 100.0, 2: 100.0}), (8, {1: 0.0, 2: 100.0}), (9, {1: 0.0, 2: 0.0})]:
        assert topk_accuracy(memory, memory_labels, query, torch.tensor([label]), (1, 2), backend=backend) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_collapsed_embeddings_are_deterministic(backend):
    # A collapsed model embeds every image identically: every score ties, so the lowest indices win.
    memory_labels, query_labels = torch.arange(50) % 7, torch.arange(20) % 7
    got = topk_accuracy(torch.ones(50, 8), memory_labels, torch.ones(20, 8), query_labels, (1, 3), backend=backend)
    assert got == {1: 100.0 * 3 / 20, 3: 100.0 * 9 / 20}  # labels 0 / 0,1,2 of 20 cyclic labels


# Unit vectors whose components are all +-0.5: every dot product (-1, -0.5, 0, 0.5, 1) is exact, so ties are
# exact ties in every backend and summation order cannot split them.
EXACT_VECTORS = np.array([[a, b, c, d] for a in (-.5, .5) for b in (-.5, .5) for c in (-.5, .5) for d in (-.5, .5)],
                         dtype=np.float32)


@settings(max_examples=40, deadline=None)
@given(memory_ids=st.lists(st.integers(0, 15), min_size=1, max_size=40),
       query_ids=st.lists(st.integers(0, 15), min_size=1, max_size=15), labels=st.data(),
       ks=st.sets(st.integers(1, 6), min_size=1, max_size=3))
def test_backends_agree_with_reference_under_exact_ties(memory_ids, query_ids, labels, ks):
    memory, queries = EXACT_VECTORS[memory_ids], EXACT_VECTORS[query_ids]
    memory_labels = np.array(labels.draw(st.lists(st.integers(0, 3), min_size=len(memory), max_size=len(memory))))
    query_labels = np.array(labels.draw(st.lists(st.integers(0, 3), min_size=len(queries), max_size=len(queries))))
    ks = sorted(ks)
    expected = reference_accuracy(memory, memory_labels, queries, query_labels, ks)
    results = {"torch": topk_accuracy(memory, memory_labels, queries, query_labels, ks, backend="torch")}
    if search.faiss_available():
        results["faiss"] = topk_accuracy(memory, memory_labels, queries, query_labels, ks, backend="faiss")
    for got in results.values():
        assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.skipif(not search.faiss_available(), reason="faiss not importable")
def test_faiss_and_torch_agree_on_random_embeddings():
    memory, memory_labels, queries, query_labels = random_set(3, n_memory=2000, n_queries=500, dim=64, classes=10)
    args = (torch.from_numpy(memory), torch.from_numpy(memory_labels), torch.from_numpy(queries),
            torch.from_numpy(query_labels), (1, 3, 5))
    assert topk_accuracy(*args, backend="faiss") == topk_accuracy(*args, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_inputs_give_the_normalised_result(backend):
    memory, memory_labels, queries, query_labels = random_set(4)
    rng = np.random.default_rng(5)
    scaled_memory = memory * rng.uniform(0.01, 100, size=(len(memory), 1)).astype(np.float32)
    scaled_queries = queries * rng.uniform(0.01, 100, size=(len(queries), 1)).astype(np.float32)
    unit_memory = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    assert (topk_accuracy(scaled_memory, memory_labels, scaled_queries, query_labels, backend=backend)
            == topk_accuracy(unit_memory, memory_labels, unit_queries, query_labels, backend=backend))


def test_results_are_python_floats_keyed_by_k():
    memory, memory_labels, queries, query_labels = random_set(6)
    got = topk_accuracy(memory, memory_labels, queries, query_labels, (1, 3))
    assert list(got) == [1, 3]
    assert all(type(v) is float and 0.0 <= v <= 100.0 and math.isfinite(v) for v in got.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_beyond_memory_bank_counts_every_item(backend):
    memory, memory_labels = angles(0, 90), torch.tensor([0, 1])
    queries, query_labels = angles(0, 90, 45), torch.tensor([1, 0, 2])
    assert topk_accuracy(memory, memory_labels, queries, query_labels, (1, 2, 5), backend=backend) == pytest.approx(
        {1: 0.0, 2: 200 / 3, 5: 200 / 3})


def test_auto_falls_back_to_torch_without_faiss(monkeypatch):
    monkeypatch.setattr(search, "_faiss", lambda: None)
    memory, memory_labels, queries, query_labels = random_set(7)
    expected = reference_accuracy(memory, memory_labels, queries, query_labels, (1, 3))
    assert topk_accuracy(memory, memory_labels, queries, query_labels) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ImportError, match="backend='torch'"):
        topk_accuracy(memory, memory_labels, queries, query_labels, backend="faiss")


@pytest.mark.parametrize("bad, match", [
    (dict(memory=torch.full((4, 2), float("nan"))), "NaN or inf"),
    (dict(queries=torch.ones(3, 5)), "embedding sizes differ"),
    (dict(memory_labels=torch.zeros(3, dtype=torch.long)), "labels"),
    (dict(query_labels=torch.zeros(3)), "integer"),
    (dict(ks=(0,)), "positive"),
    (dict(backend="annoy"), "backend"),
])
def test_invalid_inputs_raise_clear_errors(bad, match):
    args = dict(memory=torch.randn(4, 2), memory_labels=torch.arange(4), queries=torch.randn(3, 2),
                query_labels=torch.arange(3), ks=(1,), backend="torch")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        topk_accuracy(**args)
