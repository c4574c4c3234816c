"""The registry of modality encoders: each encoder module registers its class under a modality name."""

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


def modality_from_fairseq_name(fairseq_name: str):
    """``"AUDIO"`` (a key of fairseq's ``modality_encoders``) -> ``"audio"``; None when no encoder has it."""
    for name, cls in MODALITY_ENCODERS.items():
        if cls.fairseq_name == fairseq_name:
            return name
    return None
