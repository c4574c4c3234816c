"""Padding masks and attention biases through the blocks, the targets and the distillation loss.

fairseq's ``AltAttention`` masks padded keys with -inf and, when an ALiBi bias is given, casts the logits to
fp32 before adding it. The plugin does both through ``scaled_dot_product_attention`` and keeps the image
path's plain call; the loss then leaves padded positions out entirely.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig, make_targets
from fairseq_mmkd.modules import layers
from fairseq_mmkd.distill.distiller import Distiller
from fairseq_mmkd.encoders.text import TextEncoderConfig
from fairseq_mmkd.losses.regression import distillation_loss
from fairseq_mmkd.modules.layers import Attention, attention_mask


def manual_attention(attn: Attention, x, padding_mask=None, bias=None):
    """fairseq's ``AltAttention.forward`` written out, in fp32."""
    B, N, C = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4).float().unbind(0)
    logits = (q * (C // h) ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits[:, :bias.shape[1]] += bias
    if padding_mask is not None:
        logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out.to(x.dtype))


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(32, 4).eval()


def test_padding_and_partial_head_bias_match_fairseqs_formula(attn):
    x = torch.randn(3, 10, 32)
    pm = torch.zeros(3, 10, dtype=torch.bool)
    pm[1, 7:] = pm[2, 4:] = True
    bias = torch.randn(3, 2, 10, 10)  # ALiBi on the first 2 of 4 heads only, as num_alibi_heads < num_heads allows
    for mask, b in ((pm, None), (None, bias), (pm, bias)):
        ours = attn(x, attention_mask(mask, b, attn.num_heads))
        assert torch.allclose(ours, manual_attention(attn, x, mask, b), atol=1e-5)


def test_padded_keys_get_no_weight(attn):
    """What follows a sequence's end cannot change its valid outputs."""
    x = torch.randn(2, 12, 32)
    pm = torch.zeros(2, 12, dtype=torch.bool)
    pm[:, 8:] = True
    y = x.clone()
    y[:, 8:] = 100 * torch.randn(2, 4, 32)
    a = attn(x, attention_mask(pm, None, 4))[:, :8]
    b = attn(y, attention_mask(pm, None, 4))[:, :8]
    assert torch.allclose(a, b, atol=1e-6)


def test_bias_makes_logits_fp32_under_bf16(attn):
    """ALiBi biases reach hundreds on long clips; in bf16 they would lose whole units. With a bias the plugin
    computes logits and softmax in fp32 (fairseq: ``attn.type_as(alibi_bias)``), so bf16 weights give what fp32
    attention gives on the same bf16 projections; bf16 attention with a bf16 bias does not."""
    attn = attn.to(torch.bfloat16)
    x = torch.randn(2, 64, 32).to(torch.bfloat16)
    pos = torch.arange(64)
    bias = (-4.0 * (pos[None] - pos[:, None]).abs().float() + 0.37)[None, None].expand(2, 4, -1, -1)
    reference = manual_attention(attn, x, None, bias).float()
    ours = attn(x, attention_mask(None, bias, 4)).float()
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 4, C // 4).permute(2, 0, 3, 1, 4).unbind(0)
    naive = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(torch.bfloat16))
    naive = attn.proj(naive.transpose(1, 2).reshape(B, N, C)).float()
    err_ours, err_naive = (ours - reference).abs().max(), (naive - reference).abs().max()
    assert err_ours < 0.05 * err_naive, (err_ours, err_naive)


def test_images_keep_the_unmasked_attention_call(monkeypatch):
    """The image path must not get slower: its blocks call SDPA exactly as before, with no mask."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    from fairseq_mmkd.encoders.image import ImageEncoderConfig

    model = D2vModel(D2vConfig(embed_dim=32, depth=2, num_heads=4,
                               encoder=ImageEncoderConfig(input_size=16, patch_size=8, embed_dim=32, prenet_depth=1)))
    model(torch.randn(2, 3, 16, 16))
    assert calls == [None, None, None]  # 1 prenet + 2 shared blocks, no mask


def text_distiller(seed=0):
    cfg = D2vConfig(modality="text", embed_dim=32, depth=3, num_heads=4, norm_eps=1e-5,
                    encoder=TextEncoderConfig(vocab_size=40, max_source_positions=16),
                    targets=TargetConfig(average_top_k_layers=3, instance_norm_target_layer=True,
                                         layer_norm_targets=False))
    torch.manual_seed(seed)
    teacher = D2vModel(cfg).eval()
    return Distiller(teacher, student_depth=2, student_init="random").eval()


def test_loss_leaves_padding_out():
    """A padded text batch's loss is the sum of its sequences' losses alone and the regressed count its valid
    tokens: padding takes no part."""
    distiller = text_distiller()
    lengths = [16, 11, 5]
    tokens = torch.randint(4, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0
    for i, n in enumerate(lengths):
        tokens[i, n:] = 1
    cfg = distiller.cfg.targets
    with torch.no_grad():
        batch = distillation_loss(distiller, distiller(tokens), cfg)
        alone = [distillation_loss(distiller, distiller(tokens[i:i + 1, :n]), cfg) for i, n in enumerate(lengths)]
    assert torch.allclose(batch["loss_sum"], sum(a["loss_sum"] for a in alone), rtol=1e-5)
    assert int(batch["sample_size"]) == sum(lengths) * 32
    unpadded = distillation_loss(distiller, distiller(tokens[:1]), cfg)
    assert unpadded["sample_size"] == 16 * 32  # no padding: a plain count, no device sync


def test_padded_targets_normalise_over_valid_positions():
    y = torch.randn(2, 6, 4)
    pm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    cfg = TargetConfig(average_top_k_layers=1, instance_norm_target_layer=True, layer_norm_targets=False)
    t = make_targets([y], cfg, pm)
    assert torch.allclose(t[1, :4], make_targets([y[1:, :4]], cfg)[0], atol=1e-6)
    assert torch.allclose(t[0], make_targets([y[:1]], cfg)[0], atol=1e-6)
    assert t[1, 4:].abs().max() == 0
    with_batch_norm = TargetConfig(average_top_k_layers=1, batch_norm_target_layer=True,
                                   instance_norm_target_layer=False, layer_norm_targets=False)
    flat = torch.cat([y[0], y[1, :4]])
    expected = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)
    got = make_targets([y], with_batch_norm, pm)
    assert torch.allclose(torch.cat([got[0], got[1, :4]]), expected, atol=1e-5)
