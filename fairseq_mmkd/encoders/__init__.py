"""Modality encoders, looked up by name.

A modality encoder turns raw input (images today; text or audio later) into the token sequence that
enters the first shared transformer block of a data2vec2 model. The teacher loader, the KD model and the
criterion only ever talk to an encoder through this registry and the small interface below, so adding a
modality means adding one module here that registers itself; nothing else changes.

Interface of a registered encoder class ``E``:
    ``E.fairseq_name``: key of the encoder in fairseq's ``modality_encoders`` ModuleDict (``"IMAGE"``).
    ``E.config_from_fairseq(model_cfg: dict) -> E.Config``: read its sizes from a checkpoint's cfg.model.
    ``E(cfg, embed_dim, make_block, norm_eps, norm_affine, layer_norm_first)``: build it.
    ``e.num_extra_tokens``: tokens prepended before the content tokens (CLS-like), excluded from targets.
    ``e.check_input(source)``: raise ``ValueError`` with a clear message if ``source`` has the wrong shape.
    ``e(source) -> Tensor[B, T, D]``: the encoded sequence.
    ``E.pretraining_only_prefixes``: checkpoint key prefixes (relative to the encoder) that inference drops.
"""
from __future__ import annotations

MODALITY_ENCODERS: dict = {}


def register_encoder(name: str):
    """Class decorator: make an encoder available under ``name`` (e.g. ``"image"``)."""

    def wrap(cls):
        if name in MODALITY_ENCODERS and MODALITY_ENCODERS[name] is not cls:
            raise ValueError(f"modality encoder {name!r} is already registered by {MODALITY_ENCODERS[name]}")
        MODALITY_ENCODERS[name] = cls
        return cls

    return wrap


def get_encoder_class(name: str):
    try:
        return MODALITY_ENCODERS[name]
    except KeyError:
        raise ValueError(
            f"unknown modality {name!r}; available: {sorted(MODALITY_ENCODERS)}. A new modality is a module "
            "in fairseq_mmkd/encoders/ that registers itself with @register_encoder."
        ) from None


from . import image  # noqa: E402,F401  (registers "image")
