"""data2vec 2.0 image modality encoder: patch embedding, fixed positions, extra tokens, prenet.

Mirrors fairseq's ``ImageEncoder`` without masking (inference / distillation only). Parameter names match
``modality_encoders.IMAGE.*`` in fairseq checkpoints. Order of operations (all verified against fairseq):
patchify -> (+ projection if the modality dim differs) -> + fixed 2-D sin-cos positions -> prepend extra
tokens (they get no position) -> [post-LN only] LayerNorm -> prenet blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .registry import register_encoder
from .base import ContextEncoder, EncoderOutput


@dataclass
class ImageEncoderConfig:
    input_size: int = 224
    in_chans: int = 3
    patch_size: int = 16
    embed_dim: int = 768  # modality embed dim; a Linear maps it to the model dim when they differ
    prenet_depth: int = 2
    num_extra_tokens: int = 1
    fixed_positions: bool = True

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a strided conv, flattened row-major to ``[B, T, D]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FixedPositions(nn.Module):
    """Holds the checkpoint's frozen position table (``positions``: ``[1, T, D]``)."""

    def __init__(self, num_patches: int, embed_dim: int):
        super().__init__()
        self.positions = nn.Parameter(sincos_2d_positions(int(num_patches ** 0.5), embed_dim)[None],
                                      requires_grad=False)


def sincos_2d_positions(grid: int, dim: int) -> torch.Tensor:
    """MAE-style 2-D sin-cos table ``[grid*grid, dim]``: first half encodes the column, second the row.

    Only used to initialise fresh models; checkpoints carry their own table, which is loaded as is.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need an embed dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def enc(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([enc(cols), enc(rows)], dim=1).float()


@register_encoder("image")
class ImageEncoder(nn.Module):
    """Image modality encoder.

    Args:
        cfg: sizes of the encoder (from the checkpoint's ``cfg.model.modalities.image``).
        embed_dim: model embedding dimension.
        make_block: builds one prenet block (the same block type as the shared blocks).
        norm_eps / norm_affine: LayerNorm settings of the model.
        layer_norm_first: pre-LN models have no context LayerNorm.
    """

    Config = ImageEncoderConfig
    fairseq_name = "IMAGE"
    # Pretraining-only parts of fairseq's encoder: the conv decoder (and a transformer decoder variant).
    pretraining_only_prefixes = ("decoder.",)
    online_in_ema_prefixes = ("local_encoder.",)

    def __init__(self, cfg: ImageEncoderConfig, embed_dim: int, make_block: Callable[[], nn.Module],
                 norm_eps: float = 1e-6, norm_affine: bool = True, layer_norm_first: bool = False):
        super().__init__()
        self.cfg = cfg
        patch = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.local_encoder = (patch if cfg.embed_dim == embed_dim
                              else nn.Sequential(patch, nn.Linear(cfg.embed_dim, embed_dim)))
        self.fixed_positional_encoder = (FixedPositions(cfg.num_patches, embed_dim)
                                         if cfg.fixed_positions else None)
        self.extra_tokens = (nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, embed_dim))
                             if cfg.num_extra_tokens > 0 else None)
        norm = None if layer_norm_first else nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.context_encoder = ContextEncoder(nn.ModuleList(make_block() for _ in range(cfg.prenet_depth)), norm)

    @property
    def num_extra_tokens(self) -> int:
        return self.cfg.num_extra_tokens

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_extra_tokens + self.cfg.num_patches

    @staticmethod
    def config_from_fairseq(model_cfg: dict, state: Optional[dict] = None) -> ImageEncoderConfig:
        img = model_cfg["modalities"]["image"]
        if img.get("use_alibi_encoder", False):
            raise ValueError("image encoders with ALiBi position biases (use_alibi_encoder=true) are not supported")
        return ImageEncoderConfig(
            input_size=int(img.get("input_size", 224)),
            in_chans=int(img.get("in_chans", 3)),
            patch_size=int(img.get("patch_size", 16)),
            embed_dim=int(img.get("embed_dim", model_cfg["embed_dim"])),
            prenet_depth=int(img.get("prenet_depth", 4)),
            num_extra_tokens=int(img.get("num_extra_tokens", 0)),
            fixed_positions=bool(img.get("fixed_positions", True)),
        )

    @staticmethod
    def fairseq_modality_cfg(cfg: ImageEncoderConfig) -> dict:
        return {"type": "IMAGE", "input_size": cfg.input_size, "in_chans": cfg.in_chans, "patch_size": cfg.patch_size,
                "embed_dim": cfg.embed_dim, "fixed_positions": cfg.fixed_positions, "prenet_depth": cfg.prenet_depth,
                "num_extra_tokens": cfg.num_extra_tokens, "init_extra_token_zero": False, "ema_local_encoder": True,
                "transformer_decoder": False, "enc_dec_transformer": False}

    @staticmethod
    def fairseq_task_cfg(cfg: ImageEncoderConfig) -> dict:
        return {"_name": "mae_image_pretraining", "data": "", "input_size": cfg.input_size, "key": "source"}

    def check_input(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> None:
        c, s = self.cfg.in_chans, self.cfg.input_size
        if source.ndim != 4 or tuple(source.shape[1:]) != (c, s, s):
            raise ValueError(
                f"expected images of shape [B, {c}, {s}, {s}] (the teacher's input size), got {list(source.shape)}; "
                f"resize the images to {s}x{s} first"
            )
        if not source.is_floating_point():
            raise ValueError(f"expected float images (normalised pixels), got {source.dtype}")
        if padding_mask is not None:
            raise ValueError("images take no padding mask (every image has the teacher's input size)")

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> EncoderOutput:
        self.check_input(source, padding_mask)
        x = self.local_encoder(source)
        if self.fixed_positional_encoder is not None:
            x = x + self.fixed_positional_encoder.positions
        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return EncoderOutput(self.context_encoder(x))
