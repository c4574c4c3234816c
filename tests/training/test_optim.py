"""The plugin's ``torch_adamw`` optimizer (seed config): fairseq's AdamW update and clipping, in fused kernels."""
import math

import pytest
import torch
from fairseq import utils
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

import fairseq_mmkd  # noqa: F401  (registers torch_adamw)
from fairseq_mmkd.optim.torch_adamw import TorchAdamW, TorchAdamWConfig


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(32, 16), (16,), (8, 32, 3), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) * (1 + step) for p in params]


def _train(opt_cls, cfg_cls, eps, steps=6, clip=0.0, lr_schedule=(1e-3, 5e-4, 2e-3)):
    params = _params()
    opt = opt_cls(cfg_cls(adam_betas="(0.9, 0.98)", adam_eps=eps, weight_decay=0.01, lr=[1e-3]), params)
    for s in range(steps):
        for p, g in zip(params, _grads(s, params)):
            p.grad = g
        opt.set_lr(lr_schedule[s % len(lr_schedule)])
        opt.multiply_grads(0.5)
        if clip:
            opt.clip_grad_norm(clip)
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("eps", [1e-6, 1e-8])
@pytest.mark.parametrize("clip", [0.0, 2.0])
def test_torch_adamw_is_fairseqs_adam_update(clip, eps):
    """The same weights as fairseq's adam after several updates with a changing learning rate, weight decay,
    clipping, and the seed's epsilon (whose placement differs between PyTorch and fairseq: compensated)."""
    ours, opt = _train(TorchAdamW, TorchAdamWConfig, eps=eps, clip=clip)
    theirs, _ = _train(FairseqAdam, FairseqAdamConfig, eps=eps, clip=clip)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert opt.implementation == "fused"  # fp32 on CPU: PyTorch's fused kernel


def test_tiny_gradients_get_fairseqs_damped_first_updates():
    """Where gradients are as small as epsilon, plain PyTorch AdamW would move a parameter by ~lr at once;
    fairseq's placement (kept here) damps the first updates. Same result as fairseq's adam."""
    def run(opt_cls, cfg_cls):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = opt_cls(cfg_cls(adam_betas="(0.9, 0.98)", adam_eps=1e-6, weight_decay=0.0, lr=[1e-3]), [p])
        p.grad = torch.full((4,), 2e-7)
        opt.step()
        return p.detach()

    ours, theirs = run(TorchAdamW, TorchAdamWConfig), run(FairseqAdam, FairseqAdamConfig)
    plain = torch.nn.Parameter(torch.zeros(4))
    plain.grad = torch.full((4,), 2e-7)
    torch.optim.AdamW([plain], lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0).step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert ours.abs().max() < 0.5 * plain.detach().abs().max()


def test_clipping_matches_fairseqs_norm_and_scaling():
    params = _params()
    opt = TorchAdamW(TorchAdamWConfig(lr=[1e-3]), params)
    grads = _grads(3, params)
    reference = [g.clone() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ref_params, reference):
        p.grad = g

    norm = opt.clip_grad_norm(2.0)
    ref_norm = utils.clip_grad_norm_(ref_params, 2.0)

    torch.testing.assert_close(norm, ref_norm)
    assert norm > 2.0  # the clipping really happened
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad)
    assert math.isclose(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))), 2.0,
                        rel_tol=1e-4)


def test_optimizer_state_round_trips_through_a_state_dict():
    """A resumed optimizer continues exactly: moments, PyTorch's step and the update count for epsilon."""
    params, opt = _train(TorchAdamW, TorchAdamWConfig, eps=1e-6, steps=3)
    fresh = TorchAdamW(TorchAdamWConfig(adam_betas="(0.9, 0.98)", adam_eps=1e-6, weight_decay=0.01, lr=[7e-4]), params)
    fresh.load_state_dict(opt.state_dict(), {"lr": 7e-4})
    assert fresh.get_lr() == 7e-4 and fresh.param_groups[0]["fairseq_step"] == 3
    for s_old, s_new in zip(opt.optimizer.state.values(), fresh.optimizer.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s_old[key], s_new[key])


def test_foreach_implementation_can_be_chosen():
    params = _params()
    opt = TorchAdamW(TorchAdamWConfig(lr=[1e-3], implementation="foreach"), params)
    assert opt.implementation == "foreach" and opt.optimizer.defaults["foreach"] is True


def test_optimizer_state_of_other_parameters_is_refused_in_one_line():
    """A checkpoint whose optimizer held more tensors (a run started before the gradient-free parameters were
    frozen) is refused with the setting that resumes it, before PyTorch's own error."""
    cfg = TorchAdamWConfig(adam_betas="(0.9, 0.98)", adam_eps=1e-6, weight_decay=0.01, lr=[1e-3])
    old = TorchAdamW(cfg, _params())
    new = TorchAdamW(cfg, _params()[:3])
    with pytest.raises(ValueError, match=r"for 4 parameter tensors, this run trains 3.*model.optimize_gradient_free=true"):
        new.load_state_dict(old.state_dict())
    TorchAdamW(cfg, _params()).load_state_dict(old.state_dict())  # the same parameters load
