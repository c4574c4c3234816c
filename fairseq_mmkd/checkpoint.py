"""Safe, strict loading of fairseq checkpoints and of data2vec 2.0 (``data2vec_multi``) teachers.

Checkpoints are pickles, so loading one can run arbitrary code. ``read_checkpoint`` therefore always
uses ``torch.load(weights_only=True)`` with an allow-list of exactly the extra types a fairseq trainer
writes (numpy scalars in logged metrics, ``argparse.Namespace`` in legacy files). Anything else is refused
with the offending type named, unless the caller opts in for that file (``trust_checkpoint=True``).
Every failure is one ``CheckpointError`` line naming the file, the problem and the fix.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .d2v_model import D2vConfig, D2vModel
from .encoders import get_encoder_class

TRUST_HINT = ("if you trust this file, opt in with trust_checkpoint=True (CLI: --trust-checkpoint; "
              "training config: model.trust_teacher_checkpoint=true)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message saying why and what to do."""


def _allowed_globals() -> list:
    """Types beyond tensors/containers/primitives that fairseq's trainer legitimately pickles."""
    allowed = [argparse.Namespace, np.dtype]
    try:  # numpy >= 2 moved the scalar reconstructor to numpy._core
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    allowed.append(scalar)
    allowed += [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return allowed


def read_checkpoint(path, trust_checkpoint: bool = False) -> dict:
    """``torch.load`` a checkpoint onto the CPU, safely, with clear errors for unusable files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found; pass the path of a fairseq checkpoint (.pt)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the checkpoint file inside it (e.g. checkpoint_best.pt)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if not head:
        raise CheckpointError(f"{path}: file is empty (0 bytes); the download or copy failed, fetch it again")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save file); check the path")
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: file is truncated or corrupt; fetch or copy it again")
    try:
        if trust_checkpoint:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for the same underlying problems
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "Unsupported operand" in msg:
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f"type {found.group(1)}" if found else "an object type"
            raise CheckpointError(f"{path}: contains {what}, which a safe load refuses to unpickle "
                                  f"(it could run code); {TRUST_HINT}") from None
        raise CheckpointError(f"{path}: file is truncated or corrupt ({type(e).__name__}: {msg.splitlines()[0] if msg else ''}); "
                              "fetch or copy it again") from None


def _model_cfg(state, path) -> dict:
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("model"), dict):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a fairseq checkpoint (expected a dict with 'cfg' and 'model', found {keys})")
    cfg = state.get("cfg")
    if cfg is None:
        if state.get("args") is not None:
            raise CheckpointError(f"{path}: legacy argparse-era fairseq checkpoint; data2vec 2.0 checkpoints are "
                                  "hydra-era (they carry 'cfg'), so this is not a data2vec2 model")
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'cfg')")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict):
        try:  # an OmegaConf DictConfig (older writers) converts cleanly
            from omegaconf import OmegaConf
            model_cfg = OmegaConf.to_container(cfg["model"], resolve=True, enum_to_str=True)
        except Exception:
            raise CheckpointError(f"{path}: not a fairseq checkpoint (cfg has no 'model' section)") from None
    return model_cfg


def describe_wrong_model(name: Optional[str]) -> str:
    hints = {
        "mae_image_classification": "a fine-tuned classifier; use the pretrained-only file (e.g. base_imagenet.pt)",
        "d2v_kd": "a student checkpoint of this plugin; pass the original teacher, or export the student with "
                  "`python -m fairseq_mmkd.export` first",
    }
    return hints.get(name, "use a data2vec 2.0 pretraining checkpoint such as base_imagenet.pt")


def _to_fairseq_key(key: str, enc_name: str) -> str:
    return f"modality_encoders.{enc_name}." + key[len("encoder."):] if key.startswith("encoder.") else key


def _select_weights(model_sd: dict, expected: dict, modality: str, weights: str, model_cfg: dict, path) -> dict:
    """Map fairseq's keys onto ours and pick online or EMA weights, strictly."""
    enc_cls = get_encoder_class(modality)
    enc_name = enc_cls.fairseq_name
    enc_prefix = f"modality_encoders.{enc_name}."
    pretraining_only = tuple(enc_prefix + p for p in enc_cls.pretraining_only_prefixes) + (
        "shared_decoder.", "recon_proj.")

    def ignorable(k):  # pretraining-only parts, and the other modalities' encoders of a multi-modal model
        return k.startswith(pretraining_only) or (k.startswith("modality_encoders.") and not k.startswith(enc_prefix))

    online = {k: v for k, v in model_sd.items() if k != "_ema"}
    fairseq_keys = {_to_fairseq_key(k, enc_name): k for k in expected}

    chosen = {}
    missing = [fk for fk in fairseq_keys if fk not in online]
    unexpected = [k for k in online if k not in fairseq_keys and not ignorable(k)]
    for fk, k in fairseq_keys.items():
        if fk in online:
            chosen[k] = online[fk]

    if weights == "ema":
        ema = model_sd.get("_ema")
        if not isinstance(ema, dict) or not ema:
            raise CheckpointError(f"{path}: has no EMA weights ('_ema'); use weights='model' (teacher_weights=model)")
        block_relative = all(k.split(".", 1)[0].isdigit() for k in ema)  # ema_encoder_only checkpoints
        required = [k for k in expected if k.startswith("blocks.")]
        if not block_relative:
            # the EMA copy holds its own modality encoder; its patch embedding only with ema_local_encoder
            local = (model_cfg.get("modalities") or {}).get(modality) or {}
            required = [k for k in expected if not (k.startswith("encoder.local_encoder.")
                                                    and not local.get("ema_local_encoder", False))]
        for k in expected:
            ek = k[len("blocks."):] if block_relative and k.startswith("blocks.") else _to_fairseq_key(k, enc_name)
            if ek in ema:
                chosen[k] = ema[ek]
            elif k in required:
                missing.append(f"_ema/{ek}")
        known = {(k[len("blocks."):] if block_relative else _to_fairseq_key(k, enc_name)) for k in expected}
        unexpected += [f"_ema/{k}" for k in ema if k not in known and not ignorable(k)]

    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{path}: weights do not match the architecture in its cfg.model: {'; '.join(parts)}")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in chosen.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch with its cfg.model: {'; '.join(bad[:3])}")
    return chosen


def load_d2v(path, modality: str = "image", weights: str = "model", device="cpu",
             trust_checkpoint: bool = False) -> D2vModel:
    """Load a data2vec 2.0 checkpoint as a frozen ``D2vModel`` (eval mode, no gradients).

    Args:
        path: fairseq checkpoint (the released ``base_imagenet.pt`` layout).
        modality: which modality encoder to build (``"image"``).
        weights: ``"model"`` for the online weights (what fairseq's fine-tuning and feature extraction
            use) or ``"ema"`` for the EMA teacher stored in ``model['_ema']``.
        device: where to put the model.
        trust_checkpoint: allow arbitrary pickled objects (only for files you trust).
    """
    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    state = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    model_cfg = _model_cfg(state, path)
    name = model_cfg.get("_name")
    if name != "data2vec_multi":
        raise CheckpointError(f"{path}: is a {name!r} model, not a data2vec 2.0 model ('data2vec_multi'); "
                              f"{describe_wrong_model(name)}")
    enc_cls = get_encoder_class(modality)
    supported = str(model_cfg.get("supported_modality") or "").split(".")[-1].upper()
    has_encoder = any(k.startswith(f"modality_encoders.{enc_cls.fairseq_name}.") for k in state["model"])
    if (supported and supported != enc_cls.fairseq_name) or not has_encoder:
        found = supported or "none"
        raise CheckpointError(f"{path}: is a data2vec 2.0 {found.lower()} model, not an {modality} model; "
                              f"pass an {modality} checkpoint such as base_imagenet.pt")
    try:
        cfg = D2vConfig.from_fairseq(model_cfg, modality)
        model = D2vModel(cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable cfg.model ({e})") from None
    expected = model.state_dict()
    chosen = _select_weights(state["model"], expected, modality, weights, model_cfg, path)
    model.load_state_dict(chosen, strict=True)
    model.eval().requires_grad_(False)
    model.checkpoint_path = str(path)
    model.weights = weights
    model.fairseq_model_cfg = model_cfg
    return model.to(device)


def load_d2v_image(path, weights: str = "model", device="cpu", trust_checkpoint: bool = False) -> D2vModel:
    """Load a data2vec 2.0 *image* checkpoint; see :func:`load_d2v`."""
    return load_d2v(path, "image", weights=weights, device=device, trust_checkpoint=trust_checkpoint)
