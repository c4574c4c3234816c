"""Shared fixtures: tiny teachers, image folders and CIFAR sets written in the real on-disk formats."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hypothesis import settings

# Property tests draw the same examples on every run: CI cannot flake, and a failure reproduces locally.
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.load_profile("deterministic")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_TEACHER = dict(embed_dim=32, depth=4, num_heads=4, input_size=32, patch_size=8, prenet_depth=1,
                    num_extra_tokens=1, average_top_k_layers=3)


def make_teacher(path, seed=0, **overrides):
    """A randomly initialised data2vec2 image model saved as a fairseq data2vec_multi checkpoint."""
    from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
    from fairseq_mmkd.d2v_format import save_d2v_checkpoint
    from fairseq_mmkd.encoders.image import ImageEncoderConfig

    o = {**TINY_TEACHER, **overrides}
    cfg = D2vConfig(embed_dim=o["embed_dim"], depth=o["depth"], num_heads=o["num_heads"],
                    layer_norm_first=o.get("layer_norm_first", False),
                    encoder=ImageEncoderConfig(input_size=o["input_size"], patch_size=o["patch_size"],
                                               embed_dim=o["embed_dim"], prenet_depth=o["prenet_depth"],
                                               num_extra_tokens=o["num_extra_tokens"]),
                    targets=TargetConfig(average_top_k_layers=o["average_top_k_layers"]))
    torch.manual_seed(seed)
    model = D2vModel(cfg)
    with torch.no_grad():  # non-trivial CLS token and LayerNorm affines, as in a trained model
        for name, p in model.named_parameters():
            if p.requires_grad and p.ndim <= 3 and "positions" not in name:
                p.add_(0.1 * torch.randn_like(p))
    save_d2v_checkpoint(model, path)
    return path


TINY_TEXT = dict(embed_dim=32, depth=3, num_heads=4, max_source_positions=32, prenet_depth=0,
                 average_top_k_layers=3)
TINY_AUDIO = dict(embed_dim=32, depth=3, num_heads=4, conv_spec="[(32, 10, 5)] + [(32, 3, 2)] * 2", conv_pos_width=10,
                  conv_pos_depth=2, conv_pos_groups=4, prenet_depth=0, average_top_k_layers=2)


def make_sequence_teacher(path, modality: str, seed: int = 0, vocab_size: int = None, normalize: bool = True,
                          **overrides):
    """A randomly initialised data2vec2 text or audio model, written by the plugin in fairseq's layout (the
    layouts are checked against fairseq's own loader in test_text_audio_parity). Text needs the
    ``vocab_size`` of the dictionary it will read (dictionary + ``<mask>``); audio records ``normalize``."""
    from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
    from fairseq_mmkd.d2v_format import save_d2v_checkpoint
    from fairseq_mmkd.encoders.audio import AudioEncoderConfig
    from fairseq_mmkd.encoders.text import TextEncoderConfig

    o = {**(TINY_TEXT if modality == "text" else TINY_AUDIO), **overrides}
    if modality == "text":
        encoder = TextEncoderConfig(vocab_size=vocab_size, max_source_positions=o["max_source_positions"],
                                    prenet_depth=o["prenet_depth"])
    else:
        encoder = AudioEncoderConfig(conv_spec=o["conv_spec"], conv_pos_width=o["conv_pos_width"],
                                     conv_pos_depth=o["conv_pos_depth"], conv_pos_groups=o["conv_pos_groups"],
                                     prenet_depth=o["prenet_depth"], alibi_heads=o["num_heads"], model_depth=o["depth"])
    cfg = D2vConfig(modality=modality, embed_dim=o["embed_dim"], depth=o["depth"], num_heads=o["num_heads"],
                    norm_eps=1e-5, encoder=encoder,
                    targets=TargetConfig(average_top_k_layers=o["average_top_k_layers"], instance_norm_target_layer=True,
                                         layer_norm_targets=False))
    torch.manual_seed(seed)
    model = D2vModel(cfg)
    with torch.no_grad():  # away from the initial LayerNorm affines and zero biases, as in a trained model
        for name, p in model.named_parameters():
            if p.ndim <= 3:
                p.add_(0.1 * torch.randn_like(p))
    task = type(model.encoder).fairseq_task_cfg(encoder)
    if modality == "audio":
        task["normalize"] = normalize
    save_d2v_checkpoint(model, path, task_cfg=task)
    return path


def write_glue_folder(root: Path, splits: dict, srcdict) -> Path:
    """A sentence-classification folder as RoBERTa's GLUE preprocessing writes it, made by the real
    fairseq-preprocess: ``input0/`` (sentences, with the given dictionary) and ``label/`` (labels, their own
    dictionary); ``splits``: split -> list of ``(sentence, label)``."""
    root = Path(root)
    for i, (split, rows) in enumerate(splits.items()):
        write_text_corpus(root / "input0", [s for s, _ in rows], srcdict=srcdict, split=split)
        write_text_corpus(root / "label", [label for _, label in rows], split=split,
                          srcdict=None if i == 0 else root / "label" / "dict.txt")
    return root


def dictionary_size(folder) -> int:
    """Rows a teacher's token embedding needs for ``folder/dict.txt``: fairseq's 4 specials, the lines, <mask>."""
    return 4 + sum(1 for _ in open(Path(folder) / "dict.txt")) + 1


def write_photos(root: Path, classes: int = 3, per_class: int = 6, size=(48, 40), seed: int = 0):
    """An ImageFolder tree of small JPEG/PNG images with class-specific colour statistics."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=3)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
            ext = "jpg" if i % 2 == 0 else "png"
            Image.fromarray(arr).save(d / f"img_{i}.{ext}")
    return root


def write_tiny_cifar(root: Path, name: str, classes: int, n_train: int = 40, n_test: int = 20, seed: int = 0):
    """CIFAR-shaped data in torchvision's pickle layout whose classes differ in colour (learnable)."""
    from fairseq_mmkd.retrieval import write_cifar

    rng = np.random.default_rng(seed)
    means = rng.integers(30, 225, size=(classes, 3))

    def split(n):
        labels = np.arange(n) % classes
        imgs = np.clip(means[labels][:, None, None, :] + rng.normal(0, 25, size=(n, 32, 32, 3)), 0, 255)
        return imgs.astype(np.uint8), labels.tolist()

    (tr, trl), (te, tel) = split(n_train), split(n_test)
    write_cifar(root, name, tr, trl, te, tel)
    return root


def write_text_corpus(dest: Path, lines, srcdict=None, split: str = "train") -> str:
    """``lines`` binarized by the real ``fairseq-preprocess --only-source`` into ``dest`` (``dict.txt``,
    ``<split>.bin/.idx``); with ``srcdict`` the given dictionary is used instead of one built from the text."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    raw = dest.parent / f"{dest.name}.{split}.txt"
    raw.write_text("".join(f"{line}\n" for line in lines))
    cmd = [str(BIN / "fairseq-preprocess"), "--only-source", f"--{split}pref", str(raw), "--destdir", str(dest),
           "--workers", "1", *(["--srcdict", str(srcdict)] if srcdict else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"fairseq-preprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return str(dest)


def write_audio_manifest(folder: Path, lengths, rate: int = 16000, seed: int = 0, split: str = "train",
                         labels=None) -> Path:
    """FLAC clips of the given lengths (class-dependent tones plus noise) and a wav2vec manifest
    ``<split>.tsv`` listing them (root on the first line); with ``labels``, also ``<split>.label``."""
    import soundfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = [str(folder)]
    for i, n in enumerate(lengths):
        t = np.arange(n) / rate
        pitch = 200 + 150 * (labels[i] if labels is not None else i)
        wav = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.05 * rng.standard_normal(n)
        name = f"{split}_clip_{i}.flac" if split != "train" else f"clip_{i}.flac"
        soundfile.write(folder / name, wav.astype(np.float32), rate)
        rows.append(f"{name}\t{n}")
    (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    if labels is not None:
        (folder / f"{split}.label").write_text("".join(f"{label}\n" for label in labels))
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "tiny_d2v2.pt")


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "train")


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_tiny_cifar(root, "cifar10", 10)
    write_tiny_cifar(root, "cifar100", 100, n_train=100, n_test=50, seed=1)
    return root


SIZES = {  # what makes the tiny runs tiny, on top of preset=tiny
    "text": ["task.tokens_per_sample=16"],
    "audio": ["task.min_sample_size=800", "task.max_sample_size=2000", "dataset.max_tokens=16000",
              "dataset.batch_size=null", "optimization.update_freq=[1]"],
}


def make_text_corpus(dest: Path) -> str:
    """The tests' text corpus (300 lines of 40 words, seeded), binarized with its own dictionary into ``dest``."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(300)]
    return write_text_corpus(dest, lines)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("text") / "bin")


@pytest.fixture(scope="session")
def audio_manifest(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_audio_manifest(tmp_path_factory.mktemp("audio") / "clips",
                                [int(n) for n in rng.integers(1000, 4000, size=40)])


@pytest.fixture(scope="session")
def retrieval_folders(tmp_path_factory, text_corpus):
    """modality -> a labelled retrieval folder: text (GLUE layout, two topics of distinct words) and audio
    (two kinds of tone, train/valid manifests with labels)."""
    root = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(1)
    topics = {"low": [f"w{i}" for i in range(20)], "high": [f"w{i}" for i in range(20, 40)]}

    def rows(n):
        return [(" ".join(rng.choice(words, size=6)), label) for label, words in topics.items() for _ in range(n)]

    text = write_glue_folder(root / "topics", {"train": rows(6), "valid": rows(3)}, Path(text_corpus) / "dict.txt")
    audio = root / "tones"
    write_audio_manifest(audio, [1600] * 6, labels=[0, 1] * 3, split="train", seed=2)
    write_audio_manifest(audio, [1600] * 4, labels=[0, 1] * 2, split="valid", seed=3)
    return {"text": text, "audio": audio}


@pytest.fixture(scope="session")
def sequence_setup(tmp_path_factory, text_corpus, audio_manifest):
    """modality -> (data, teacher): tiny teachers whose sizes fit the data (text: the corpus' dictionary)."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "text": (text_corpus, make_sequence_teacher(root / "text.pt", "text", vocab_size=dictionary_size(text_corpus))),
        "audio": (audio_manifest, make_sequence_teacher(root / "audio.pt", "audio")),
    }


def args_for(setup, modality, *extra):
    data, teacher = setup[modality]
    return [f"task.data={data}", f"model.teacher_checkpoint={teacher}", *SIZES[modality], *extra]


def hydra_train(save_dir, *overrides, config="kd_image", preset="tiny", env=None, timeout=600, check=True, launcher=()):
    """Run the real ``fairseq-hydra-train`` from the repo root; returns the CompletedProcess."""
    cmd = [*launcher, str(BIN / "fairseq-hydra-train"), "--config-dir", "config", "--config-name", config, *([f"preset={preset}"] if preset else []),
           f"checkpoint.save_dir={save_dir}", *overrides]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"fairseq-hydra-train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def assert_same_model(a: dict, b: dict, atol: float, rtol: float) -> None:
    """Every weight of checkpoint ``a`` (a loaded checkpoint dict) equals ``b``'s within the tolerances, named on
    failure."""
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def learning_rates(text: str) -> list:
    """The learning rate of every update of a run logged with ``common.log_interval=1``, in update order."""
    lrs = {int(r["num_updates"]): float(r["lr"]) for r in json_log_lines(text, "train_inner")}
    assert lrs and sorted(lrs) == list(range(1, max(lrs) + 1)), f"not every update was logged: {sorted(lrs)}"
    return [lrs[n] for n in sorted(lrs)]


def gradient_free_names(text: str) -> list:
    """The parameters a run's log says it froze because the loss gives them no gradient."""
    marker = "keep their initial values (README, architecture notes): "
    lines = [line for line in text.splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1].strip().split(", ") if lines else []


def assert_same_updates(a: dict, b: dict, lrs, frozen=()) -> None:
    """Checkpoints ``a`` and ``b`` hold the same weights up to what float rounding can make of the Adam updates at
    learning rates ``lrs`` that led to them (one per update), and bitwise the same ``frozen`` parameters (no update
    touches them).

    Per element, an update adds ``lr_t * m/(sqrt(v) + eps)``, a step of at most about ``lr_t``, and stores the sum in
    float32. Two runs that differ only in rounding (summation order, a different CPU) can round every stored sum
    differently (one ulp of the largest weight of the tensor per update) and every step differently; a step's
    relative rounding is ~1e-7 and the updates that follow can amplify it where an element's gradient is near zero,
    bounded by its own step size: ``1e-4 * sum(lr_t)`` allows that amplification a factor of 1,000. A run whose
    gradients differ (another batch on one worker) moves its weights by a fraction of ``sum(lr_t)`` itself.
    """
    frozen = set(frozen)
    assert set(a["model"]) == set(b["model"]) and frozen <= set(a["model"]), sorted(frozen - set(a["model"]))
    step_bound = 1e-4 * sum(lrs)
    for k, v in a["model"].items():
        if k in frozen:
            assert torch.equal(b["model"][k], v), f"{k} is frozen but changed"
            continue
        ulp = torch.finfo(v.dtype).eps * float(v.abs().max())
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=step_bound + len(lrs) * ulp,
                                   msg=lambda m: f"{k}: {m}")


def assert_same_losses(text_a: str, text_b: str) -> None:
    """The same loss at every logged update: fairseq prints losses rounded to 4 decimals, so values that agree to
    float rounding print at most one unit of the last digit apart."""
    la = [float(r["loss"]) for r in json_log_lines(text_a, "train_inner")]
    lb = [float(r["loss"]) for r in json_log_lines(text_b, "train_inner")]
    assert la and len(la) == len(lb), (len(la), len(lb))
    assert la == pytest.approx(lb, rel=0, abs=1.5e-4)


def json_log_lines(text: str, kind: str = "train_inner") -> list:
    """fairseq's json log lines of one kind (train_inner, train, valid) from a run's output: Hydra's log format
    (``[time][kind][INFO] - {...}``, fairseq-hydra-train) or fairseq's (``time | INFO | kind | {...}``, its argparse
    tools)."""
    out = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0 or (f"[{kind}][" not in line[:start] and f"| {kind} | " not in line[:start]):
            continue
        try:
            out.append(json.loads(line[start:]))
        except json.JSONDecodeError:
            pass
    return out
