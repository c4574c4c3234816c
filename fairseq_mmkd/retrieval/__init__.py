"""Zero-shot retrieval evaluation of image encoders on CIFAR-10/100 and labelled image folders.

``evaluate_retrieval`` is the single entry point shared by the fairseq task's validation and the
standalone evaluator ``python -m fairseq_mmkd.retrieval``. The package imports neither fairseq nor the
distillation model, so it can be tested and benchmarked on its own.
"""
from .cifar import CIFAR_LAYOUTS, load_cifar, write_cifar
from .evaluate import embed, evaluate_retrieval, metric_names, pool_features, preprocess
from .image_folder import load_image_folder_pair
from .search import faiss_available, topk_accuracy
from .sets import RetrievalDataError, RetrievalSet

__all__ = ["CIFAR_LAYOUTS", "RetrievalDataError", "RetrievalSet", "embed", "evaluate_retrieval",
           "faiss_available", "load_cifar", "load_image_folder_pair", "metric_names", "pool_features",
           "preprocess", "topk_accuracy", "write_cifar"]
