"""Linear probe on frozen features: multinomial logistic regression, trained full-batch with L-BFGS.

The head is a softmax classifier ``W x + b`` minimising the mean cross-entropy plus ``l2 / 2 * ||W||^2`` (the
bias is not penalised): scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` objective, solved in torch on
whatever device the features are on. Its L2 strength is picked from a small grid by the top-1 accuracy on a
held-out part of the training features; the head is then refitted on all of them. Nothing here knows where
the features came from (any modality).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclass
class LogisticHead:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    iterations: int = 0

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in percent, a Python float."""
        return float((self.predict(features) == labels).double().mean().item() * 100.0)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                            max_iter: int = 1000, init: Optional[LogisticHead] = None) -> LogisticHead:
    """Minimise ``mean cross-entropy + l2 / 2 * ||W||^2`` over ``W [C, D]`` and ``b [C]`` with L-BFGS.

    Full batch on the features' device, float32, strong-Wolfe line search; starts from zero (or ``init``) so
    the result depends only on the data. Stops after ``max_iter`` iterations or when the gradient's largest
    entry falls below 1e-6 or the loss stops changing.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x, y = features.float(), labels.to(features.device).long()
    if init is None:
        weight = torch.zeros(num_classes, x.shape[1], device=x.device)
        bias = torch.zeros(num_classes, device=x.device)
    else:
        weight, bias = init.weight.detach().clone(), init.bias.detach().clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            history_size=20, tolerance_grad=1e-6, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))
    return LogisticHead(weight.detach(), bias.detach(), iterations)


def held_out_split(num: int, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a seeded random ``fraction`` of ``range(num)`` held out (at least 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    held = max(1, int(round(fraction * num)))
    if held >= num:
        raise ValueError(f"{num} training items cannot be split into a fit part and a {fraction:.0%} held-out part")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return perm[held:].sort().values, perm[:held].sort().values


@dataclass
class ProbeResult:
    top1: float  # test accuracy of the head refitted on all training features, percent
    l2: float  # the chosen L2 strength
    held_out_top1: Dict[float, float] = field(default_factory=dict)  # grid value -> held-out accuracy
    iterations: int = 0  # L-BFGS iterations of the final fit


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 l2_grid: Sequence[float] = L2_GRID, held_out: float = 0.1, seed: int = 0,
                 max_iter: int = 1000) -> ProbeResult:
    """Pick the L2 strength on a held-out part of the training features, refit on all, evaluate on test.

    The grid is visited from the strongest to the weakest L2, each fit starting from the previous solution
    (the path is deterministic); ties in held-out accuracy go to the stronger L2. Features should already
    be standardised (the caller decides with which statistics).
    """
    if not l2_grid:
        raise ValueError("l2_grid is empty")
    device = train_x.device
    train_y, test_y = train_y.to(device).long(), test_y.to(device).long()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    fit, held = (i.to(device) for i in held_out_split(len(train_x), held_out, seed))
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    scores, head = {}, None
    for l2 in grid:
        head = fit_logistic_regression(train_x[fit], train_y[fit], num_classes, l2, max_iter, init=head)
        scores[l2] = head.accuracy(train_x[held], train_y[held])
    best = max(grid, key=lambda v: (scores[v], v))
    final = fit_logistic_regression(train_x, train_y, num_classes, best, max_iter)
    return ProbeResult(final.accuracy(test_x, test_y), best, scores, final.iterations)
