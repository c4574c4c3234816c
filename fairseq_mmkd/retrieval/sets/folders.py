"""One entry point for a user's labelled retrieval folder of any modality: which kind it is, and reading it to fit
the teacher.

    kind = folder_kind(path)                                   # "image", "text" or "audio"
    data = load_retrieval_folder(path, **teacher_facts(cfg, teacher_task_cfg), limit=...)

``teacher_facts`` reads what a set must agree with from the teacher's architecture (``D2vConfig``) and its
pretraining task settings (fairseq's ``cfg.task``: audio's ``normalize`` and ``max_sample_size``); a folder of
another modality than the teacher's is a one-line error. A set read without those facts (to report data errors
before a large checkpoint is loaded) is fitted later with ``fit_teacher(data, **teacher_facts(...))``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .audio_folder import LAYOUT as AUDIO_LAYOUT, is_audio_folder, load_audio_folder
from .image_folder import LAYOUT as IMAGE_LAYOUT, load_image_folder_pair
from .base import RetrievalDataError
from .text_folder import LAYOUT as TEXT_LAYOUT, is_text_folder, load_text_folder

KINDS = {
    "image": f"a labelled image folder ({IMAGE_LAYOUT})",
    "text": f"a GLUE-style text folder ({TEXT_LAYOUT})",
    "audio": f"a labelled audio folder ({AUDIO_LAYOUT})",
}


def folder_kind(path) -> str:
    """``"image"``, ``"text"`` or ``"audio"``: the kind of labelled retrieval folder ``path`` is, from its files.

    Raises:
        RetrievalDataError: not a directory, or none of the three layouts (the message lists them).
    """
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise RetrievalDataError(f"{root}: retrieval folder not found; expected {_kinds()}")
    if is_text_folder(root):
        return "text"
    if is_audio_folder(root):
        return "audio"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "image"
    if (root / "dict.txt").is_file():
        raise RetrievalDataError(f"{root} is fairseq-preprocess output for training (dict.txt at the top); a text "
                                 f"retrieval folder is labelled: {KINDS['text']}")
    raise RetrievalDataError(f"{root} is not a retrieval folder; expected {_kinds()}")


def _kinds() -> str:
    return "; or ".join(KINDS.values())


def teacher_facts(cfg, task_cfg: Optional[dict] = None) -> dict:
    """What a retrieval set must fit, from the teacher's ``D2vConfig`` (``model.distiller.cfg``, or a loaded
    ``D2vModel``'s ``cfg``) and its fairseq ``cfg.task`` as a dict (``D2vModel.fairseq_task_cfg``).

    Returns keyword arguments for ``load_retrieval_folder`` and ``fit_teacher``: ``modality``; text: ``vocab_size``,
    ``pad_idx`` and ``max_length`` (the position count); audio: ``min_length`` (the receptive field),
    ``max_length`` (the pretraining crop ``max_sample_size``, when the task settings have it) and ``normalize``
    (``task.normalize``; None when unknown).
    """
    modality, enc, task_cfg = cfg.modality, cfg.encoder, dict(task_cfg or {})
    facts = {"modality": modality}
    if modality == "text":
        facts.update(vocab_size=int(enc.vocab_size), pad_idx=int(enc.pad_idx),
                     max_length=int(enc.max_source_positions) if enc.positions else None)
    elif modality == "audio":
        normalize = task_cfg.get("normalize")
        max_sample_size = task_cfg.get("max_sample_size")
        facts.update(min_length=int(enc.receptive_field),
                     max_length=int(max_sample_size) if max_sample_size else None,
                     normalize=None if normalize is None else bool(normalize))
    return facts


def check_modality(data, modality: str, what: str) -> None:
    """A set of another modality than the model's is an error naming both (``what``: how the user gave it)."""
    if data.modality != modality:
        raise RetrievalDataError(f"{what} is {KINDS[data.modality]}, but the model is a data2vec 2.0 {modality} model; "
                                 f"give {KINDS.get(modality, modality + ' data')}")


def fit_teacher(data, modality: Optional[str] = None, what: str = "the retrieval set", **facts):
    """Check ``data`` against the teacher (its modality, then the modality's facts) and fit it; returns ``data``."""
    if modality is not None:
        check_modality(data, modality, what)
    return data.fit_teacher(**facts) if hasattr(data, "fit_teacher") else data


def load_retrieval_folder(path, modality: Optional[str] = None, *, limit: Optional[int] = None,
                          image_size: int = 224, **facts):
    """Read a labelled retrieval folder of any kind, fitted to the teacher.

    Args:
        path: an image folder (``train/``, ``test/``), a GLUE-style text folder or a labelled audio folder.
        modality: the teacher's; a folder of another kind is an error (None: any kind, fitted to nothing).
        limit: at most this many items per split, evenly spaced.
        image_size: images only: the square size images are stored at (see ``load_image_folder_pair``).
        facts: the rest of ``teacher_facts`` (text: ``vocab_size``, ``pad_idx``, ``max_length``; audio:
            ``min_length``, ``max_length``, ``normalize``); missing ones are not checked.

    Returns:
        ``RetrievalSet`` (images), ``TextRetrievalSet`` or ``AudioRetrievalSet``.
    """
    kind = folder_kind(path)
    if modality is not None and kind != modality:
        raise RetrievalDataError(f"{path} is {KINDS[kind]}, but the teacher is a data2vec 2.0 {modality} model; "
                                 f"give {KINDS.get(modality, modality + ' data')}")
    if kind == "image":
        return load_image_folder_pair(path, image_size=image_size, limit=limit)
    if kind == "text":
        return load_text_folder(path, limit=limit, max_length=facts.get("max_length"),
                                vocab_size=facts.get("vocab_size"), pad_idx=facts.get("pad_idx"))
    return load_audio_folder(path, limit=limit, max_length=facts.get("max_length"),
                             min_length=facts.get("min_length"), normalize=facts.get("normalize"))
