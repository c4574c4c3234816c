"""Labelled evaluation sets for retrieval, k-NN and probes, one reader per format: CIFAR pickles (``cifar.py``), image
folders (``image_folder.py``), GLUE-style text folders (``text_folder.py``), wav2vec manifests with labels
(``audio_folder.py``); ``folders.py`` recognises which one a folder holds."""
