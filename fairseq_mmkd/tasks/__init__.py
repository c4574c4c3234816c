"""fairseq tasks, one registered component per file (``d2v_kd``, ``d2v_kd_multimodal``); helpers start with ``_``
(fairseq imports every other module of a user dir's ``tasks/``)."""
from . import d2v_kd, d2v_kd_image_text, d2v_kd_multimodal  # noqa: F401  (registers the tasks)
