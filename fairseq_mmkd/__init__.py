"""fairseq_mmkd: self-supervised knowledge distillation of data2vec 2.0 models, as a fairseq plugin.

Layers, one folder per role (docs/architecture.md): the fairseq-free core (``modules``, ``encoders``, ``d2v``,
``distill``, ``losses``, ``data``, ``retrieval``) below the thin fairseq glue (``tasks``, ``models``, ``criterions``,
``optim``, ``runtime``), with the entry points on top (``train``, ``export``, ``extract``, ``probe``,
``python -m fairseq_mmkd.retrieval``). When fairseq is importable, importing this package registers the tasks,
models, criterions and optimizer (fairseq's ``--user-dir`` imports it for that), with fairseq's import-time noise
filtered out (``runtime/quiet.py``); ``python -m fairseq_mmkd.train`` is ``fairseq-hydra-train`` with the plugin
imported first.
"""
import importlib.util

from .d2v.loading import CheckpointError, load_d2v, load_d2v_image, read_checkpoint
from .d2v.model import D2vConfig, D2vModel
from .modules.targets import TargetConfig, make_targets

__all__ = ["CheckpointError", "D2vConfig", "D2vModel", "TargetConfig", "load_d2v", "load_d2v_image",
           "make_targets", "read_checkpoint"]

if importlib.util.find_spec("fairseq") is not None:
    # fairseq prints import-time warnings about modules this plugin does not use, and one of its modules
    # calls logging.basicConfig(level=DEBUG) on import: both are silenced or undone here (see quiet.py).
    from .runtime import quiet

    quiet.install()
    with quiet.fairseq_import():
        from . import criterions, models, optim, tasks  # noqa: F401  (registers d2v_kd, d2v_kd_multimodal, torch_adamw)
