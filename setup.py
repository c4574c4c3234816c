"""fairseq_mmkd: self-supervised knowledge distillation of data2vec 2.0 models as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="fairseq_mmkd",
    version="0.1.0",
    description="Distil data2vec 2.0 teachers into smaller students with fairseq (--user-dir plugin)",
    packages=find_packages(include=["fairseq_mmkd", "fairseq_mmkd.*"]),
    python_requires=">=3.10",
    # fairseq itself is not listed: on Python >= 3.11 the working build is `fairseq-fixed`, whose
    # torchaudio requirement would pull a second torch. Install it yourself, after this package (README,
    # "Install into your own environment"): pip install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
    # hydra-core and omegaconf are pinned to what fairseq-fixed pins (and this project tests): a range here let
    # pip pick newer releases that fairseq-fixed's metadata refuses (tests/fairseq_tools/test_fairseq_cli.py checks
    # the pins).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4",
        "faiss-gpu>=1.7",
        "soundfile>=0.12",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "timm>=0.9", "scikit-image>=0.21"]},
)
