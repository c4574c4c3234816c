"""Zero-shot retrieval validation of the d2v_kd tasks: the configured sets read before training, fitted to the
teacher, checked against the model, and the feature function they embed with.
"""

import os
import sys

from ..retrieval import load_cifar, load_image_folder_pair
from ..retrieval.sets.image_folder import folder_set_name


def check_retrieval_settings(cfg) -> None:
    """Retrieval settings that are wrong whatever the model (checked before the teacher is loaded)."""
    if cfg.knn_k < 0:
        raise ValueError(f"task.knn_k={cfg.knn_k}: use the number of neighbours that vote (DINO: 20), or 0 for no "
                         "k-NN metrics")
    if cfg.knn_k and not cfg.knn_temperature > 0:
        raise ValueError(f"task.knn_temperature={cfg.knn_temperature} must be positive (DINO: 0.07)")
    if cfg.retrieval_layer > -1:
        raise ValueError(f"task.retrieval_layer={cfg.retrieval_layer}: use -1 for the last block or -k for the k-th "
                         "from last")


def check_retrieval_model(cfg, model) -> None:
    """Retrieval settings the model cannot serve: a layer deeper than the student (or the evaluated teacher),
    CLS pooling without a CLS token."""
    distiller = model.distiller
    stacks = [("student", distiller.student_blocks)]
    if cfg.retrieval_teacher and distiller.teacher_blocks is not None:
        stacks.append(("teacher", distiller.teacher_blocks))
    for who, blocks in stacks:
        if -cfg.retrieval_layer > len(blocks):
            raise ValueError(f"task.retrieval_layer={cfg.retrieval_layer}, but the {who} has {len(blocks)} blocks; "
                             f"use a layer between -{len(blocks)} and -1")
    reads_first = model.num_extra_tokens > 0 or model.modality == "text"  # text: the <s> token RoBERTa heads read
    if str(cfg.retrieval_pooling) in ("cls", "cls+mean") and not reads_first:
        raise ValueError(f"task.retrieval_pooling={cfg.retrieval_pooling}, but the teacher's encoder has no extra "
                         "(CLS) token; use task.retrieval_pooling=mean (or auto)")


def fit_retrieval_sets(sets: dict, cfg, model) -> None:
    """Fit text and audio retrieval sets to the teacher (dictionary size, positions, receptive field, audio
    normalisation: ``task.normalize`` or the teacher's own), once it is loaded."""
    from ..retrieval import fit_teacher, teacher_facts

    facts = teacher_facts(model.distiller.cfg, getattr(model, "teacher_task_cfg", None))
    if getattr(cfg, "normalize", None) is not None and facts["modality"] == "audio":
        facts["normalize"] = bool(getattr(cfg, "normalize"))
    for name, data in sets.items():
        fit_teacher(data, what=f"retrieval set {name}", **facts)


_IMAGES = object()


def feature_function(model, layer: int, teacher: bool):
    """What ``evaluate_retrieval`` embeds with: images -> features; text and audio ``(source, padding_mask)`` ->
    ``(features, padding mask at sequence resolution)``; the student's, or with ``teacher`` the teacher's."""
    def features(source, padding_mask=_IMAGES):
        if padding_mask is _IMAGES:
            return (model.teacher_features if teacher else model.forward_features)(source, layer=layer)
        return model.distiller.features(source, padding_mask, layer=layer, teacher=teacher)

    return features


def retrieval_progress(setting) -> bool:
    """``task.retrieval_progress``: auto shows the bar only when stderr (where tqdm draws) is a terminal."""
    value = str(setting).strip().lower()
    if value == "auto":
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"task.retrieval_progress={setting!r}: use auto (a bar only on a terminal), true or false")


def load_retrieval_sets(cfg, modality: str = "image") -> dict:
    """Read every configured retrieval set into memory now, so missing files fail before training."""
    limit = cfg.retrieval_limit or None
    sets = {}
    cifar = [name for name in ("cifar10", "cifar100") if getattr(cfg, f"{name}_root")]
    if modality != "image":
        if cifar:
            raise ValueError(f"task.{cifar[0]}_root is a retrieval set of images, but task.data holds {modality}; set "
                             f"task.{cifar[0]}_root=null and give a labelled {modality} folder as task.retrieval_folder")
        if not cfg.retrieval_folder:
            raise ValueError(f"task.retrieval=true but no retrieval data is configured: set task.retrieval_folder to a "
                             f"labelled {modality} folder, or turn validation retrieval off with task.retrieval=false")
        from ..retrieval import load_retrieval_folder

        folder = os.path.expanduser(cfg.retrieval_folder)
        data = load_retrieval_folder(folder, limit=limit)  # data errors now; fitted to the teacher in build_model
        if data.modality != modality:
            raise ValueError(f"task.retrieval_folder={cfg.retrieval_folder} holds {data.modality} items, but the "
                             f"training data is {modality}: give a labelled {modality} folder")
        sets[folder_set_name(folder)] = data
        return sets
    for name in cifar:
        sets[name] = load_cifar(os.path.expanduser(getattr(cfg, f"{name}_root")), name, limit=limit)
    if cfg.retrieval_folder:
        folder = os.path.expanduser(cfg.retrieval_folder)
        sets[folder_set_name(folder)] = load_image_folder_pair(folder, limit=limit)
    if not sets:
        raise ValueError("task.retrieval=true but no retrieval data is configured: set task.cifar10_root and/or "
                         "task.cifar100_root (download with scripts/prepare_data.py --cifar DIR) or "
                         "task.retrieval_folder, or turn validation retrieval off with task.retrieval=false")
    return sets
