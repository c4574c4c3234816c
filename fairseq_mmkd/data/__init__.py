"""Training data per modality: ``image`` (ImageFolder trees or path lists), ``text`` (fairseq-preprocess
output cut into blocks) and ``audio`` (wav2vec manifests of 16 kHz files).

Each module finds and validates its data before training starts, reads it robustly (bad files are skipped,
counted and limited), and draws its randomness from generators seeded by ``(seed, epoch, sample)`` so that a
resumed run sees exactly the batches an uninterrupted one would. The fairseq task wraps them.
"""
