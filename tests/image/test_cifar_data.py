"""CIFAR pickles and labelled image folders read into uint8 tensors, with clear errors for bad data."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fairseq_mmkd.retrieval import RetrievalDataError, RetrievalSet, load_cifar, load_image_folder_pair, write_cifar

CLASSES = {"cifar10": 10, "cifar100": 100}


def random_split(rng, n, classes):
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n)


@pytest.fixture(params=["cifar10", "cifar100"])
def written(request, tmp_path):
    """A tiny CIFAR variant written in the real layout, with the arrays that went in."""
    name = request.param
    rng = np.random.default_rng(0)
    train, test = random_split(rng, 23, CLASSES[name]), random_split(rng, 11, CLASSES[name])
    folder = write_cifar(tmp_path, name, *train, *test)
    return name, tmp_path, folder, train, test


def test_round_trip_restores_images_and_labels(written):
    name, root, _, (train_x, train_y), (test_x, test_y) = written
    data = load_cifar(root, name)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (23, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64 and data.test_images.shape == (11, 3, 32, 32)
    np.testing.assert_array_equal(data.train_images.permute(0, 2, 3, 1).numpy(), train_x)
    np.testing.assert_array_equal(data.test_images.permute(0, 2, 3, 1).numpy(), test_x)
    np.testing.assert_array_equal(data.train_labels.numpy(), train_y)
    np.testing.assert_array_equal(data.test_labels.numpy(), test_y)


@pytest.mark.parametrize("limit", [1, 7, 100])
def test_limit_keeps_the_first_images_of_each_split(written, limit):
    name, root, _, (train_x, train_y), (test_x, test_y) = written
    data = load_cifar(root, name, limit=limit)  # 7 spans two of CIFAR-10's five training files
    assert data.num_train == min(limit, 23) and data.num_test == min(limit, 11)
    np.testing.assert_array_equal(data.train_images.permute(0, 2, 3, 1).numpy(), train_x[:limit])
    np.testing.assert_array_equal(data.test_labels.numpy(), test_y[:limit])


def test_written_files_have_the_torchvision_layout(written):
    name, _, folder, (train_x, train_y), _ = written
    expected = ({"data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"} if name == "cifar10" else {"train", "test", "meta"})
    assert set(os.listdir(folder)) == expected
    first = "data_batch_1" if name == "cifar10" else "train"
    with open(folder / first, "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # what torchvision's CIFAR10/CIFAR100 do
    label_key = "labels" if name == "cifar10" else "fine_labels"
    assert entry["data"].dtype == np.uint8 and entry["data"].shape[1] == 3072
    rows = len(entry["data"])
    # Rows are channel-major: the red plane, then green, then blue (torchvision reshapes to [N, 3, 32, 32]).
    np.testing.assert_array_equal(entry["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), train_x[:rows])
    assert entry[label_key] == train_y[:rows].tolist()
    with open(folder / ("batches.meta" if name == "cifar10" else "meta"), "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["label_names" if name == "cifar10" else "fine_label_names"]) == CLASSES[name]


def test_bytes_keys_are_read_too(tmp_path):
    # Some re-packed copies were pickled from dicts with bytes keys (what encoding="bytes" shows).
    rng = np.random.default_rng(1)
    folder = write_cifar(tmp_path, "cifar100", *random_split(rng, 4, 100), *random_split(rng, 3, 100))
    for split in ("train", "test"):
        with open(folder / split, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        with open(folder / split, "wb") as f:
            pickle.dump({k.encode(): v for k, v in entry.items()}, f, protocol=2)
    assert load_cifar(tmp_path, "cifar100").num_train == 4


def test_the_variant_folder_itself_is_accepted(written):
    name, _, folder, _, _ = written
    assert load_cifar(folder, name).num_test == 11


@pytest.mark.parametrize("name, layout", [("cifar10", "cifar-10-batches-py/data_batch_1..5, test_batch"),
                                          ("cifar100", "cifar-100-python/train, test")])
def test_missing_data_names_the_layout_and_the_download_script(tmp_path, name, layout):
    with pytest.raises(RetrievalDataError) as err:
        load_cifar(tmp_path, name)
    assert layout in str(err.value) and "scripts/prepare_data.py --cifar" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_batch_file_is_named(written):
    name, root, folder, _, _ = written
    victim = "data_batch_3" if name == "cifar10" else "test"
    (folder / victim).unlink()
    with pytest.raises(RetrievalDataError, match=f"{victim}: file not found.*prepare_data.py"):
        load_cifar(root, name)


def _rewrite(path, mutate):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    with open(path, "wb") as f:
        pickle.dump(mutate(entry), f, protocol=2)


@pytest.mark.parametrize("mutate, match", [
    (lambda e: {**e, "data": e["data"][:, :100]}, r"'data' must be uint8 \[N, 3072\]"),
    (lambda e: {**e, "data": e["data"].astype(np.float32)}, "must be uint8"),
    (lambda e: {k: v for k, v in e.items() if k != "data"}, "expected keys 'data'"),
    (lambda e: {**e, "LABELS": e["data"][:1, 0].tolist()}, None),  # an extra key is harmless
    (lambda e: [e], "expected a pickled dict"),
])
def test_malformed_entries_are_rejected(written, mutate, match):
    name, root, folder, _, _ = written
    _rewrite(folder / ("test_batch" if name == "cifar10" else "test"), mutate)
    if match is None:
        load_cifar(root, name)
        return
    with pytest.raises(RetrievalDataError, match=match):
        load_cifar(root, name)


def test_wrong_label_count_and_range_are_rejected(written):
    name, root, folder, _, _ = written
    test_file, key = (folder / "test_batch", "labels") if name == "cifar10" else (folder / "test", "fine_labels")
    _rewrite(test_file, lambda e: {**e, key: e[key][:-1]})
    with pytest.raises(RetrievalDataError, match="11 images but 10 labels"):
        load_cifar(root, name)
    _rewrite(test_file, lambda e: {**e, key: e[key] + [CLASSES[name]]})
    with pytest.raises(RetrievalDataError, match="labels outside"):
        load_cifar(root, name)


def test_truncated_file_is_rejected(written):
    name, root, folder, _, _ = written
    path = folder / ("test_batch" if name == "cifar10" else "test")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(RetrievalDataError, match="not a readable"):
        load_cifar(root, name)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickles_with_code_are_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    folder = write_cifar(tmp_path, "cifar10", *random_split(rng, 5, 10), *random_split(rng, 2, 10))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Exploit(), "labels": [0]}, f, protocol=2)
    with pytest.raises(RetrievalDataError, match="refusing to unpickle"):
        load_cifar(tmp_path, "cifar10")
    assert not (tmp_path / "PWNED").exists()


def test_write_cifar_rejects_channel_first_images(tmp_path):
    with pytest.raises(ValueError, match="NHWC"):
        write_cifar(tmp_path, "cifar10", np.zeros((2, 3, 32, 32), np.uint8), [0, 1],
                    np.zeros((1, 32, 32, 3), np.uint8), [0])


# ---------------------------------------------------------------------------------------------- image folders

def write_folder(root, split, counts, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_pair_is_decoded_once_at_a_fixed_size(tmp_path):
    write_folder(tmp_path, "train", {"cat": 3, "dog": 2})
    write_folder(tmp_path, "test", {"dog": 1, "emu": 2}, size=(20, 50))
    data = load_image_folder_pair(tmp_path, image_size=24)
    assert isinstance(data, RetrievalSet)
    assert data.train_images.shape == (5, 3, 24, 24) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (3, 3, 24, 24)
    # Class indices come from the sorted union of folder names: cat=0, dog=1, emu=2, in both splits.
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1] and data.test_labels.tolist() == [1, 2, 2]


def test_image_folder_limit_spreads_over_classes(tmp_path):
    write_folder(tmp_path, "train", {"a": 4, "b": 4, "c": 4})
    write_folder(tmp_path, "test", {"a": 1, "b": 1, "c": 1})
    data = load_image_folder_pair(tmp_path, image_size=8, limit=3)
    assert sorted(data.train_labels.tolist()) == [0, 1, 2]


def test_image_folder_errors_name_the_layout(tmp_path):
    write_folder(tmp_path, "train", {"a": 1})
    with pytest.raises(RetrievalDataError, match=r"test: directory not found.*<root>/test/<class>"):
        load_image_folder_pair(tmp_path)
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(RetrievalDataError, match="no images"):
        load_image_folder_pair(tmp_path)
    (tmp_path / "test" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(RetrievalDataError, match="broken.jpg: cannot be decoded"):
        load_image_folder_pair(tmp_path)
