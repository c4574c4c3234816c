"""Transformer building blocks of data2vec 2.0 (Baevski et al., 2022), state-dict compatible with fairseq.

The parameter names (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``, ``norm2``) match
fairseq's ``AltBlock`` so that released checkpoints load without renaming. Attention runs through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU); fairseq's manual fp32
softmax differs from it by ~1e-6 in fp32.

Text and audio need two more things in attention, both given to a block as one ``attn_mask``
(built once per batch by :func:`attention_mask`, see there): a key padding mask (padded keys get no
weight; padded queries still produce outputs, which callers ignore) and, for audio, an additive ALiBi
bias. As in fairseq's ``AltAttention``, a bias makes the logits, the bias add and the softmax fp32 even
under bf16; without a bias (images, text) attention keeps the compute dtype. Images pass no mask, which
keeps the fastest SDPA kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Args:
        dim: embedding dimension (must be divisible by ``num_heads``).
        num_heads: number of attention heads.
        qkv_bias: whether the qkv projection has a bias (data2vec2 uses True).
        attn_drop: dropout on attention probabilities (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        if attn_mask is None:  # images: no padding, no bias
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        elif attn_mask.dtype == torch.bool:  # key padding only: keeps the compute dtype
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        else:  # additive fp32 bias (ALiBi, with -inf at padded keys): logits and softmax in fp32
            x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                               dropout_p=dropout_p).to(q.dtype)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


def attention_mask(padding_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   num_heads: int) -> Optional[torch.Tensor]:
    """The ``attn_mask`` a :class:`Block` takes, built once per batch (and per bias scale).

    Args:
        padding_mask: bool ``[B, T]``, True at padded positions, or None.
        bias: fp32 ``[B, H', T, T]`` additive bias for the first ``H' <= num_heads`` heads (fairseq adds the
            ALiBi bias to ``attn[:, :H']``), or None.
        num_heads: heads of the blocks.

    Returns:
        None (nothing to mask: the plain SDPA call), a bool ``[B, 1, 1, T]`` keep-mask (padding only), or an
        fp32 ``[B, H, T, T]`` additive mask (the bias, with -inf at padded keys).
    """
    if bias is None:
        return None if padding_mask is None else ~padding_mask[:, None, None, :]
    bias = bias.float()
    if bias.shape[1] < num_heads:
        bias = F.pad(bias, (0, 0, 0, 0, 0, num_heads - bias.shape[1]))
    if padding_mask is not None:
        bias = bias.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    return bias


class AttentionMasks:
    """Per-block ``attn_mask`` for one batch: one shared mask, or one per block when the ALiBi bias has a
    learned scale per layer (``alibi_scale`` ``[L, H' or 1]``, already clamped at 0)."""

    def __init__(self, padding_mask: Optional[torch.Tensor], alibi_bias: Optional[torch.Tensor],
                 alibi_scale: Optional[torch.Tensor], num_heads: int):
        self.padding_mask, self.alibi_bias, self.alibi_scale = padding_mask, alibi_bias, alibi_scale
        self.num_heads = num_heads
        self.shared = (attention_mask(padding_mask, alibi_bias, num_heads)
                       if alibi_scale is None or alibi_bias is None else None)

    def __call__(self, layer: int) -> Optional[torch.Tensor]:
        if self.alibi_scale is None or self.alibi_bias is None:
            return self.shared
        scale = self.alibi_scale[layer].reshape(1, -1, 1, 1)
        return attention_mask(self.padding_mask, self.alibi_bias * scale.type_as(self.alibi_bias), self.num_heads)


class Mlp(nn.Module):
    """Two-layer feed-forward network with exact GELU (timm's ``Mlp`` layout)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """data2vec 2.0 transformer block; returns ``(output, target)``.

    The target is what data2vec2 builds its regression targets from: the FFN output (the default,
    ``ffn_targets=True``) or the block output (``end_of_block_targets`` in fairseq's config).

    Post-LN (``layer_norm_first=False``, every released image model)::

        x = norm1(x + attn(x)); f = mlp(x); out = norm2(x + f)

    Pre-LN (``layer_norm_first=True``)::

        x = x + attn(norm1(x)); f = mlp(norm2(x)); out = x + f

    fairseq's pre-LN block drops the residual stream after the MLP (``out = f + f`` in eval). Teachers
    loaded from checkpoints keep that behaviour (``preln_upstream_quirk=True``) so their outputs are
    the ones the checkpoint was trained with; new students are built without it.

    Args:
        dim: embedding dimension.
        num_heads: attention heads.
        mlp_ratio: hidden size of the MLP as a multiple of ``dim``.
        norm_eps: LayerNorm epsilon (data2vec2: 1e-6).
        norm_affine: whether LayerNorms have affine parameters.
        layer_norm_first: pre-LN instead of post-LN.
        ffn_targets: return the FFN output as target (else the block output).
        drop: dropout after the attention projection (fairseq ``encoder_dropout``).
        attn_drop: attention-probability dropout.
        mlp_drop: dropout inside the MLP (fairseq ``activation_dropout``).
        post_mlp_drop: dropout on the MLP branch before the residual add.
        drop_path: stochastic-depth rate.
        preln_upstream_quirk: reproduce fairseq's pre-LN residual drop (see above).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 norm_affine: bool = True, layer_norm_first: bool = False, ffn_targets: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, mlp_drop: float = 0.0,
                 post_mlp_drop: float = 0.0, drop_path: float = 0.0, preln_upstream_quirk: bool = False):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.ffn_targets = ffn_targets
        self.preln_upstream_quirk = preln_upstream_quirk
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=mlp_drop)
        self.post_mlp_dropout = nn.Dropout(post_mlp_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``attn_mask``: None, or what :func:`attention_mask` builds (padding and/or ALiBi bias)."""
        if self.layer_norm_first:
            x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
            f = self.mlp(self.norm2(x))
            residual = f if self.preln_upstream_quirk else x
            out = residual + self.drop_path(self.post_mlp_dropout(f))
        else:
            x = self.norm1(x + self.drop_path(self.attn(x, attn_mask)))
            f = self.mlp(x)
            out = self.norm2(x + self.drop_path(self.post_mlp_dropout(f)))
        return out, (f if self.ffn_targets else out)
