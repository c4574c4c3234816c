"""Zero-shot retrieval and k-NN evaluation of frozen encoders on labelled sets: CIFAR-10/100 and labelled image
folders, GLUE-style text folders and labelled audio folders.

``evaluate_retrieval`` is the single entry point shared by the fairseq task's validation and the
standalone evaluator ``python -m fairseq_mmkd.retrieval``; ``load_retrieval_folder`` reads a user's folder of
any modality (``folder_kind`` says which), fitted to the teacher (``teacher_facts``). The package imports
neither fairseq nor the distillation model at import time (the text folder reader imports fairseq's binary
readers when it runs), so it can be tested and benchmarked on its own.
"""
from .evaluate import (
                       embed,
                       embed_sequences,
                       evaluate_retrieval,
                       evaluation_protocol,
                       knn_metric_names,
                       metric_names,
                       pool_features,
                       preprocess,
                       standardize_embeddings,
)
from .knn import knn_accuracy, knn_predict
from .search import Neighbours, faiss_available, nearest_neighbours, topk_accuracy
from .sets.audio_folder import load_audio_folder
from .sets.base import RetrievalDataError, RetrievalSet
from .sets.cifar import CIFAR_LAYOUTS, load_cifar, write_cifar
from .sets.folders import fit_teacher, folder_kind, load_retrieval_folder, teacher_facts
from .sets.image_folder import load_image_folder_pair
from .sets.sequences import AudioRetrievalSet, SequenceRetrievalSet, TextRetrievalSet
from .sets.text_folder import load_text_folder

__all__ = ["AudioRetrievalSet", "CIFAR_LAYOUTS", "Neighbours", "RetrievalDataError", "RetrievalSet",
           "SequenceRetrievalSet", "TextRetrievalSet", "embed", "embed_sequences", "evaluate_retrieval",
           "evaluation_protocol", "faiss_available", "fit_teacher", "folder_kind", "knn_accuracy",
           "knn_metric_names", "knn_predict", "load_audio_folder", "load_cifar", "load_image_folder_pair",
           "load_retrieval_folder", "load_text_folder", "metric_names", "nearest_neighbours", "pool_features",
           "preprocess", "standardize_embeddings", "teacher_facts", "topk_accuracy", "write_cifar"]
