"""Teacher-student modules (fairseq-free): ``distiller.py`` (one teacher, its frozen encoder shared with a student
stack) and ``multimodal.py`` (several teachers, one student stack)."""
