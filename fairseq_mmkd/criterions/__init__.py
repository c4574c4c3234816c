"""fairseq criterions, one registered component per file (``d2v_kd``, ``d2v_kd_multimodal``)."""
from . import d2v_kd, d2v_kd_image_text, d2v_kd_multimodal  # noqa: F401  (registers the criterions)
