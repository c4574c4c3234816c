"""Run safety around fairseq: atomic checkpoint writes and numerical guards (``guards.py``), one run per save folder
and reruns (``save_dir.py``), atomic file writes (``files.py``), fairseq's import-time noise (``quiet.py``)."""
