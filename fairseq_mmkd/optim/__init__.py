"""fairseq optimizers: ``torch_adamw`` (PyTorch's fused AdamW behind fairseq's optimizer interface)."""
from . import torch_adamw  # noqa: F401  (registers the optimizer)
