"""fairseq models, one registered component per file (``d2v_kd``, ``d2v_kd_multimodal``); ``load_student`` reads a
trained checkpoint of either for inference."""
from . import d2v_kd, d2v_kd_image_text, d2v_kd_multimodal  # noqa: F401  (registers the models)
from ._student import STUDENT_MODELS, load_student

__all__ = ["STUDENT_MODELS", "load_student"]
