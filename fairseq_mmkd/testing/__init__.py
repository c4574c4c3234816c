"""Test and benchmark tools shipped with the package: tiny teachers and data sets written in the real formats
(``fixtures.py``), and fairseq's own data2vec 2.0 code as a reference (``fairseq_reference.py``)."""
