"""Building blocks of data2vec 2.0 (fairseq-free): transformer blocks with padding masks and ALiBi biases
(``layers.py``), and the contextualised targets built from per-layer outputs (``targets.py``)."""
