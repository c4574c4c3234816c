"""Built-in data of the text demo: real sentences that ship with Python, in the formats fairseq users have.

Training text: the docstrings of the standard library's modules (every public function, class and method),
one paragraph per line, tokenised into lower-case words and punctuation. Retrieval set: the docstring
paragraphs of a few well-documented modules, labelled by module, split into train (memory bank) and valid
(queries) halves. Everything is binarized by ``fairseq-preprocess``'s own code (``fairseq_cli.preprocess``,
its three runs in one process) with one dictionary built from the training text, the way RoBERTa's GLUE
preprocessing lays out a sentence-classification folder (``input0/`` sentences and ``label/`` labels, each with
``dict.txt`` and ``train``/``valid`` splits).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

# Retrieval classes: well-documented modules whose docstrings talk about different things.
LABELLED_MODULES = ["json", "re", "random", "collections", "pathlib", "shutil", "datetime", "argparse", "logging",
                    "subprocess", "tarfile", "socket"]
TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
SKIP = re.compile(r"^(idlelib|tkinter|turtle|test|lib2to3|ensurepip|venv|antigravity|this|__)")


def tokenize(text: str) -> str:
    return " ".join(TOKEN.findall(text.lower()))


def paragraphs(module_name: str, max_words: int = 60) -> list:
    """Tokenised docstring paragraphs of a module's public members (at least 4 words each)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except Exception:
            return []
    docs = [inspect.getdoc(module) or ""]
    for name, member in vars(module).items():
        if name.startswith("_") or getattr(member, "__module__", module_name) != module_name:
            continue
        docs.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            docs += [inspect.getdoc(m) or "" for n, m in vars(member).items() if not n.startswith("_")]
    out = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            words = tokenize(" ".join(para.split())).split()
            if len(words) >= 4:
                out.append(" ".join(words[:max_words]))
    return sorted(set(out))


def corpus_modules() -> list:
    names = sorted({m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(sys.base_prefix)
                    and not SKIP.match(m.name)})
    return names


# fairseq-preprocess's own entry point, run once per job in one process: the three binarizations of the demo
# then pay for one fairseq import (several seconds) instead of three. Each job gets a fresh log handler.
_PREPROCESS = """
import json, sys
from fairseq import options
from fairseq_cli import preprocess
for argv in json.loads(sys.argv[1]):
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    for h in list(preprocess.logger.handlers):
        preprocess.logger.removeHandler(h)
        h.close()
"""


def preprocess_args(dest: Path, trainpref: Path, validpref: Path = None, srcdict: Path = None,
                    nwords: int = 0) -> list:
    """The ``fairseq-preprocess --only-source`` command line of one binarization."""
    argv = ["--only-source", "--trainpref", str(trainpref), "--destdir", str(dest), "--workers", "1"]
    if validpref:
        argv += ["--validpref", str(validpref)]
    if srcdict:
        argv += ["--srcdict", str(srcdict)]
    if nwords:
        argv += ["--nwordssrc", str(nwords)]
    return argv


def preprocess(*jobs: list) -> None:
    """Run fairseq-preprocess (``fairseq_cli.preprocess``) with each argument list of ``jobs``, in order."""
    proc = subprocess.run([sys.executable, "-c", _PREPROCESS, json.dumps(list(jobs))], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed: {(proc.stdout + proc.stderr)[-2000:]}")


def prepare_text(out: Path, per_class_cap: int = 60, nwords: int = 3000, seed: int = 0) -> dict:
    """Write ``out/data/text-bin`` (training) and ``out/data/docstrings`` (retrieval folder); returns their paths
    and the vocabulary size a teacher needs (dictionary + ``<mask>``)."""
    rng = np.random.default_rng(seed)
    data = out / "data"
    train_bin, folder = data / "text-bin", data / "docstrings"
    if not (folder / "label" / "dict.txt").exists():  # the last file written
        data.mkdir(parents=True, exist_ok=True)
        labelled = {m: paragraphs(m) for m in LABELLED_MODULES}
        held_out = {p for ps in labelled.values() for p in ps}
        corpus = [p for m in corpus_modules() for p in paragraphs(m) if p not in held_out]
        rng.shuffle(corpus)
        (data / "train.tok").write_text("\n".join(corpus) + "\n")
        splits = {"train": ([], []), "valid": ([], [])}
        for label, module in enumerate(LABELLED_MODULES):
            paras = list(labelled[module])
            rng.shuffle(paras)
            paras = paras[:per_class_cap]
            half = len(paras) // 2
            for split, part in (("train", paras[:half]), ("valid", paras[half:])):
                splits[split][0].extend(part)
                splits[split][1].extend([module] * len(part))
        for split, (sentences, labels) in splits.items():
            (data / f"{split}.input0").write_text("\n".join(sentences) + "\n")
            (data / f"{split}.label").write_text("\n".join(labels) + "\n")
        preprocess(preprocess_args(train_bin, data / "train.tok", nwords=nwords),
                   preprocess_args(folder / "input0", data / "train.input0", data / "valid.input0",
                                   srcdict=train_bin / "dict.txt"),
                   preprocess_args(folder / "label", data / "train.label", data / "valid.label"))
    symbols = sum(1 for _ in open(train_bin / "dict.txt"))
    return {"DATA": str(train_bin), "RETRIEVAL": str(folder), "VOCAB": 4 + symbols + 1}
