"""A data2vec 2.0 encoder for inference: modality encoder + shared transformer blocks.

This is the teacher side of distillation and the target of student export. It reproduces fairseq's
``Data2VecMultiModel`` forward without masking (the ``features_only`` path for the online weights, the
EMA-teacher path for ``_ema`` weights; both are the same computation) and exposes every intermediate that
distillation needs. Sizes come from the checkpoint (``D2vConfig.from_fairseq``), never from constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..encoders import EncoderOutput, get_encoder_class
from ..modules.layers import Block
from ..modules.targets import TargetConfig, make_targets


@dataclass
class D2vConfig:
    """Architecture of a data2vec2 encoder (the fields of fairseq's ``cfg.model`` that matter here)."""

    modality: str = "image"
    embed_dim: int = 768
    depth: int = 10
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    norm_affine: bool = True
    layer_norm_first: bool = False
    end_of_block_targets: bool = False
    encoder: Any = None  # the modality encoder's Config; None means its defaults
    targets: TargetConfig = field(default_factory=TargetConfig)
    # LayerNorm eps of the modality encoder (its context LayerNorm and prenet blocks) where it differs from the
    # shared blocks' norm_eps: a multimodal export keeps each teacher's own (data2vec2 has one eps per model).
    # In files: cfg.model.modalities.<modality>.norm_eps, a key fairseq's own code drops. None: norm_eps.
    encoder_norm_eps: Optional[float] = None

    def __post_init__(self):
        if self.encoder is None:
            self.encoder = get_encoder_class(self.modality).Config()

    @classmethod
    def from_fairseq(cls, model_cfg: dict, modality: str = "image", state: Optional[dict] = None) -> "D2vConfig":
        """Build from a checkpoint's ``cfg['model']`` (a plain dict) and, for what the cfg does not hold (the text
        vocabulary size), its fairseq-named weights ``state``."""
        return cls(
            modality=modality,
            embed_dim=int(model_cfg.get("embed_dim", 768)),
            depth=int(model_cfg.get("depth", 8)),
            num_heads=int(model_cfg.get("num_heads", 12)),
            mlp_ratio=float(model_cfg.get("mlp_ratio", 4.0)),
            norm_eps=float(model_cfg.get("norm_eps", 1e-6)),
            norm_affine=bool(model_cfg.get("norm_affine", True)),
            layer_norm_first=bool(model_cfg.get("layer_norm_first", False)),
            end_of_block_targets=bool(model_cfg.get("end_of_block_targets", False)),
            encoder=get_encoder_class(modality).config_from_fairseq(model_cfg, state),
            targets=TargetConfig.from_fairseq(model_cfg),
            encoder_norm_eps=_optional_float(((model_cfg.get("modalities") or {}).get(modality) or {}).get("norm_eps")),
        )

    @property
    def encoder_eps(self) -> float:
        """The LayerNorm eps the modality encoder is built with."""
        return self.norm_eps if self.encoder_norm_eps is None else self.encoder_norm_eps

    def make_block(self, drop_path: float = 0.0, preln_upstream_quirk: bool = True,
                   norm_eps: Optional[float] = None) -> Block:
        return Block(self.embed_dim, self.num_heads, self.mlp_ratio,
                     norm_eps=self.norm_eps if norm_eps is None else norm_eps,
                     norm_affine=self.norm_affine, layer_norm_first=self.layer_norm_first,
                     ffn_targets=not self.end_of_block_targets, drop_path=drop_path,
                     preln_upstream_quirk=preln_upstream_quirk)


def _optional_float(value) -> Optional[float]:
    return None if value is None else float(value)


class D2vModel(nn.Module):
    """data2vec2 encoder: ``encoder`` (modality-specific), ``blocks`` (shared), ``norm`` (pre-LN only).

    Calling it on a batch (images: normalised float ``[B, C, H, W]``; text: int64 token ids ``[B, T]``; audio:
    float samples ``[B, L]``), optionally with a ``padding_mask`` (bool, True at padding: ``[B, T]`` tokens for
    text, ``[B, L]`` samples for audio; text derives it from the pad token when it is not given), returns:
        ``encoder_out``: ``[B, T, D]``, the sequence entering the first shared block (extra tokens first).
        ``layer_results``: per shared block ``[B, T, D]``, what data2vec2 builds targets from (FFN output,
            or block output with ``end_of_block_targets``), extra tokens included.
        ``block_out``: per shared block, the residual stream after the block.
        ``x``: final features, ``block_out[-1]`` followed by the final LayerNorm of pre-LN models
            (what fairseq's ``extract_features`` returns, extra tokens included).
        ``padding_mask``: bool ``[B, T]`` at sequence resolution (tokens, audio frames), True at padding; None
            when nothing is padded. Outputs at padded positions are computed but meaningless.
    """

    def __init__(self, cfg: D2vConfig):
        super().__init__()
        self.cfg = cfg
        make_block = partial(cfg.make_block, preln_upstream_quirk=True)
        self.encoder = get_encoder_class(cfg.modality)(
            cfg.encoder, cfg.embed_dim, partial(make_block, norm_eps=cfg.encoder_eps), norm_eps=cfg.encoder_eps,
            norm_affine=cfg.norm_affine, layer_norm_first=cfg.layer_norm_first)
        self.blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.norm = (nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
                     if cfg.layer_norm_first else None)

    @property
    def num_extra_tokens(self) -> int:
        return self.encoder.num_extra_tokens

    def forward_blocks(self, enc: EncoderOutput) -> dict:
        """Run the shared blocks on an encoder output; see the class docstring for the keys."""
        layer_results, block_out = [], []
        masks, x = enc.masks(self.cfg.num_heads), enc.x
        for i, blk in enumerate(self.blocks):
            x, target = blk(x, masks(i))
            layer_results.append(target)
            block_out.append(x)
        final = self.norm(x) if self.norm is not None else x
        return {"layer_results": layer_results, "block_out": block_out, "x": final}

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> dict:
        enc = self.encoder(source, padding_mask)
        pm = enc.padding_mask
        return {"encoder_out": enc.x, **self.forward_blocks(enc),
                "padding_mask": pm if pm is not None and bool(pm.any()) else None}

    def make_targets(self, layer_results: Sequence[torch.Tensor], include_extra_tokens: bool = False,
                     cfg: Optional[TargetConfig] = None, padding_mask: Optional[torch.Tensor] = None,
                     **overrides) -> torch.Tensor:
        """data2vec2 targets from ``layer_results`` (fp32 ``[B, T', D]``).

        Defaults to the checkpoint's own target settings; ``cfg`` or keyword ``overrides`` (any
        ``TargetConfig`` field) change them. Extra tokens are dropped first, as data2vec2 does, unless
        ``include_extra_tokens`` is set (then the per-layer norms see them too). With a ``padding_mask``
        (sequence resolution, as the forward returns it) the normalisations use valid positions only and the
        targets are 0 at padding; fairseq's own ``make_targets`` includes the pads in its instance norms.
        """
        cfg = replace(cfg or self.cfg.targets, **overrides)
        if not include_extra_tokens:
            n = self.num_extra_tokens
            layer_results = [y[:, n:] for y in layer_results]
            padding_mask = padding_mask[:, n:] if padding_mask is not None else None
        return make_targets(layer_results, cfg, padding_mask)
