"""fairseq_mmkd: self-supervised knowledge distillation of data2vec 2.0 models, as a fairseq plugin.

The numerical core (encoders, blocks, targets, checkpoint loading, retrieval) imports without fairseq, so
it can be benchmarked and reused anywhere. When fairseq is importable, importing this package also
registers the ``d2v_kd`` task, model and criterion (fairseq's ``--user-dir`` imports it for that), with
fairseq's import-time noise filtered out (``quiet.py``); ``python -m fairseq_mmkd.train`` is
``fairseq-hydra-train`` with the plugin imported first.
"""
import importlib.util

from .checkpoint import CheckpointError, load_d2v, load_d2v_image, read_checkpoint
from .d2v_model import D2vConfig, D2vModel
from .targets import TargetConfig, make_targets

__all__ = ["CheckpointError", "D2vConfig", "D2vModel", "TargetConfig", "load_d2v", "load_d2v_image",
           "make_targets", "read_checkpoint"]

if importlib.util.find_spec("fairseq") is not None:
    # fairseq prints import-time warnings about modules this plugin does not use, and one of its modules
    # calls logging.basicConfig(level=DEBUG) on import: both are silenced or undone here (see quiet.py).
    from . import quiet

    quiet.install()
    with quiet.fairseq_import():
        from . import kd_criterion, kd_model, kd_multimodal, kd_task, optim  # noqa: F401  (registers d2v_kd, d2v_kd_multimodal, torch_adamw)
