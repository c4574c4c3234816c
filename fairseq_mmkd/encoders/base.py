"""What every modality encoder shares: its output type and the context encoder (norm + prenet blocks)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ..modules.layers import AttentionMasks


class EncoderOutput(NamedTuple):
    """What a modality encoder hands to the shared blocks.

    Attributes:
        x: ``[B, T, D]``, the sequence entering the first shared block (extra tokens first).
        padding_mask: bool ``[B, T]`` at sequence resolution, True at padded positions; None when nothing in
            the batch is padded (images never are).
        alibi_bias: fp32 ``[B, H', T, T]`` additive attention bias for every shared block (audio's ALiBi), or
            None. Already multiplied by its learned scale unless ``alibi_scale`` is given.
        alibi_scale: ``[L, H' or 1]`` per-shared-block scale of ``alibi_bias`` (checkpoints trained with
            ``learned_alibi_scale_per_layer``), or None.
    """

    x: torch.Tensor
    padding_mask: Optional[torch.Tensor] = None
    alibi_bias: Optional[torch.Tensor] = None
    alibi_scale: Optional[torch.Tensor] = None

    def masks(self, num_heads: int) -> AttentionMasks:
        """The per-block ``attn_mask`` of the shared blocks for this batch."""
        return AttentionMasks(self.padding_mask, self.alibi_bias, self.alibi_scale, num_heads)


class ContextEncoder(nn.Module):
    """fairseq's ``BlockEncoder`` at inference: LayerNorm (post-LN models) then the "prenet" blocks.

    Prenet blocks see the same padding mask and ALiBi bias as the shared blocks; with per-layer ALiBi
    scales they use the first ``len(blocks)`` of them.
    """

    def __init__(self, blocks: nn.ModuleList, norm: Optional[nn.Module]):
        super().__init__()
        self.norm = norm
        self.blocks = blocks

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                alibi_bias: Optional[torch.Tensor] = None, alibi_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if len(self.blocks):
            masks = AttentionMasks(padding_mask, alibi_bias, alibi_scale, self.blocks[0].attn.num_heads)
            for i, blk in enumerate(self.blocks):
                x, _ = blk(x, masks(i))
        return x
