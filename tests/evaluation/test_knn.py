"""k-NN classification: both votes against a brute-force reference on real images (scikit-learn's handwritten
digits), constructed ties, and one search shared with retrieval top-k."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from fairseq_mmkd.retrieval import (RetrievalSet, evaluate_retrieval, knn_accuracy, knn_predict, nearest_neighbours,
                                    preprocess, search)

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not search.faiss_available(),
                                                                    reason="faiss not importable"))]
T = 0.07


def reference_predictions(memory, memory_labels, queries, k, vote, temperature=T):
    """Brute force in numpy float64: cosine, stable sort (equal scores: lower memory index first), then per
    class the sum of exp(cos / T) (weighted) or of 1 (uniform); a tie goes to the class of the nearest."""
    m = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ m.astype(np.float64).T
    predictions = []
    for row in scores:
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = {}
        for i in nearest:
            votes[memory_labels[i]] = votes.get(memory_labels[i], 0.0) + (np.exp(row[i] / temperature)
                                                                          if vote == "weighted" else 1.0)
        best = max(votes.values())
        predictions.append(next(memory_labels[i] for i in nearest if votes[memory_labels[i]] == best))
    return np.array(predictions)


@pytest.fixture(scope="module")
def digits():
    """1,797 real 8x8 grey images of handwritten digits, pixel values 0..16: 200 as memory, 600 as queries (a
    small memory bank, so that the weighted and the uniform vote disagree on some queries)."""
    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    return x[:200], y[:200], x[200:800], y[200:800]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 20, 250])
def test_both_votes_equal_brute_force_on_digits(digits, backend, k):
    memory, memory_labels, queries, query_labels = digits
    neighbours = nearest_neighbours(memory, queries, k, backend=backend)
    assert neighbours.ids.shape == (len(queries), min(k, len(memory)))  # k beyond the bank: every item votes
    for vote in ("weighted", "uniform"):
        expected = reference_predictions(memory, memory_labels, queries, k, vote)
        got = knn_predict(neighbours, torch.from_numpy(memory_labels), k, T, vote).numpy()
        np.testing.assert_array_equal(got, expected)
    acc = knn_accuracy(neighbours, torch.from_numpy(memory_labels), torch.from_numpy(query_labels), k, T)
    for vote in ("weighted", "uniform"):
        expected = reference_predictions(memory, memory_labels, queries, k, vote)
        assert acc[vote] == pytest.approx(100.0 * np.mean(expected == query_labels), abs=1e-9)
    if k == 20:  # the two votes are different metrics on this data, not two names for one
        assert acc["weighted"] != acc["uniform"]
        assert 60 < acc["uniform"] < acc["weighted"] < 100


def angles(*degrees):
    rad = np.deg2rad(degrees)
    return torch.tensor(np.stack([np.cos(rad), np.sin(rad)], 1), dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_tie_goes_to_the_nearest_while_the_weighted_vote_weighs_similarity(backend):
    # Query at 0 deg; neighbours at 5 (class 1), 10 (class 0), 15 (class 0), 20 (class 1), 90 (class 2).
    memory, labels = angles(20, 15, 10, 5, 90), torch.tensor([1, 0, 0, 1, 2])
    neighbours = nearest_neighbours(memory, angles(0), 4, backend=backend)
    assert neighbours.ids.tolist() == [[3, 2, 1, 0]]
    # Uniform: 2 votes each for classes 0 and 1; the nearest (5 deg) is class 1.
    assert knn_predict(neighbours, labels, 4, T, "uniform").tolist() == [1]
    # Weighted: exp(cos 10/T) + exp(cos 15/T) = 2.27e6 beats exp(cos 5/T) + exp(cos 20/T) = 2.19e6.
    assert knn_predict(neighbours, labels, 4, T, "weighted").tolist() == [0]
    # The same neighbours with the classes swapped: the nearest decides the other way round.
    assert knn_predict(neighbours, 1 - labels.clamp(max=1), 4, T, "uniform").tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vote", ["weighted", "uniform"])
def test_exactly_equal_votes_go_to_the_class_of_the_lower_memory_index(backend, vote):
    # Identical memory vectors of classes 4 and 7: equal similarity, equal weights. Lower index = nearer.
    memory = angles(30, 30, 90)
    for labels, expected in (([7, 4, 4], 7), ([4, 7, 7], 4)):
        neighbours = nearest_neighbours(memory, angles(0), 2, backend=backend)
        assert knn_predict(neighbours, torch.tensor(labels), 2, T, vote).tolist() == [expected]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_kth_place_admit_the_lower_memory_indices(backend):
    # Six identical items (classes 0,0,1,1,1,1 from index 0), nothing else: with k=3 the voters are items 0, 1, 2.
    memory, labels = angles(0, 0, 0, 0, 0, 0), torch.tensor([0, 0, 1, 1, 1, 1])
    neighbours = nearest_neighbours(memory, angles(3), 3, backend=backend)
    assert neighbours.ids.tolist() == [[0, 1, 2]]
    assert knn_predict(neighbours, labels, 3, T, "uniform").tolist() == [0]
    # Reversed bank: items 0..3 are class 1 now.
    neighbours = nearest_neighbours(memory, angles(3), 3, backend=backend)
    assert knn_predict(neighbours, labels.flip(0), 3, T, "uniform").tolist() == [1]


# Unit vectors with components +-0.5: every dot product is exact, so ties are exact in every backend.
EXACT_VECTORS = np.array([[a, b, c, d] for a in (-.5, .5) for b in (-.5, .5) for c in (-.5, .5) for d in (-.5, .5)],
                         dtype=np.float32)


@settings(max_examples=40, deadline=None)
@given(memory_ids=st.lists(st.integers(0, 15), min_size=1, max_size=40),
       query_ids=st.lists(st.integers(0, 15), min_size=1, max_size=12), data=st.data(), k=st.integers(1, 8))
def test_votes_equal_the_reference_under_many_exact_ties(memory_ids, query_ids, data, k):
    memory, queries = EXACT_VECTORS[memory_ids], EXACT_VECTORS[query_ids]
    labels = np.array(data.draw(st.lists(st.integers(0, 3), min_size=len(memory), max_size=len(memory))))
    backends = ["torch"] + (["faiss"] if search.faiss_available() else [])
    for backend in backends:
        neighbours = nearest_neighbours(memory, queries, k, backend=backend)
        for vote in ("weighted", "uniform"):
            got = knn_predict(neighbours, torch.from_numpy(labels), k, T, vote).numpy()
            np.testing.assert_array_equal(got, reference_predictions(memory, labels, queries, k, vote))


def test_knn_settings_are_checked():
    neighbours = nearest_neighbours(angles(0, 90), angles(10), 2, backend="torch")
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_predict(neighbours, torch.tensor([0, 1]), 2, 0.0)
    with pytest.raises(ValueError, match="vote must be one of"):
        knn_predict(neighbours, torch.tensor([0, 1]), 2, T, "softmax")
    with pytest.raises(ValueError, match="knn_k must be >= 0"):
        evaluate_retrieval(lambda x: x, {"s": digit_images(0, 4)}, 8, 0, pooling="mean", knn_k=-1, progress=False)


# ------------------------------------------------------------------------ through evaluate_retrieval

def digit_images(start, stop) -> tuple:
    data = load_digits()
    grey = torch.from_numpy(np.round(data.images[start:stop] * 255 / 16).astype(np.uint8))
    return grey[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(data.target[start:stop].astype(np.int64))


def pixels_as_cls(x):
    """Token 0: the image's normalised grey pixels (64 values); two patch tokens: its row and column means."""
    grey = x[:, 0]
    return torch.stack([grey.flatten(1), torch.nn.functional.pad(grey.mean(1), (0, 56)),
                        torch.nn.functional.pad(grey.mean(2), (0, 56))], 1)


def test_evaluate_retrieval_knn_on_digit_images_equals_brute_force():
    """Digits as tiny 8x8 images through the whole evaluation (preprocessing, pooling, search, votes)."""
    train_images, train_labels = digit_images(0, 150)
    test_images, test_labels = digit_images(150, 450)
    sets = {"digits": RetrievalSet(train_images, train_labels, test_images, test_labels)}
    metrics = evaluate_retrieval(pixels_as_cls, sets, input_size=8, num_extra_tokens=1, pooling="cls",
                                 device="cpu", progress=False, knn_k=10, backend="torch")
    memory = pixels_as_cls(preprocess(train_images, 8, "cpu"))[:, 0].numpy()
    queries = pixels_as_cls(preprocess(test_images, 8, "cpu"))[:, 0].numpy()
    for vote, name in (("weighted", "digits_knn10"), ("uniform", "digits_knn10_uniform")):
        expected = reference_predictions(memory, train_labels.numpy(), queries, 10, vote)
        assert metrics[name] == pytest.approx(100.0 * np.mean(expected == test_labels.numpy()), abs=1e-9)
    assert metrics["digits_knn10"] != metrics["digits_knn10_uniform"]


def test_one_search_per_direction_serves_top_k_and_knn(monkeypatch):
    train_images, train_labels = digit_images(0, 120)
    test_images, test_labels = digit_images(120, 200)
    sets = {"digits": RetrievalSet(train_images, train_labels, test_images, test_labels)}
    calls = []
    real = search._search_torch

    def counting(memory, queries, k):
        calls.append((len(memory), len(queries), k))
        return real(memory, queries, k)

    monkeypatch.setattr(search, "_search_torch", counting)
    embedded = []
    feature_fn = lambda x: embedded.append(len(x)) or pixels_as_cls(x)  # noqa: E731
    evaluate_retrieval(feature_fn, sets, 8, 1, device="cpu", progress=False, backend="torch", knn_k=20)
    # forward: max(top-3, kNN-20) + 1 = 21 neighbours once; inverse: top-3 + 1; each image embedded once
    assert calls == [(120, 80, 21), (80, 120, 4)]
    assert sum(embedded) == 200
