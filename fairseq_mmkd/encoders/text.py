"""data2vec 2.0 text modality encoder: token embedding, learned positions, embedding LayerNorm, prenet.

Mirrors fairseq's ``TextEncoder`` / ``TextLocalEncoder`` (``examples/data2vec/models/modalities/text.py``)
without masking. Parameter names match ``modality_encoders.TEXT.*``. Order of operations:
``embed_scale * embed_tokens(src)`` -> ``+ embed_positions(src)`` (RoBERTa-style learned positions: the
first real token sits at ``pad_idx + 1``, pads at ``pad_idx``) -> ``layernorm_embedding`` (eps 1e-5, not the
model's ``norm_eps``) -> [post-LN with a prenet only] context LayerNorm -> prenet blocks. The released
``nlp_base.pt`` has no prenet, so the embeddings' LayerNorm output enters the shared blocks directly.

The vocabulary size is not in the checkpoint's cfg (fairseq reads it from the task's dictionary); it is
taken from the embedding table's shape. Token ids follow fairseq's ``Dictionary``: ``<s>`` 0, ``<pad>`` 1,
``</s>`` 2, ``<unk>`` 3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .registry import register_encoder
from .base import ContextEncoder, EncoderOutput

TEXT_EMBED_EPS = 1e-5  # fairseq.modules.LayerNorm's default, used by layernorm_embedding


@dataclass
class TextEncoderConfig:
    vocab_size: int = 50265  # rows of embed_tokens (dictionary + <mask>); always read from the checkpoint
    pad_idx: int = 1  # fairseq Dictionary's <pad>
    max_source_positions: int = 512
    scale_embedding: bool = False  # data2vec2: no_scale_embedding=True
    layernorm_embedding: bool = True
    positions: bool = True  # False: no_token_positional_embeddings
    prenet_depth: int = 0
    num_extra_tokens: int = 0

    @property
    def num_position_rows(self) -> int:
        return self.max_source_positions + self.pad_idx + 1


class TextLocalEncoder(nn.Module):
    """Token embedding + learned positions + embedding LayerNorm (fairseq's ``TextLocalEncoder``)."""

    def __init__(self, cfg: TextEncoderConfig, embed_dim: int):
        super().__init__()
        self.pad_idx = cfg.pad_idx
        self.embed_scale = math.sqrt(embed_dim) if cfg.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, embed_dim, padding_idx=cfg.pad_idx)
        self.embed_positions = (nn.Embedding(cfg.num_position_rows, embed_dim, padding_idx=cfg.pad_idx)
                                if cfg.positions else None)
        self.layernorm_embedding = nn.LayerNorm(embed_dim, eps=TEXT_EMBED_EPS) if cfg.layernorm_embedding else None

    def positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """fairseq's ``make_positions``: real tokens count up from ``pad_idx + 1``, pad tokens get ``pad_idx``."""
        real = tokens.ne(self.pad_idx).long()
        return torch.cumsum(real, dim=1) * real + self.pad_idx

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(self.positions(tokens))
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x


@register_encoder("text")
class TextEncoder(nn.Module):
    """Text modality encoder.

    Args:
        cfg: sizes of the encoder (from the checkpoint's ``cfg.model.modalities.text`` and its embedding shape).
        embed_dim: model embedding dimension.
        make_block: builds one prenet block (the same block type as the shared blocks).
        norm_eps / norm_affine: LayerNorm settings of the model (context LayerNorm).
        layer_norm_first: pre-LN models have no context LayerNorm.
    """

    Config = TextEncoderConfig
    fairseq_name = "TEXT"
    pretraining_only_prefixes = ("decoder.",)
    online_in_ema_prefixes = ("local_encoder.",)
    ema_encoder_only = True  # nlp_base.pt's _ema holds the shared blocks only

    def __init__(self, cfg: TextEncoderConfig, embed_dim: int, make_block: Callable[[], nn.Module],
                 norm_eps: float = 1e-5, norm_affine: bool = True, layer_norm_first: bool = False):
        super().__init__()
        self.cfg = cfg
        self.local_encoder = TextLocalEncoder(cfg, embed_dim)
        self.extra_tokens = (nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, embed_dim))
                             if cfg.num_extra_tokens > 0 else None)
        # fairseq builds the context LayerNorm only with a prenet (TextEncoder: `prenet_depth > 0`)
        norm = (nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=norm_affine)
                if not layer_norm_first and cfg.prenet_depth > 0 else None)
        self.context_encoder = ContextEncoder(nn.ModuleList(make_block() for _ in range(cfg.prenet_depth)), norm)

    @property
    def num_extra_tokens(self) -> int:
        return self.cfg.num_extra_tokens

    @property
    def pad_idx(self) -> int:
        return self.cfg.pad_idx

    @staticmethod
    def config_from_fairseq(model_cfg: dict, state: Optional[dict] = None) -> TextEncoderConfig:
        text = model_cfg["modalities"]["text"]
        if text.get("use_alibi_encoder", False):
            raise ValueError("text encoders with ALiBi attention biases (use_alibi_encoder=true) are not supported")
        if not text.get("learned_pos", True) and not text.get("no_token_positional_embeddings", False):
            raise ValueError("text encoders with sinusoidal positions (learned_pos=false) are not supported; "
                             "every released data2vec 2.0 text model has learned positions")
        key = "modality_encoders.TEXT.local_encoder.embed_tokens.weight"
        if not state or key not in state:
            raise ValueError(f"the vocabulary size comes from the token embedding, but {key} is missing")
        return TextEncoderConfig(
            vocab_size=int(state[key].shape[0]),
            max_source_positions=int(text.get("max_source_positions", 512)),
            scale_embedding=not bool(text.get("no_scale_embedding", True)),
            layernorm_embedding=bool(text.get("layernorm_embedding", True)),
            positions=not bool(text.get("no_token_positional_embeddings", False)),
            prenet_depth=int(text.get("prenet_depth", 4)),
            num_extra_tokens=int(text.get("num_extra_tokens", 0)),
        )

    @staticmethod
    def fairseq_modality_cfg(cfg: TextEncoderConfig) -> dict:
        return {"type": "TEXT", "max_source_positions": cfg.max_source_positions, "learned_pos": True,
                "no_scale_embedding": not cfg.scale_embedding, "layernorm_embedding": cfg.layernorm_embedding,
                "no_token_positional_embeddings": not cfg.positions, "prenet_depth": cfg.prenet_depth,
                "num_extra_tokens": cfg.num_extra_tokens, "dropout": 0.0}

    @staticmethod
    def fairseq_task_cfg(cfg: TextEncoderConfig) -> dict:
        # fairseq's TextEncoder sizes its vocabulary from task.data/dict.txt; point "data" at a folder with the
        # dictionary to rebuild the model with fairseq itself (this plugin reads the size from the weights)
        return {"_name": "masked_lm", "data": "", "tokens_per_sample": cfg.max_source_positions,
                "sample_break_mode": "none", "d2v2_multi": True, "include_index": True, "skip_masking": True}

    def check_input(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> None:
        if source.dtype not in (torch.int64, torch.int32) or source.ndim != 2:
            raise ValueError(f"expected token ids as an int64 tensor [B, T], got {source.dtype} {list(source.shape)}")
        if self.cfg.positions and source.shape[1] > self.cfg.max_source_positions:
            raise ValueError(f"sequences of {source.shape[1]} tokens are longer than the teacher's "
                             f"{self.cfg.max_source_positions} positions; cut them into blocks of at most "
                             f"{self.cfg.max_source_positions} tokens")
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != source.shape):
            raise ValueError(f"the padding mask must be bool {list(source.shape)} (True at padding), got "
                             f"{padding_mask.dtype} {list(padding_mask.shape)}")

    def check_values(self, source: torch.Tensor) -> None:
        """Token ids within the vocabulary (a separate check: it reads the values)."""
        if source.numel() and (int(source.min()) < 0 or int(source.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}) (the teacher's vocabulary), got "
                             f"[{int(source.min())}, {int(source.max())}]; encode the text with the teacher's "
                             "dictionary (dict.txt)")

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> EncoderOutput:
        """``padding_mask``: bool ``[B, T]``, True at padding. Without one it is derived from ``pad_idx`` (fairseq's
        own model would let every token attend to the pads then) and is None when nothing is padded; a given
        mask is used as is (no device sync), all-False included."""
        self.check_input(source, padding_mask)
        source = source.long()
        if padding_mask is None:
            padding_mask = source.eq(self.cfg.pad_idx)
            if not bool(padding_mask.any()):
                padding_mask = None
        x = self.local_encoder(source)
        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            if padding_mask is not None:
                padding_mask = torch.nn.functional.pad(padding_mask, (self.cfg.num_extra_tokens, 0), value=False)
        return EncoderOutput(self.context_encoder(x, padding_mask), padding_mask)
