"""Linear probe: the L-BFGS logistic regression against scikit-learn on the same features, the L2 selection,
determinism, and ``python -m fairseq_mmkd.probe`` end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from fairseq_mmkd.probe import main
from fairseq_mmkd.retrieval import standardize_embeddings
from fairseq_mmkd.retrieval.linear import L2_GRID, fit_logistic_regression, held_out_split, linear_probe

from test_retrieval_cli import REPO, data_root, teacher_checkpoint  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def digit_features():
    """Real images' features: the 64 pixels of scikit-learn's 8x8 digits, standardised with train statistics."""
    data = load_digits()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    train, test = standardize_embeddings(x[:1000], x[1000:])
    return train, y[:1000], test, y[1000:]


def sklearn_head(x, y, l2):
    """scikit-learn's multinomial logistic regression with the same objective: C = 1 / (l2 * n)."""
    return LogisticRegression(C=1.0 / (l2 * len(x)), max_iter=10_000, tol=1e-8).fit(x.numpy(), y.numpy())


@pytest.mark.parametrize("l2", [1e-1, 1e-3, 1e-5])
def test_head_matches_scikit_learn_on_the_same_features(digit_features, l2):
    train_x, train_y, test_x, test_y = digit_features
    ours = fit_logistic_regression(train_x, train_y, 10, l2)
    theirs = sklearn_head(train_x, train_y, l2)
    assert abs(ours.accuracy(test_x, test_y) - 100.0 * theirs.score(test_x.numpy(), test_y.numpy())) <= 1.0
    agreement = (ours.predict(test_x).numpy() == theirs.predict(test_x.numpy())).mean()
    assert agreement >= 0.99
    if l2 >= 1e-3:  # well-conditioned: the same minimiser, not just the same accuracy
        np.testing.assert_allclose(ours.weight.numpy(), theirs.coef_, atol=0.02 * np.abs(theirs.coef_).max())


def test_probe_picks_l2_on_held_out_train_like_scikit_learn_and_is_deterministic(digit_features):
    train_x, train_y, test_x, test_y = digit_features
    train_x, train_y = train_x[:600], train_y[:600]  # a smaller train split keeps the 10 fits quick
    grid = L2_GRID[:4]
    result = linear_probe(train_x, train_y, test_x, test_y, l2_grid=grid, seed=3)
    assert set(result.held_out_top1) == set(grid) and result.l2 in grid
    assert result.held_out_top1[result.l2] == max(result.held_out_top1.values())
    # the same selection with scikit-learn: same split, same grid, refit on all of train
    fit, held = held_out_split(len(train_x), 0.1, seed=3)
    assert len(held) == 60 and not set(fit.tolist()) & set(held.tolist())
    sk_scores = {l2: sklearn_head(train_x[fit], train_y[fit], l2).score(train_x[held].numpy(), train_y[held].numpy())
                 for l2 in grid}
    sk_best = max(grid, key=lambda v: (sk_scores[v], v))
    sk_top1 = 100.0 * sklearn_head(train_x, train_y, sk_best).score(test_x.numpy(), test_y.numpy())
    assert abs(result.top1 - sk_top1) <= 1.0, (result, sk_best, sk_top1)
    assert 85.0 < result.top1 < 100.0
    # deterministic for a seed; another seed holds out other images
    assert linear_probe(train_x, train_y, test_x, test_y, l2_grid=grid, seed=3) == result
    assert not torch.equal(held_out_split(len(train_x), 0.1, seed=4)[1], held)


def test_probe_cli_writes_metrics_and_protocol(teacher_checkpoint, data_root, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "probe.json"
    argv = ["--checkpoint", str(teacher_checkpoint), "--teacher", "--cifar10", str(data_root), "--cifar100",
            str(data_root), "--pooling", "cls+mean", "--layer", "-1", "--seed", "5", "--l2-grid", "0.1", "0.001",
            "--held-out", "0.2", "--json", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    table = capsys.readouterr().out
    for name in ("cifar10", "cifar100"):
        # three noisy colour classes: a linear head separates them
        assert result[f"{name}_linear_top1"] == 100.0 and "linear_top1" in table
        assert result[f"{name}_probe"]["l2"] in (0.1, 0.001)
        assert result[f"{name}_probe"]["feature_dim"] == 64  # cls+mean of a 32-wide model
    protocol = result["protocol"]
    assert protocol["pooling"] == "cls+mean" and protocol["layer"] == -1 and protocol["weights"] == "model"
    assert protocol["l2_grid"] == [0.1, 0.001] and protocol["held_out_fraction"] == 0.2 and protocol["seed"] == 5
    assert protocol["standardize"] is True and protocol["dtype"] == "float32" and protocol["model"] == "teacher"
    assert (protocol["sets"]["cifar10"]["memory_size"], protocol["sets"]["cifar10"]["query_size"]) == (20, 9)
    assert protocol["sets"]["cifar100"]["normalization_mean"] == [0.485, 0.456, 0.406]
    # deterministic: the same command gives the same file, apart from the time it took
    again = tmp_path / "again.json"
    assert main(argv[:-5] + ["--json", str(again), "--device", "cpu", "--no-progress"]) == 0
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(json.loads(again.read_text())) == strip(result)


@pytest.mark.parametrize("args, message", [
    ([], "pass at least one of --cifar10 DIR"),
    (["--cifar10", "{data}", "--layer", "-5"], "--layer -5: the teacher has 1 blocks"),
    (["--cifar10", "{data}", "--limit", "1"], "cifar10: 1 training items cannot be split"),
])
def test_probe_errors_are_one_line(teacher_checkpoint, data_root, capsys, args, message):  # noqa: F811
    argv = ["--checkpoint", str(teacher_checkpoint), "--teacher", "--no-progress", "--device", "cpu"]
    assert main(argv + [a.format(data=data_root) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_probe_module_entry_point_shows_help():
    proc = subprocess.run([sys.executable, "-m", "fairseq_mmkd.probe", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--l2-grid" in proc.stdout, proc.stderr
