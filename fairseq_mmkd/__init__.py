"""fairseq_mmkd: self-supervised knowledge distillation of data2vec 2.0 models, as a fairseq plugin.

The numerical core (encoders, blocks, targets, checkpoint loading, retrieval) imports without fairseq, so
it can be benchmarked and reused anywhere. When fairseq is importable, importing this package also
registers the ``d2v_kd`` task, model and criterion (fairseq's ``--user-dir`` imports it for that).
"""
import importlib.util
import logging

from .checkpoint import CheckpointError, load_d2v, load_d2v_image, read_checkpoint
from .d2v_model import D2vConfig, D2vModel
from .targets import TargetConfig, make_targets

__all__ = ["CheckpointError", "D2vConfig", "D2vModel", "TargetConfig", "load_d2v", "load_d2v_image",
           "make_targets", "read_checkpoint"]

if importlib.util.find_spec("fairseq") is not None:
    # fairseq's text_to_speech module calls logging.basicConfig(level=DEBUG) on import; undo that side
    # effect so the plugin's own command-line tools do not print DEBUG lines of every library.
    _root = logging.getLogger()
    _level, _handlers = _root.level, list(_root.handlers)
    from . import kd_criterion, kd_model, kd_task, optim  # noqa: F401  (registers d2v_kd and torch_adamw)

    _root.setLevel(_level)
    for _h in [h for h in _root.handlers if h not in _handlers]:
        _root.removeHandler(_h)
