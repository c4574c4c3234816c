"""Training objectives (fairseq-free), one per file: ``regression.py`` (data2vec targets regressed with MSE)."""
