"""Tiny teachers and data sets written in the real on-disk formats, for the tests and the benchmark scripts.

Every writer produces what the real tools produce: data2vec 2.0 checkpoints in fairseq's layout (written by the
plugin, their layout checked against fairseq's own loader by the tests), ImageFolder trees of JPEG and PNG files,
CIFAR in torchvision's pickle layout, text binarized by the real ``fairseq-preprocess``, and wav2vec manifests of
FLAC clips. Sizes are tiny (32-wide teachers, 32-pixel images) so that a training run takes seconds on a CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

BIN = Path(sys.executable).parent  # fairseq's console scripts of the running Python


TINY_TEACHER = dict(embed_dim=32, depth=4, num_heads=4, input_size=32, patch_size=8, prenet_depth=1,
                    num_extra_tokens=1, average_top_k_layers=3)


def make_teacher(path, seed=0, **overrides):
    """A randomly initialised data2vec2 image model saved as a fairseq data2vec_multi checkpoint."""
    from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
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
    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
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


def make_text_corpus(dest: Path) -> str:
    """The tests' text corpus (300 lines of 40 words, seeded), binarized with its own dictionary into ``dest``."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(300)]
    return write_text_corpus(dest, lines)


COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 215, 30),
          "purple": (140, 40, 170), "orange": (245, 140, 20), "black": (20, 20, 20), "white": (245, 245, 245),
          "pink": (245, 150, 190), "brown": (120, 70, 30)}
SHAPES = ("square", "circle", "stripe")
CAPTION_TEMPLATES = ("a {color} {shape}", "a {shape} that is {color}", "the {color} {shape} on grey",
                     "one {color} {shape}", "a picture of a {color} {shape}", "{color} {shape}",
                     "a big {color} {shape}")


def draw_shape(color, shape: str, size: int = 40, rng=None):
    """A grey picture of one coloured shape, slightly jittered (the content its captions name)."""
    from PIL import Image, ImageDraw

    rng = rng or np.random.default_rng(0)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    c = tuple(int(np.clip(v + rng.normal(0, 10), 0, 255)) for v in color)
    lo, hi = int(size * 0.15 + rng.integers(0, 4)), int(size * 0.85 - rng.integers(0, 4))
    if shape == "square":
        d.rectangle([lo, lo, hi, hi], fill=c)
    elif shape == "circle":
        d.ellipse([lo, lo, hi, hi], fill=c)
    else:
        d.rectangle([0, size // 3, size, 2 * size // 3], fill=c)
    return img


def write_captioned_images(root: Path, count: int = 30, seed: int = 0, max_captions: int = 3, prefix: str = "img",
                           size: int = 40) -> list:
    """``count`` PNG pictures of coloured shapes under ``root/images/`` with 1 to ``max_captions`` captions each;
    returns ``[(path relative to root, [captions])]``. Image ``i`` is colour ``i % 10`` and shape ``i // 10 % 3``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    out = []
    for i in range(count):
        color, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        rel = f"images/{prefix}_{i:04d}.png"
        draw_shape(COLORS[color], shape, size, rng).save(root / rel)
        n = int(rng.integers(1, max_captions + 1))
        picks = rng.choice(len(CAPTION_TEMPLATES), size=n, replace=False)
        out.append((rel, [CAPTION_TEMPLATES[int(k)].format(color=color, shape=shape) for k in picks]))
    return out


def write_albef_pairs(path: Path, records: list, one_entry_per_caption: bool = True) -> Path:
    """ALBEF/BLIP's JSON list: one entry per caption (their COCO training file), or per image with a caption list."""
    import json

    if one_entry_per_caption:
        items = [{"image": rel, "caption": c, "image_id": i} for i, (rel, caps) in enumerate(records) for c in caps]
    else:
        items = [{"image": rel, "caption": caps} for rel, caps in records]
    Path(path).write_text(json.dumps(items))
    return Path(path)


def write_karpathy_pairs(path: Path, splits: dict) -> Path:
    """Karpathy's dataset_coco.json layout: ``splits``: split name -> records (``filepath`` + ``filename``)."""
    import json

    images = []
    for split, records in splits.items():
        for rel, caps in records:
            folder, name = os.path.split(rel)
            images.append({"filepath": folder, "filename": name, "split": split, "imgid": len(images),
                           "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
    Path(path).write_text(json.dumps({"images": images, "dataset": "coco"}))
    return Path(path)


def write_word_dictionary(folder: Path, words) -> Path:
    """A fairseq ``dict.txt`` of whitespace words (``symbol count`` lines), as fairseq-preprocess writes one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dict.txt").write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(dict.fromkeys(words))))
    return folder


def caption_words() -> list:
    """Every word of the shape captions and of CLIP's CIFAR prompts for colour classes."""
    from ..retrieval.cross_modal import CIFAR_TEMPLATES

    from ..data.captions import split_words

    texts = [t.format(color=c, shape=s) for t in CAPTION_TEMPLATES for c in COLORS for s in SHAPES]
    texts += [t.format(c) for t in CIFAR_TEMPLATES for c in COLORS]
    return sorted({w for text in texts for w in split_words(text)})


def write_color_cifar(root: Path, name: str = "cifar10", n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR-10 in torchvision's layout whose classes are the colours of ``COLORS`` (class names in its meta file):
    zero-shot classification through captions of colours can be learned."""
    from ..retrieval import write_cifar

    rng = np.random.default_rng(seed)
    names = list(COLORS)

    def split(n):
        labels = np.arange(n) % 10
        imgs = np.stack([np.asarray(draw_shape(COLORS[names[c]], SHAPES[i % 3], 32, rng))
                         for i, c in enumerate(labels)])
        return imgs, labels.tolist()

    (tr, trl), (te, tel) = split(n_train), split(n_test)
    write_cifar(root, name, tr, trl, te, tel, class_names=names)
    return Path(root)
