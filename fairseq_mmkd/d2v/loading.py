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

from .model import D2vConfig, D2vModel
from ..encoders import MODALITY_ENCODERS, get_encoder_class, modality_from_fairseq_name

TRUST_HINT = ("if you trust this file, opt in with trust_checkpoint=True (CLI: --trust-checkpoint; "
              "training config: model.trust_teacher_checkpoint=true)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message saying why and what to do."""


class WrongModelError(CheckpointError):
    """A fairseq checkpoint of another model than ``data2vec_multi``; ``model_name`` says which."""

    def __init__(self, message: str, model_name=None):
        super().__init__(message)
        self.model_name = model_name


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
        "data2vec_text_classification": "a fine-tuned classifier; use the pretrained-only file (e.g. nlp_base.pt)",
        "wav2vec_ctc": "a fine-tuned speech recogniser; use the pretrained-only file (e.g. base_libri.pt)",
        "d2v_kd": "a student checkpoint of this plugin; pass the original teacher, or export the student with "
                  "`python -m fairseq_mmkd.export` first",
        "d2v_kd_multimodal": "a multimodal student checkpoint of this plugin; pass the original teachers, or export "
                             "the student with `python -m fairseq_mmkd.export` first",
    }
    return hints.get(name, "use a data2vec 2.0 pretraining checkpoint such as base_imagenet.pt, nlp_base.pt or "
                           "base_libri.pt")


RELEASED = {"image": "base_imagenet.pt", "text": "nlp_base.pt", "audio": "base_libri.pt"}


def checkpoint_modalities(model_cfg: dict, model_sd: dict) -> list:
    """The modalities (``"image"``, ``"text"``, ``"audio"``) whose encoders a data2vec_multi checkpoint holds."""
    names = sorted({k.split(".")[1] for k in model_sd if k.startswith("modality_encoders.") and k.count(".") > 1})
    found = [modality_from_fairseq_name(n) for n in names]
    return [m for m in found if m is not None]


def detect_modality(model_cfg: dict, model_sd: dict, path, modality: Optional[str] = None) -> str:
    """Which modality encoder to build: the checkpoint's ``supported_modality``, else its only modality encoder.

    ``modality`` picks one of several (a multimodal file) and must agree with a single-modality file.
    """
    supported = str(model_cfg.get("supported_modality") or "").split(".")[-1].upper()
    present = checkpoint_modalities(model_cfg, model_sd)
    declared = modality_from_fairseq_name(supported) if supported else None
    if supported and declared is None:
        raise CheckpointError(f"{path}: is a data2vec 2.0 model of modality {supported!r}, which this plugin has no "
                              f"encoder for (available: {sorted(MODALITY_ENCODERS)})")
    if modality is not None:
        get_encoder_class(modality)  # unknown names fail with the list of known ones
        if (declared and declared != modality) or modality not in present:
            found = declared or (", ".join(present) if present else "no known")
            article = "an" if modality[0] in "aeiou" else "a"
            raise CheckpointError(f"{path}: is a data2vec 2.0 {found} model, not {article} {modality} model; pass "
                                  f"{article} {modality} checkpoint such as {RELEASED.get(modality, 'its released file')}"
                                  ", or load it with fairseq_mmkd.load_d2v, which detects the modality")
        return modality
    if declared:
        if declared not in present:
            raise CheckpointError(f"{path}: declares a {declared} model but holds no modality_encoders."
                                  f"{get_encoder_class(declared).fairseq_name}.* weights; the file is damaged")
        return declared
    if len(present) == 1:
        return present[0]
    if not present:
        raise CheckpointError(f"{path}: holds no modality encoder weights (modality_encoders.*); not a data2vec 2.0 "
                              "pretraining checkpoint")
    raise CheckpointError(f"{path}: is a multimodal data2vec 2.0 model ({', '.join(present)}); choose one with "
                          f"modality=... (CLI: --modality)")


def upgrade_alibi_scale(state: dict) -> dict:
    """Older checkpoints store ``alibi_scale`` 4-D (``1 x H x 1 x 1``); fairseq upgrades it to 5-D on load
    (``ModalitySpecificEncoder.upgrade_state_dict_named``), for ``_ema`` too."""
    out = {}
    for k, v in state.items():
        if k == "_ema" and isinstance(v, dict):
            out[k] = upgrade_alibi_scale(v)
        elif k.endswith("alibi_scale") and torch.is_tensor(v) and v.dim() == 4:
            out[k] = v.unsqueeze(0)
        else:
            out[k] = v
    return out


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
        # ema_encoder_only checkpoints (text) keep only the shared blocks, keyed "0.norm1.weight": the online
        # modality encoder serves the EMA teacher
        block_relative = all(k.split(".", 1)[0].isdigit() for k in ema)
        required = [k for k in expected if k.startswith("blocks.")]
        if not block_relative:
            # the EMA copy holds its own modality encoder; without ema_local_encoder it lacks the local encoder
            # (and audio's projection): data2vec2's teacher runs the online ones
            local = (model_cfg.get("modalities") or {}).get(modality) or {}
            online = () if local.get("ema_local_encoder", False) else \
                tuple("encoder." + p for p in enc_cls.online_in_ema_prefixes)
            required = [k for k in expected if not k.startswith(online)]
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


def load_d2v(path, weights: str = "model", device="cpu", trust_checkpoint: bool = False,
             modality: Optional[str] = None) -> D2vModel:
    """Load a data2vec 2.0 checkpoint (image, text or audio) as a frozen ``D2vModel`` (eval mode, no gradients).

    Args:
        path: fairseq checkpoint (the released ``base_imagenet.pt``, ``nlp_base.pt``, ``base_libri.pt`` layout).
        weights: ``"model"`` for the online weights (what fairseq's fine-tuning and feature extraction
            use) or ``"ema"`` for the EMA teacher stored in ``model['_ema']``, composed as data2vec2 composes
            its teacher (text: online embeddings + EMA blocks; audio: online conv stack and projection + EMA
            positional encoder, context encoder, ALiBi scale and blocks).
        device: where to put the model.
        trust_checkpoint: allow arbitrary pickled objects (only for files you trust).
        modality: which modality encoder to build; default: the checkpoint's own (required only to pick one
            modality of a multimodal file).
    """
    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    state = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    model_cfg = _model_cfg(state, path)
    name = model_cfg.get("_name")
    if name != "data2vec_multi":
        raise WrongModelError(f"{path}: is a {name!r} model, not a data2vec 2.0 model ('data2vec_multi'); "
                              f"{describe_wrong_model(name)}", model_name=name)
    model_sd = upgrade_alibi_scale(state["model"])
    modality = detect_modality(model_cfg, model_sd, path, modality)
    try:
        cfg = D2vConfig.from_fairseq(model_cfg, modality, state=model_sd)
        model = D2vModel(cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable cfg.model ({e})") from None
    expected = model.state_dict()
    chosen = _select_weights(model_sd, expected, modality, weights, model_cfg, path)
    model.load_state_dict(chosen, strict=True)
    model.eval().requires_grad_(False)
    model.checkpoint_path = str(path)
    model.weights = weights
    model.fairseq_model_cfg = model_cfg
    model.fairseq_task_cfg = _task_cfg(state, modality)
    return model.to(device)


def _task_cfg(state: dict, modality: Optional[str] = None) -> dict:
    """The checkpoint's ``cfg.task`` as a plain dict (``{}`` when absent): e.g. audio's ``normalize``; of a
    multimodal file (fairseq's ``multimodal_pretraining`` task), the section of ``modality``."""
    task = (state.get("cfg") or {}).get("task") if isinstance(state.get("cfg"), dict) else None
    if task is not None and not isinstance(task, dict):
        try:
            from omegaconf import OmegaConf
            task = OmegaConf.to_container(task, resolve=True, enum_to_str=True)
        except Exception:
            task = None
    if task and task.get("_name") == "multimodal_pretraining" and isinstance(task.get(modality), dict):
        task = task[modality]
    return dict(task or {})


def load_d2v_image(path, weights: str = "model", device="cpu", trust_checkpoint: bool = False) -> D2vModel:
    """Load a data2vec 2.0 *image* checkpoint; refuses text and audio files (use :func:`load_d2v` for those)."""
    return load_d2v(path, weights=weights, device=device, trust_checkpoint=trust_checkpoint, modality="image")
