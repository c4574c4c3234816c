"""The d2v_kd model and criterion through fairseq's own builders, one training step at a time."""
from __future__ import annotations

import pytest
import torch

import fairseq_mmkd  # noqa: F401  (registers the plugin)
from fairseq_mmkd.distill.distiller import teacher_block_indices
from fairseq_mmkd.losses.regression import distillation_loss
from fairseq_mmkd.modules.targets import TargetConfig

from conftest import make_teacher


def build(teacher_path, **model_overrides):
    from fairseq import models
    from fairseq.criterions import build_criterion
    from omegaconf import OmegaConf

    from fairseq_mmkd.criterions.d2v_kd import D2vKDCriterionConfig
    from fairseq_mmkd.models.d2v_kd import D2vKDModelConfig

    model_overrides.setdefault("student_depth", 2)  # the tiny teacher has 4 shared blocks
    cfg = OmegaConf.structured(D2vKDModelConfig(teacher_checkpoint=str(teacher_path), **model_overrides))
    cfg._name = "d2v_kd"
    model = models.build_model(cfg, task=None)
    crit_cfg = OmegaConf.structured(D2vKDCriterionConfig())
    crit_cfg._name = "d2v_kd"
    criterion = build_criterion(crit_cfg, task=None)
    return model, criterion


def sample(batch=3, size=32):
    torch.manual_seed(0)
    return {"net_input": {"source": torch.randn(batch, 3, size, size)}, "nsamples": batch, "num_replaced": 0}


def test_only_the_student_learns(tiny_teacher):
    model, criterion = build(tiny_teacher)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("distiller.student_blocks.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    loss, sample_size, log = criterion(model, sample())
    (loss / sample_size).backward()
    # FFN-output targets: the last student block's closing LayerNorm feeds no prediction, as in data2vec2
    unused = "distiller.student_blocks.1.norm2."
    for n, p in model.named_parameters():
        if n.startswith(("distiller.shared_encoder.", "distiller.teacher_blocks.", unused)):
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n


def test_shared_encoder_runs_once_per_step_and_stays_in_eval(tiny_teacher):
    model, criterion = build(tiny_teacher, drop_path=0.1)
    calls = []
    model.distiller.shared_encoder.register_forward_hook(lambda *a: calls.append(1))
    model.train()  # fairseq calls this every step
    assert not model.distiller.shared_encoder.training
    assert not any(m.training for m in model.distiller.teacher_blocks.modules())
    assert model.distiller.student_blocks.training
    criterion(model, sample())
    assert len(calls) == 1


def test_teacher_targets_do_not_depend_on_train_mode(tiny_teacher):
    model, criterion = build(tiny_teacher, drop_path=0.3)
    x = sample()["net_input"]["source"]
    model.train()
    a = model(x)["teacher_layer_results"]
    model.eval()
    b = model(x)["teacher_layer_results"]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("init,expected", [("teacher_first", [0, 1]), ("teacher_spread", [0, 3]), ("random", [])])
def test_student_init_copies_the_chosen_teacher_blocks(tiny_teacher, init, expected):
    model, _ = build(tiny_teacher, student_depth=2, student_init=init)
    d = model.distiller
    assert teacher_block_indices(init, 2, 4) == expected
    for s, t in enumerate(expected):
        for (name, a), b in zip(d.student_blocks[s].state_dict().items(), d.teacher_blocks[t].state_dict().values()):
            assert torch.equal(a, b), name
    if init == "random":
        assert not torch.equal(d.student_blocks[0].attn.qkv.weight, d.teacher_blocks[0].attn.qkv.weight)


def test_student_from_the_teachers_blocks_reproduces_its_targets(tmp_path):
    """With all teacher blocks copied, the layer-average prediction equals the target: zero loss."""
    teacher = make_teacher(tmp_path / "t.pt")
    model, criterion = build(teacher, student_depth=4, student_init="teacher_first")
    model.eval()
    loss, sample_size, log = criterion(model, sample())
    assert float(loss) / sample_size < 1e-10
    assert float(log["target_var"]) == pytest.approx(float(log["pred_var"]), rel=1e-4)


@pytest.mark.parametrize("prediction", ["layer_average", "head"])
@pytest.mark.parametrize("include_extra_tokens", [True, False])
def test_loss_is_the_mse_over_all_regressed_timesteps(tiny_teacher, prediction, include_extra_tokens):
    model, _ = build(tiny_teacher, prediction=prediction)
    d = model.distiller
    out = model(sample()["net_input"]["source"])
    cfg = TargetConfig(average_top_k_layers=3)
    result = distillation_loss(d, out, cfg, include_extra_tokens)
    tokens = 17 if include_extra_tokens else 16
    assert result["sample_size"] == 3 * tokens * 32
    n = 0 if include_extra_tokens else 1
    from fairseq_mmkd.modules.targets import make_targets

    y = make_targets([t[:, n:] for t in out["teacher_layer_results"]], cfg)
    if prediction == "head":
        pred = d.head(out["student_x"][:, n:])
    else:
        pred = make_targets([t[:, n:] for t in out["student_layer_results"]],
                            TargetConfig(average_top_k_layers=min(3, len(out["student_layer_results"]))))
    torch.testing.assert_close(result["loss_sum"] / result["sample_size"], torch.nn.functional.mse_loss(pred, y))


def test_criterion_target_overrides_replace_the_teachers_settings(tiny_teacher):
    from fairseq_mmkd.criterions.d2v_kd import D2vKDCriterionConfig, resolve_target_config

    teacher = TargetConfig(average_top_k_layers=3, instance_norm_target_layer=True, layer_norm_targets=True)
    assert resolve_target_config(D2vKDCriterionConfig(), teacher) == teacher
    got = resolve_target_config(D2vKDCriterionConfig(average_top_k_layers=2, layer_norm_targets=False), teacher)
    assert got == TargetConfig(average_top_k_layers=2, instance_norm_target_layer=True, layer_norm_targets=False)


@pytest.mark.parametrize("depth,init", [(0, "random"), (5, "teacher_first"), (5, "teacher_spread")])
def test_impossible_student_depths_fail_clearly(tiny_teacher, depth, init):
    with pytest.raises(ValueError, match="student_depth"):
        build(tiny_teacher, student_depth=depth, student_init=init)


def test_model_compile_switch_keeps_the_loss_and_gradients(tiny_teacher, monkeypatch):
    """`model.compile=true` wraps forward + loss in torch.compile; the numbers must not change. (Inductor
    itself is exercised on the GPU benchmark; here dynamo traces with the eager backend to stay fast.)"""
    eager, criterion = build(tiny_teacher)
    calls = []
    real_compile = torch.compile

    def tracing_compile(fn, **kw):
        calls.append(fn)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", tracing_compile)
    compiled, _ = build(tiny_teacher, compile=True)
    assert len(calls) == 1
    compiled.load_state_dict(eager.state_dict())
    s = sample()
    results = []
    for m in (eager, compiled):
        m.train()
        loss, size, log = criterion(m, s)
        (loss / size).backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)



@pytest.mark.parametrize("optimize_gradient_free", [False, True])
def test_gradient_free_parameters_leave_training_unless_kept(tiny_teacher, optimize_gradient_free):
    """Between building the criterion and the optimizer (what the task's build_criterion does), the tensors the
    loss gives no gradient stop requiring one; model.optimize_gradient_free=true keeps them, as before."""
    from fairseq_mmkd.tasks._checks import freeze_gradient_free

    model, criterion = build(tiny_teacher, optimize_gradient_free=optimize_gradient_free)
    freeze_gradient_free(model, criterion)
    frozen = {n for n, p in model.named_parameters() if n.startswith("distiller.student_") and not p.requires_grad}
    expected = {"distiller.student_blocks.1.norm2.weight", "distiller.student_blocks.1.norm2.bias",
                "distiller.student_blocks.1.mlp.fc2.bias"}
    assert frozen == (set() if optimize_gradient_free else expected)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    loss, sample_size, _ = criterion(model, sample())
    (loss / sample_size).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen or not p.requires_grad:
            assert torch.equal(p, before[n]), n
        elif p.grad is not None:  # kept in the optimizer: what has a gradient moves
            assert not torch.equal(p, before[n]), n
