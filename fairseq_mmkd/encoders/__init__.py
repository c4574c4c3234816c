"""Modality encoders, looked up by name.

A modality encoder turns raw input (images, text tokens, audio samples) into the token sequence that
enters the first shared transformer block of a data2vec2 model, plus what those blocks need besides it
(a padding mask, an ALiBi bias). The teacher loader, the KD model and the criterion only ever talk to an
encoder through the registry (``registry.py``) and the small interface below, so adding a modality means adding one
module here that registers itself; nothing else changes.

Interface of a registered encoder class ``E``:
    ``E.fairseq_name``: key of the encoder in fairseq's ``modality_encoders`` ModuleDict (``"IMAGE"``).
    ``E.config_from_fairseq(model_cfg: dict, state: dict) -> E.Config``: read its sizes from a checkpoint's
        cfg.model (and, where the cfg cannot say, from the shapes of its fairseq-named weights ``state``).
    ``E(cfg, embed_dim, make_block, norm_eps, norm_affine, layer_norm_first)``: build it.
    ``e.num_extra_tokens``: tokens prepended before the content tokens (CLS-like), excluded from targets.
    ``e.check_input(source, padding_mask=None)``: raise ``ValueError`` with a clear message if ``source`` (or
        the mask) has the wrong dtype or shape; checks nothing that needs the values (no device sync).
    ``e(source, padding_mask=None) -> EncoderOutput``: the encoded sequence (see ``base.EncoderOutput``).
    ``E.pretraining_only_prefixes``: checkpoint key prefixes (relative to the encoder) that inference drops.
    ``E.online_in_ema_prefixes``: key prefixes (relative to the encoder) that a full ``_ema`` copy lacks unless
        the checkpoint's ``ema_local_encoder`` is set: data2vec2's EMA teacher runs the online ones.
    ``E.fairseq_modality_cfg(cfg) -> dict``: the ``cfg.model.modalities.<name>`` section that rebuilds it.
    ``E.fairseq_task_cfg(cfg) -> dict``: the ``cfg.task`` section of a checkpoint written for it.
    ``E.for_block_layers(cfg, state, layers) -> (cfg, state)`` (optional; default: unchanged): its config and
        weights in front of a new stack of blocks whose block i gets what block ``layers[i]`` got (export).
    ``E.ema_encoder_only`` (optional, default False): its released checkpoints keep only the shared blocks in
        ``_ema`` (data2vec2's ``ema_encoder_only``).
"""
from __future__ import annotations

from .base import ContextEncoder, EncoderOutput
from .registry import MODALITY_ENCODERS, get_encoder_class, modality_from_fairseq_name, register_encoder
from . import audio, image, text  # noqa: E402,F401  (register "audio", "image", "text")

__all__ = ["ContextEncoder", "EncoderOutput", "MODALITY_ENCODERS", "get_encoder_class", "modality_from_fairseq_name",
           "register_encoder"]
