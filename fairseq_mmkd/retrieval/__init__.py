"""Zero-shot retrieval and k-NN evaluation of image encoders on CIFAR-10/100 and labelled image folders.

``evaluate_retrieval`` is the single entry point shared by the fairseq task's validation and the
standalone evaluator ``python -m fairseq_mmkd.retrieval``. The package imports neither fairseq nor the
distillation model, so it can be tested and benchmarked on its own.
"""
from .cifar import CIFAR_LAYOUTS, load_cifar, write_cifar
from .evaluate import (embed, evaluate_retrieval, evaluation_protocol, knn_metric_names, metric_names,
                       pool_features, preprocess, standardize_embeddings)
from .image_folder import load_image_folder_pair
from .knn import knn_accuracy, knn_predict
from .search import Neighbours, faiss_available, nearest_neighbours, topk_accuracy
from .sets import RetrievalDataError, RetrievalSet

__all__ = ["CIFAR_LAYOUTS", "Neighbours", "RetrievalDataError", "RetrievalSet", "embed", "evaluate_retrieval",
           "evaluation_protocol", "faiss_available", "knn_accuracy", "knn_metric_names", "knn_predict",
           "load_cifar", "load_image_folder_pair", "metric_names", "nearest_neighbours", "pool_features",
           "preprocess", "standardize_embeddings", "topk_accuracy", "write_cifar"]
