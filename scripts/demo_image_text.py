"""Built-in data of the image-text demo (``scripts/demo.sh --modality image-text``): captioned pictures, offline.

Pictures of a coloured shape on grey (10 colours x 3 shapes, jittered), each with 1 to 3 captions from seven
phrasings ("a red circle", "a circle that is red", ...; ``fairseq_mmkd.testing.fixtures``): training pairs as an
ALBEF/BLIP JSON list, held-out pairs as Karpathy's ``dataset_coco.json`` (its ``test`` split), CIFAR-10 whose ten
classes are the colours (class names in its meta file) for zero-shot classification, a dictionary of the words and
two random data2vec 2.0 teachers of one width (an image and a text model, as the multimodal demo's). A random
teacher pair is unaligned: an image and its caption land in unrelated places (retrieval at chance); the student
learns to align them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from demo import DEMO_ALL_IMAGE_TEACHER, json_lines, write_random_sequence_teacher, write_random_teacher

TRAIN_IMAGES, VALID_IMAGES = 300, 60


def prepare_image_text(out: Path, seed: int = 0) -> dict:
    from fairseq_mmkd.testing.fixtures import (caption_words, dictionary_size, write_albef_pairs,
                                               write_captioned_images, write_color_cifar, write_karpathy_pairs,
                                               write_word_dictionary)

    data = out / "data" / "image_text"
    if not (data / "train.json").exists():
        train = write_captioned_images(data, TRAIN_IMAGES, seed=seed, prefix="train", size=72)
        held_out = write_captioned_images(data, VALID_IMAGES, seed=seed + 1, prefix="test", size=72)
        write_albef_pairs(data / "train.json", train)
        write_karpathy_pairs(data / "dataset_coco.json", {"test": held_out})
        write_word_dictionary(data / "dict", caption_words())
        write_color_cifar(data / "cifar", n_train=100, n_test=100, seed=seed)
    image_teacher, text_teacher = out / "teacher_random_d2v2_image_text_image.pt", out / "teacher_random_d2v2_image_text_text.pt"
    if not image_teacher.exists():
        write_random_teacher(image_teacher, seed, DEMO_ALL_IMAGE_TEACHER)
    if not text_teacher.exists():
        write_random_sequence_teacher(text_teacher, "text", dictionary_size(data / "dict"), seed)
    return {"PAIRS": data / "train.json", "VALID_PAIRS": data / "dataset_coco.json", "TEXT_DICT": data / "dict",
            "CIFAR": data / "cifar", "IMAGE_TEACHER": image_teacher, "TEXT_TEACHER": text_teacher,
            "TEACHER": f"{image_teacher}, {text_teacher}", "RANDOM_TEACHER": 1}


def draw_examples(checkpoint: Path, pairs: Path, path: Path, queries: int = 4) -> Path:
    """A picture: image queries with their top-3 captions, and caption queries with their top-3 images."""
    import torch
    from PIL import Image, ImageDraw

    from fairseq_mmkd.data.captions import CaptionTokenizer
    from fairseq_mmkd.data.image import load_eval_crops
    from fairseq_mmkd.data.pairs import read_pairs
    from fairseq_mmkd.models import load_student
    from fairseq_mmkd.retrieval.cross_modal import embed_captions, embed_images

    model = load_student(checkpoint)
    task = torch.load(checkpoint, map_location="cpu", weights_only=True)["cfg"]["task"]
    data = read_pairs(pairs, splits=("test",))
    tok = CaptionTokenizer(task["text_dict"], max_tokens=model.distiller.cfgs["text"].encoder.max_source_positions)
    size = model.modality_model("image").input_size
    crops = load_eval_crops(data.images, size)
    image = embed_images(model.embed, crops, size)
    text = embed_captions(model.embed, tok.encode_all(data.captions), tok.pad)
    sims = image @ text.t()
    cell, width = 72, 72 * 4 + 360
    canvas = Image.new("RGB", (width, cell * queries * 2 + 40), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 4), "image -> top-3 captions (green: its own)       caption -> top-3 images (green frame: its own)",
           fill="black")
    for q in range(queries):
        i = q * (len(data.images) // queries)
        y = 30 + q * cell
        canvas.paste(Image.open(data.images[i]).convert("RGB").resize((cell - 4, cell - 4)), (2, y))
        for r, j in enumerate(sims[i].topk(3).indices.tolist()):
            own = int(data.caption_image[j]) == i
            d.text((cell + 8, y + 6 + 20 * r), f"{r + 1}. {data.captions[j]}", fill="green" if own else "red")
    for q in range(queries):
        j = q * (len(data.captions) // queries)
        y = 30 + (queries + q) * cell
        d.text((4, y + cell // 2 - 6), data.captions[j][:40], fill="black")
        for r, i in enumerate(sims[:, j].topk(3).indices.tolist()):
            x = 300 + r * cell
            own = int(data.caption_image[j]) == i
            d.rectangle([x - 2, y - 2, x + cell - 2, y + cell - 2], outline="green" if own else "red", width=3)
            canvas.paste(Image.open(data.images[i]).convert("RGB").resize((cell - 6, cell - 6)), (x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def chance_i2t(counts, k: int) -> float:
    """Recall@k of a random ranking, image->text: the chance that one of an image's ``c`` captions is among ``k``
    drawn from all ``C`` captions, ``1 - C(C - c, k) / C(C, k)``, averaged over the images (percent)."""
    from math import comb

    total = sum(counts)
    return 100 * sum(1 - comb(total - c, k) / comb(total, k) for c in counts) / len(counts)


def report_image_text(out: Path, seconds: float) -> int:
    save = out / "checkpoints"
    log = save / "hydra" / "hydra_train.log"
    valid = json_lines(log, "valid")
    if not valid:
        print(f"no validation results in {log}", file=sys.stderr)
        return 1
    first, last = valid[0], valid[-1]
    pairs = json.loads((out / "data" / "image_text" / "dataset_coco.json").read_text())["images"]
    counts = [len(p["sentences"]) for p in pairs]
    images, captions = len(counts), sum(counts)
    print()
    print("=" * 78)
    print(f"fairseq_mmkd image-text demo: RANDOMLY INITIALISED image and text teachers (unaligned), "
          f"{last.get('valid_num_updates', '?')} updates")
    print(f"zero-shot retrieval of {images} held-out pictures and their {captions} captions; zero-shot classification "
          "of 10 colours")
    print("-" * 78)
    print(f"{'metric':<26}{'chance':>8}{'teachers':>10}{'student @ first':>17}{'student @ end':>15}")
    for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
        for k in (1, 5, 10):
            key = f"dataset_coco_{direction}_r{k}"
            chance = chance_i2t(counts, k) if direction == "i2t" else 100 * min(1.0, k / images)
            print(f"{label + f' R@{k}':<26}{chance:>7.1f}%{last.get(f'valid_teacher_{key}', 'n/a'):>10}"
                  f"{first.get(f'valid_{key}', 'n/a'):>17}{last.get(f'valid_{key}', 'n/a'):>15}")
    for k in (1, 5):
        key = f"cifar10_zeroshot_top{k}"
        print(f"{f'zero-shot colours top-{k}':<26}{10 * k:>7.0f}%{last.get(f'valid_teacher_{key}', 'n/a'):>10}"
              f"{first.get(f'valid_{key}', 'n/a'):>17}{last.get(f'valid_{key}', 'n/a'):>15}")
    print("-" * 78)
    rows = json_lines(log, "train_inner")
    if rows:
        print(f"contrastive loss: {rows[0].get('contrastive')} at the start -> {rows[-1].get('contrastive')} at the end;"
              f" temperature {rows[-1].get('temperature')}")
    picture = draw_examples(save / "checkpoint_last.pt", out / "data" / "image_text" / "dataset_coco.json",
                            save / "image_text_examples.png")
    print(f"checkpoints: {save}/checkpoint_best.pt, checkpoint_last.pt")
    print(f"log: {log}   pictures: {picture}, {out}/metrics.png")
    print(f"demo took {seconds:.0f} s")
    print("=" * 78)
    return 0
