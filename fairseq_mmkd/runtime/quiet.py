"""A quiet start: fairseq's and Hydra's messages about things this plugin does not use, silenced one by one.

What a tiny ``fairseq-hydra-train`` run printed before its first line of its own (fairseq-fixed 0.12.3.1,
hydra-core 1.3.2, torch 2.14.1), and where each comes from:

- torch's ``FutureWarning: torch.jit.script is deprecated``: ``fairseq.models.model_utils`` decorates
  helpers with it when fairseq is imported;
- ``INFO:fairseq.tasks.text_to_speech:Please install tensorboardX``: fairseq's task registry imports the
  text-to-speech task, which looks for tensorboardX;
- Hydra's ``DEBUG ... Setting JobRuntime`` lines: ``fairseq.models.wav2vec.wav2vec2_classification`` calls
  ``logging.basicConfig(level=DEBUG)`` when imported, so every library's DEBUG lines are printed until Hydra
  configures logging;
- Hydra's ``UserWarning: The version_base parameter is not specified`` (fairseq's ``@hydra.main``);
- twice Hydra's ``UserWarning: 'kd_image' is validated against ConfigStore schema with the same name``:
  that is how fairseq validates a YAML config (``hydra_init`` stores its ``FairseqConfig`` under the
  config's name), nothing a user can change;

and, once training runs on a CPU, torch's ``'pin_memory' argument is set as true but no accelerator is
found`` and the ``FutureWarning`` for fairseq's own ``torch.cuda.amp.autocast(...)`` call.

Each is silenced by its exact message (and, for fairseq's autocast call, only when fairseq makes it), so the
same warning from anything else still shows: :func:`install` adds the filters that must hold for the whole
process, :func:`fairseq_import` the ones that only concern importing fairseq. Importing this package does
both. ``fairseq-hydra-train`` imports fairseq and Hydra before it imports the plugin (``common.user_dir``),
so with it the import-time lines above still appear; ``python -m fairseq_mmkd.train`` (the same command
line, see :mod:`fairseq_mmkd.train`) imports the plugin first and starts without them.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

#: (category, message regex, module regex) silenced for the whole process.
PROCESS_WARNINGS = (
    (UserWarning, r"\s*'[^']*' is validated against ConfigStore schema with the same name", ""),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found", ""),
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", r"fairseq\."),
)

#: (category, message regex) silenced only while fairseq (and its Hydra entry point) is being imported.
IMPORT_WARNINGS = (
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
    (UserWarning, r"\s*The version_base parameter is not specified"),
)

#: (logger name, message prefix) of log records dropped.
LOG_LINES = (
    ("fairseq.tasks.text_to_speech", "Please install tensorboardX"),
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Add the process-wide filters (once)."""
    for category, message, module in PROCESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in LOG_LINES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropMessage(prefix))


@contextlib.contextmanager
def fairseq_import():
    """Import fairseq inside this block: its import-time warnings are dropped, and the root logger's level
    and handlers are put back afterwards (undoing ``logging.basicConfig(level=DEBUG)`` in
    ``wav2vec2_classification``, which would otherwise print every library's DEBUG lines)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        with warnings.catch_warnings():
            for category, message in IMPORT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        root.setLevel(level)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
