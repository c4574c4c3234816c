"""data2vec 2.0 audio modality encoder: conv feature extractor, projection, conv positions, ALiBi, prenet.

Mirrors fairseq's ``AudioEncoder`` (``examples/data2vec/models/modalities/audio.py``, on wav2vec 2.0's
``ConvFeatureExtractionModel``) without masking. Parameter names match ``modality_encoders.AUDIO.*``.
Order of operations:

1. conv feature extractor on ``[B, L]`` samples (``feature_encoder_spec``, no conv bias): per layer conv ->
   LayerNorm over channels in fp32 (``extractor_mode=layer_norm``; ``default`` has one per-channel
   GroupNorm over time after the first conv only) -> GELU. 16 kHz in, one frame per 320 samples.
2. ``project_features``: LayerNorm(512) -> Linear(512, D).
3. ``+ relative_positional_encoder(x)``: ``conv_pos_depth`` x (grouped Conv1d, kernel
   ``max(3, conv_pos_width // conv_pos_depth)`` -> non-affine LayerNorm -> GELU), no residual inside,
   optionally behind a LayerNorm (``conv_pos_pre_ln``). Padded frames are not zeroed first (as in fairseq).
4. ALiBi: a fixed, symmetric ``-slope_h * |i - j|`` bias per head, times a learned per-head (and optionally
   per-layer) ``alibi_scale`` clamped at 0, added to the attention logits of every prenet and shared block.
5. context LayerNorm (``norm_eps``; present even without a prenet) -> prenet blocks.

A sample-level padding mask becomes a frame-level one through the conv length formula
(``floor((len - kernel) / stride + 1)`` per layer), as fairseq's ``convert_padding_mask`` does.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_encoder
from .base import ContextEncoder, EncoderOutput

DEFAULT_SPEC = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
AUDIO_NORM_EPS = 1e-5  # conv-stack, projection and positional LayerNorms (fairseq/torch defaults)


def parse_conv_spec(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's ``feature_encoder_spec`` string (``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``) as a list.

    fairseq runs ``eval`` on it; here only list/tuple literals of integers combined with ``+`` and ``*`` are
    accepted, so a checkpoint's cfg cannot run code.
    """
    ops = {ast.Add: operator.add, ast.Mult: operator.mul}

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported element {ast.dump(node)}")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
    except (SyntaxError, ValueError, TypeError) as e:
        raise ValueError(f"feature_encoder_spec {spec!r} is not a list of (dim, kernel, stride) tuples ({e})") from None
    if not isinstance(layers, list) or not layers or not all(
            isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t) for t in layers):
        raise ValueError(f"feature_encoder_spec {spec!r} is not a non-empty list of positive (dim, kernel, stride)")
    return layers


@dataclass
class AudioEncoderConfig:
    conv_spec: str = DEFAULT_SPEC  # fairseq's feature_encoder_spec: [(dim, kernel, stride), ...]
    extractor_mode: str = "layer_norm"  # or "default" (GroupNorm after the first conv only)
    conv_pos_width: int = 95
    conv_pos_groups: int = 16
    conv_pos_depth: int = 5
    conv_pos_pre_ln: bool = False
    prenet_depth: int = 0
    num_extra_tokens: int = 0
    alibi: bool = True  # use_alibi_encoder
    alibi_heads: int = 12  # num_alibi_heads (fairseq: the model's num_heads)
    alibi_scale_init: float = 1.0  # alibi_scale: initial value of the learned scale
    alibi_scale_per_head: bool = True
    alibi_scale_per_layer: bool = False
    model_depth: int = 12  # shared blocks; per-layer ALiBi scales cover prenet + shared blocks

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        return parse_conv_spec(self.conv_spec)

    @property
    def conv_pos_kernel(self) -> int:
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    def frames(self, samples):
        """Frames the conv stack makes of ``samples`` (an int or an integer tensor): fairseq's length formula."""
        for _, kernel, stride in self.conv_layers:
            samples = (samples - kernel) // stride + 1
        return samples

    @property
    def receptive_field(self) -> int:
        """The fewest samples that give one frame (400 for the released 16 kHz models)."""
        samples = 1
        for _, kernel, stride in reversed(self.conv_layers):
            samples = (samples - 1) * stride + kernel
        return samples


class Transpose(nn.Module):
    """Swaps the last two dims (fairseq's ``TransposeLast``); no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (fairseq's ``Fp32LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (fairseq's ``Fp32GroupNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type_as(x)


class SamePad(nn.Module):
    """Drops the last frame after an even-kernel conv so the length is unchanged (fairseq's ``SamePad``)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :-self.remove] if self.remove else x


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0's conv feature extractor: ``[B, L]`` samples -> ``[B, C, T]`` frames.

    The module indices inside each layer match fairseq's (conv 0, dropout 1, norm 2, GELU last), so the
    checkpoint keys ``conv_layers.<i>.0.weight`` / ``conv_layers.<i>.2[.1].{weight,bias}`` load as they are.
    """

    def __init__(self, layers: list[tuple[int, int, int]], mode: str):
        super().__init__()
        if mode not in ("layer_norm", "default"):
            raise ValueError(f"extractor_mode must be 'layer_norm' or 'default', got {mode!r}")
        self.conv_layers = nn.ModuleList()
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(layers):
            conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=False)
            if mode == "layer_norm":
                norm = nn.Sequential(Transpose(), Fp32LayerNorm(dim, eps=AUDIO_NORM_EPS), Transpose())
                layer = nn.Sequential(conv, nn.Identity(), norm, nn.GELU())
            elif i == 0:
                layer = nn.Sequential(conv, nn.Identity(), Fp32GroupNorm(dim, dim, eps=AUDIO_NORM_EPS), nn.GELU())
            else:
                layer = nn.Sequential(conv, nn.Identity(), nn.GELU())
            self.conv_layers.append(layer)
            in_dim = dim

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        x = samples.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return x


def conv_positional_encoder(cfg: AudioEncoderConfig, embed_dim: int) -> nn.Module:
    """data2vec2's relative positional encoder (not wav2vec 2.0's weight-normed ``pos_conv``): ``[B, T, D]`` in and
    out, ``conv_pos_depth`` x (grouped conv -> non-affine LayerNorm -> GELU)."""
    k = cfg.conv_pos_kernel
    layers = [nn.Sequential(nn.Conv1d(embed_dim, embed_dim, kernel_size=k, padding=k // 2, groups=cfg.conv_pos_groups),
                            SamePad(k), Transpose(),
                            nn.LayerNorm(embed_dim, eps=AUDIO_NORM_EPS, elementwise_affine=False),
                            Transpose(), nn.GELU())
              for _ in range(cfg.conv_pos_depth)]
    encoder = nn.Sequential(Transpose(), *layers, Transpose())
    if cfg.conv_pos_pre_ln:
        encoder = nn.Sequential(nn.LayerNorm(embed_dim, eps=AUDIO_NORM_EPS), encoder)
    return encoder


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al., 2022), with its rule for head counts that are not powers of 2."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][:heads - closest]


def alibi_bias(time_steps: int, heads: int, device=None) -> torch.Tensor:
    """fp32 ``[1, heads, T, T]``: ``-slope_h * |i - j|``, the same for every sample."""
    pos = torch.arange(time_steps, device=device)
    distance = (pos[None, :] - pos[:, None]).abs().neg().float()
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32, device=device)
    return (slopes[:, None, None] * distance)[None]


@register_encoder("audio")
class AudioEncoder(nn.Module):
    """Audio modality encoder.

    Args:
        cfg: sizes of the encoder (from the checkpoint's ``cfg.model.modalities.audio``).
        embed_dim: model embedding dimension.
        make_block: builds one prenet block (the same block type as the shared blocks).
        norm_eps / norm_affine: LayerNorm settings of the model (context LayerNorm).
        layer_norm_first: pre-LN models have no context LayerNorm.
    """

    Config = AudioEncoderConfig
    fairseq_name = "AUDIO"
    # the pretraining decoder, and the mask embedding some older checkpoints carry
    pretraining_only_prefixes = ("decoder.", "encoder_mask")
    # data2vec2's EMA teacher reuses the online conv stack and projection (ema_local_encoder=false)
    online_in_ema_prefixes = ("local_encoder.", "project_features.")

    def __init__(self, cfg: AudioEncoderConfig, embed_dim: int, make_block: Callable[[], nn.Module],
                 norm_eps: float = 1e-5, norm_affine: bool = True, layer_norm_first: bool = False):
        super().__init__()
        self.cfg = cfg
        layers = cfg.conv_layers
        self.local_encoder = ConvFeatureExtractor(layers, cfg.extractor_mode)
        feature_dim = layers[-1][0]
        self.project_features = nn.Sequential(Transpose(), nn.LayerNorm(feature_dim, eps=AUDIO_NORM_EPS),
                                              nn.Linear(feature_dim, embed_dim))
        self.relative_positional_encoder = conv_positional_encoder(cfg, embed_dim)
        self.extra_tokens = (nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, embed_dim))
                             if cfg.num_extra_tokens > 0 else None)
        norm = None if layer_norm_first else nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.context_encoder = ContextEncoder(nn.ModuleList(make_block() for _ in range(cfg.prenet_depth)), norm)
        if cfg.alibi:
            layers_scaled = cfg.prenet_depth + cfg.model_depth if cfg.alibi_scale_per_layer else 1
            heads_scaled = cfg.alibi_heads if cfg.alibi_scale_per_head else 1
            self.alibi_scale = nn.Parameter(torch.full((layers_scaled, 1, heads_scaled, 1, 1), cfg.alibi_scale_init))
        else:
            self.alibi_scale = None
        self._alibi_cache: dict = {}

    @property
    def num_extra_tokens(self) -> int:
        return self.cfg.num_extra_tokens

    @staticmethod
    def config_from_fairseq(model_cfg: dict, state: Optional[dict] = None) -> AudioEncoderConfig:
        audio = model_cfg["modalities"]["audio"]
        if audio.get("learned_alibi", False):
            raise ValueError("audio encoders with a learned ALiBi table (learned_alibi=true) are not supported")
        return AudioEncoderConfig(
            conv_spec=str(audio.get("feature_encoder_spec", DEFAULT_SPEC)),
            extractor_mode=str(audio.get("extractor_mode", "layer_norm")),
            conv_pos_width=int(audio.get("conv_pos_width", 95)),
            conv_pos_groups=int(audio.get("conv_pos_groups", 16)),
            conv_pos_depth=int(audio.get("conv_pos_depth", 5)),
            conv_pos_pre_ln=bool(audio.get("conv_pos_pre_ln", False)),
            prenet_depth=int(audio.get("prenet_depth", 4)),
            num_extra_tokens=int(audio.get("num_extra_tokens", 0)),
            alibi=bool(audio.get("use_alibi_encoder", False)),
            alibi_heads=int(audio.get("num_alibi_heads") or model_cfg.get("num_heads", 12)),
            alibi_scale_init=float(audio.get("alibi_scale", 1.0)),
            alibi_scale_per_head=bool(audio.get("learned_alibi_scale_per_head", False)),
            alibi_scale_per_layer=bool(audio.get("learned_alibi_scale_per_layer", False)),
            model_depth=int(audio.get("model_depth") or model_cfg.get("depth", 8)),
        )

    @staticmethod
    def fairseq_modality_cfg(cfg: AudioEncoderConfig) -> dict:
        return {"type": "AUDIO", "feature_encoder_spec": cfg.conv_spec, "extractor_mode": cfg.extractor_mode,
                "conv_pos_width": cfg.conv_pos_width, "conv_pos_groups": cfg.conv_pos_groups,
                "conv_pos_depth": cfg.conv_pos_depth, "conv_pos_pre_ln": cfg.conv_pos_pre_ln,
                "prenet_depth": cfg.prenet_depth, "num_extra_tokens": cfg.num_extra_tokens,
                "use_alibi_encoder": cfg.alibi, "alibi_scale": cfg.alibi_scale_init, "learned_alibi": False,
                "learned_alibi_scale": cfg.alibi, "learned_alibi_scale_per_head": cfg.alibi_scale_per_head,
                "learned_alibi_scale_per_layer": cfg.alibi_scale_per_layer, "num_alibi_heads": cfg.alibi_heads,
                "model_depth": cfg.model_depth, "ema_local_encoder": False}

    @staticmethod
    def for_block_layers(cfg: AudioEncoderConfig, state: dict, layers) -> tuple:
        """``(cfg, state)`` of this encoder in front of a new stack whose block i gets the attention bias block
        ``layers[i]`` of the old stack got (an exported student): per-layer ALiBi scales are picked to match."""
        new = replace(cfg, model_depth=len(layers))
        if not (cfg.alibi and cfg.alibi_scale_per_layer):
            return new, state
        depth = cfg.prenet_depth
        rows = list(range(depth)) + [depth + int(i) for i in layers]
        return new, {**state, "alibi_scale": state["alibi_scale"][rows].clone()}

    @staticmethod
    def fairseq_task_cfg(cfg: AudioEncoderConfig) -> dict:
        return {"_name": "audio_pretraining", "data": "", "sample_rate": 16000, "normalize": True,
                "max_sample_size": 320000, "min_sample_size": 32000}

    def check_input(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> None:
        if not source.is_floating_point() or source.ndim != 2:
            raise ValueError(f"expected audio samples as a float tensor [B, L] (16 kHz mono), got "
                             f"{source.dtype} {list(source.shape)}")
        if source.shape[1] < self.cfg.receptive_field:
            raise ValueError(f"clips of {source.shape[1]} samples are shorter than the conv feature extractor's "
                             f"receptive field ({self.cfg.receptive_field} samples); use longer clips")
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != source.shape):
            raise ValueError(f"the padding mask must be bool {list(source.shape)} (True at padded samples), got "
                             f"{padding_mask.dtype} {list(padding_mask.shape)}")

    def frame_padding_mask(self, padding_mask: torch.Tensor, frames: int) -> torch.Tensor:
        """Sample-level mask ``[B, L]`` -> frame-level ``[B, T]``: frames from the conv length of the valid samples on
        are padding (fairseq's ``convert_padding_mask``)."""
        lengths = self.cfg.frames((~padding_mask).sum(-1))
        return torch.arange(frames, device=padding_mask.device)[None, :] >= lengths[:, None]

    def _alibi(self, frames: int, device) -> torch.Tensor:
        key = (frames, str(device))
        if key not in self._alibi_cache:
            if len(self._alibi_cache) > 8:
                self._alibi_cache.clear()
            self._alibi_cache[key] = alibi_bias(frames, self.cfg.alibi_heads, device)
        return self._alibi_cache[key]

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> EncoderOutput:
        """``padding_mask``: bool ``[B, L]``, True at padded samples; the output's is per frame (None without one)."""
        self.check_input(source, padding_mask)
        x = self.project_features(self.local_encoder(source))
        frames = x.shape[1]
        if padding_mask is not None:
            padding_mask = self.frame_padding_mask(padding_mask, frames)
        x = x + self.relative_positional_encoder(x)

        bias, prenet_scale, block_scale = None, None, None
        if self.alibi_scale is not None:
            bias = self._alibi(frames, x.device)
            scale = self.alibi_scale.clamp_min(0).float()
            if scale.shape[0] == 1:  # one scale for every block: applied once (fairseq pre-scales the bias)
                bias = bias * scale[0]
            else:
                depth = self.cfg.prenet_depth
                prenet_scale = scale[:depth].flatten(1) if depth else None
                block_scale = scale[depth:].flatten(1)
        if self.extra_tokens is not None:
            n = self.cfg.num_extra_tokens
            x = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            if padding_mask is not None:
                padding_mask = F.pad(padding_mask, (n, 0), value=False)
            if bias is not None:
                bias = F.pad(bias, (n, 0, n, 0))
        x = self.context_encoder(x, padding_mask, bias, prenet_scale)
        return EncoderOutput(x, padding_mask, bias, block_scale)
