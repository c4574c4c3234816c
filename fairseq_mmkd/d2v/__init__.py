"""The data2vec 2.0 model (fairseq-free): ``model.py`` (encoder + shared blocks, for inference), ``loading.py`` (read
fairseq checkpoints of any modality), ``writing.py`` (write models back in fairseq's layout)."""
