"""The d2v_kd task's own logic: data workers, retrieval sets (the training runs are in test_kd_training)."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("cores,local_world,requested,expected", [
    (16, 1, 12, 12), (2, 1, 12, 1), (32, 8, 12, 3), (2, 1, 0, 0), (1, 1, 4, 0)])
def test_data_workers_are_sized_to_the_cores_of_each_training_process(monkeypatch, cores, local_world,
                                                                      requested, expected):
    from fairseq_mmkd.tasks._checks import fit_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert fit_workers(requested) == expected


def test_a_user_retrieval_folder_becomes_a_metric_prefix(tmp_path):
    """task.retrieval_folder: a labelled train/ + test/ ImageFolder pair, named after its folder."""
    from PIL import Image

    from fairseq_mmkd.tasks.d2v_kd import D2vKDTaskConfig
    from fairseq_mmkd.tasks._retrieval import load_retrieval_sets

    root = tmp_path / "my.photos-v2"
    for split, n in (("train", 3), ("test", 2)):
        for c, colour in enumerate(("red", "blue")):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), colour).save(d / f"{i}.png")
    sets = load_retrieval_sets(D2vKDTaskConfig(retrieval_folder=str(root)))
    assert list(sets) == ["my_photos_v2"]
    data = sets["my_photos_v2"]
    assert data.train_images.shape[0] == 6 and data.test_images.shape[0] == 4
    assert sorted(data.train_labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_retrieval_on_without_any_retrieval_data_is_refused():
    from fairseq_mmkd.tasks.d2v_kd import D2vKDTaskConfig
    from fairseq_mmkd.tasks._retrieval import load_retrieval_sets

    with pytest.raises(ValueError, match="task.retrieval=false"):
        load_retrieval_sets(D2vKDTaskConfig())
