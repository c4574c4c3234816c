"""The offline demo: build data and (if needed) a teacher, run the real training, print the outcome.

Called by scripts/demo.sh in two steps:
    python scripts/demo.py prepare --out DIR [--modality M] [--teacher CKPT]   # data + teacher, as shell variables
    python scripts/demo.py report --out DIR [--modality M] --seconds N         # the final table

Images (the default): the photographs bundled with scikit-image (no download). Random crops of them form the
training ImageFolder (labels ignored by training), and a labelled retrieval set in CIFAR-100's pickle layout
whose class is the source photograph; its train and test crops come from different positions of the photo.
Text (``scripts/demo_text.py``): docstrings of Python's standard library, binarized by fairseq-preprocess;
retrieval by module. Audio (``scripts/demo_audio.py``): eight kinds of synthesised sounds; retrieval by kind.
All (``--modality all``): the three data sets above (one ``--out`` folder holds them all, so the single-modality
demos' data is reused) and three random teachers of one width, distilled into one student by ``kd_multimodal``.
Teacher: the checkpoint you pass, or a small randomly initialised data2vec2 model of the modality written with
the plugin's own code. A random model's pooled features still carry the input's statistics (colour and
texture; word choice; pitch and rhythm), so it retrieves far above chance; the student learns to mimic it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

PHOTOS = ["astronaut", "brick", "camera", "chelsea", "cell", "clock", "coffee", "coins", "colorwheel", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina",
          "rocket", "stereo_motorcycle", "text"]
DEMO_TEACHER = dict(embed_dim=192, num_heads=3, depth=4, prenet_depth=1, input_size=64, patch_size=8)
DEMO_SEQUENCE_TEACHER = dict(embed_dim=128, num_heads=4, depth=4, text_positions=64,
                             audio_conv="[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2",
                             conv_pos=dict(conv_pos_width=30, conv_pos_depth=3, conv_pos_groups=8))
# --modality all: one student stack serves the three teachers, so the image teacher takes the sequence teachers'
# width and heads (all three post-LN, as data2vec2's)
DEMO_ALL_IMAGE_TEACHER = dict(DEMO_TEACHER, embed_dim=DEMO_SEQUENCE_TEACHER["embed_dim"],
                              num_heads=DEMO_SEQUENCE_TEACHER["num_heads"])
# the released text and audio base models' sizes (scripts/bench_multimodal.py --size base): 12 blocks, 768 wide,
# data2vec2's audio conv extractor and positional convolution; the text vocabulary stays the demo dictionary's
BASE_SEQUENCE_TEACHER = dict(embed_dim=768, num_heads=12, depth=12, text_positions=512,
                             audio_conv="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2",
                             conv_pos=dict(conv_pos_width=95, conv_pos_depth=5, conv_pos_groups=16))
MODALITIES = ("image", "text", "audio")
CHOICES = MODALITIES + ("all", "image-text")
UNITS = {"image": "images/s", "text": "tokens/s", "audio": "samples/s"}


def load_photos() -> dict:
    import skimage.data

    photos = {}
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(float(img.max() - img.min()), 1e-8)).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        photos[name] = img[:, :, :3]
    return photos


def random_crop(img, rng, min_frac, max_frac, region=None):
    """A random square crop; ``region`` = (cell parity) keeps its centre in alternating 4x4 grid cells."""
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(min_frac, max_frac))
    for _ in range(1000):
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        cy, cx = (top + side / 2) * 4 // h, (left + side / 2) * 4 // w
        if region is None or int(cy + cx) % 2 == region:
            return img[top:top + side, left:left + side]
    raise RuntimeError("no crop found")


def prepare(out: Path, teacher: str | None, train_per_photo: int = 40, retrieval_train: int = 30,
            retrieval_test: int = 10, seed: int = 0, arch: dict = DEMO_TEACHER,
            teacher_name: str = "teacher_random_d2v2.pt") -> dict:
    from PIL import Image

    from fairseq_mmkd.retrieval import write_cifar

    rng = np.random.default_rng(seed)
    photos = load_photos()
    train_dir = out / "data" / "train"
    if not train_dir.exists():
        for name, img in photos.items():
            (train_dir / name).mkdir(parents=True, exist_ok=True)
            for i in range(train_per_photo):
                crop = Image.fromarray(random_crop(img, rng, 0.3, 0.9)).resize((128, 128), Image.BICUBIC)
                crop.save(train_dir / name / f"{i:03d}.jpg", quality=90)
    cifar_root = out / "data" / "retrieval"
    if not (cifar_root / "cifar-100-python").exists():
        def split(n, region):
            imgs, labels = [], []
            for label, img in enumerate(photos.values()):
                for _ in range(n):
                    crop = random_crop(img, rng, 0.2, 0.45, region)
                    imgs.append(np.asarray(Image.fromarray(crop).resize((32, 32), Image.BICUBIC)))
                    labels.append(label)
            return np.stack(imgs), labels

        (tr, trl), (te, tel) = split(retrieval_train, 0), split(retrieval_test, 1)
        write_cifar(cifar_root, "cifar100", tr, trl, te, tel)
    made_teacher = teacher is None
    if made_teacher:
        teacher = str(out / teacher_name)
        if not Path(teacher).exists():
            write_random_teacher(teacher, seed, arch)
    return {"DATA": str(train_dir), "RETRIEVAL": str(cifar_root), "TEACHER": teacher,
            "RANDOM_TEACHER": int(made_teacher)}


def write_random_teacher(path, seed: int = 0, arch: dict = DEMO_TEACHER) -> None:
    """data2vec2's own initialisation (truncated normal weights, N(0, 1) CLS token), saved in fairseq layout."""
    import torch

    from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
    from fairseq_mmkd.distill.distiller import init_random_
    from fairseq_mmkd.encoders.image import ImageEncoderConfig

    t = arch
    cfg = D2vConfig(embed_dim=t["embed_dim"], depth=t["depth"], num_heads=t["num_heads"],
                    encoder=ImageEncoderConfig(input_size=t["input_size"], patch_size=t["patch_size"],
                                               embed_dim=t["embed_dim"], prenet_depth=t["prenet_depth"],
                                               num_extra_tokens=1),
                    targets=TargetConfig(average_top_k_layers=t["depth"]))
    torch.manual_seed(seed)
    model = D2vModel(cfg)
    init_random_(model)
    torch.nn.init.normal_(model.encoder.extra_tokens)
    save_d2v_checkpoint(model, path)


def prepare_sequences(out: Path, modality: str, teacher: str | None, seed: int = 0,
                      arch: dict = DEMO_SEQUENCE_TEACHER, teacher_name: str = None) -> dict:
    """Text or audio demo data (``demo_text.py`` / ``demo_audio.py``) and, without ``teacher``, a random one."""
    if modality == "text":
        from demo_text import prepare_text

        found = prepare_text(out, seed=seed)
    else:
        from demo_audio import prepare_audio

        found = prepare_audio(out, seed=seed)
    vocab = found.pop("VOCAB", None)
    made = teacher is None
    if made:
        teacher = str(out / (teacher_name or f"teacher_random_d2v2_{modality}.pt"))
        if not Path(teacher).exists():
            write_random_sequence_teacher(teacher, modality, vocab, seed, arch)
    elif modality == "text":
        check_text_teacher(teacher, vocab, found["DATA"])
    return {**found, "TEACHER": teacher, "RANDOM_TEACHER": int(made)}


class DemoError(Exception):
    """A demo input that cannot work; the message names the problem and the fix."""


def check_text_teacher(teacher: str, vocab: int, data: str) -> None:
    """The text demo tokenises with a word dictionary of its own: a teacher must have been trained on it."""
    from fairseq_mmkd import load_d2v

    model = load_d2v(teacher)
    if model.cfg.modality != "text":
        raise DemoError(f"--teacher {teacher} is a data2vec 2.0 {model.cfg.modality} model; the text demo needs a "
                        f"text teacher (or run scripts/demo.sh --modality {model.cfg.modality} --teacher ...)")
    rows = model.cfg.encoder.vocab_size
    if rows != vocab:
        raise DemoError(f"--teacher {teacher} embeds {rows} tokens, but the text demo's dictionary ({data}/dict.txt, "
                        f"words of the standard-library docstrings) makes {vocab}: the demo's text cannot be fed to "
                        "this teacher; binarize your own text with the teacher's dict.txt and run kd_text as the "
                        "README shows (or drop --teacher for a random teacher on the demo's dictionary)")


def prepare_all(out: Path, seed: int = 0) -> dict:
    """The three demos' data (reused when ``out`` already holds it) and three random teachers of one width:
    the text and audio demos' own, and an image teacher of their width and heads."""
    image = prepare(out, None, seed=seed, arch=DEMO_ALL_IMAGE_TEACHER, teacher_name="teacher_random_d2v2_image.pt")
    found = {"IMAGE_DATA": image["DATA"], "IMAGE_RETRIEVAL": image["RETRIEVAL"], "IMAGE_TEACHER": image["TEACHER"]}
    for modality in ("text", "audio"):
        seq = prepare_sequences(out, modality, None, seed)
        found.update({f"{modality.upper()}_{k}": seq[k] for k in ("DATA", "RETRIEVAL", "TEACHER")})
    return {**found, "TEACHER": ", ".join(found[f"{m.upper()}_TEACHER"] for m in MODALITIES), "RANDOM_TEACHER": 1}


def write_random_sequence_teacher(path, modality: str, vocab_size: int | None, seed: int = 0,
                                  arch: dict = DEMO_SEQUENCE_TEACHER) -> None:
    """A text or audio data2vec2 model of ``arch`` (the demo's small one by default) with data2vec2's own
    initialisation, saved in fairseq layout."""
    import torch

    from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
    from fairseq_mmkd.distill.distiller import init_random_
    from fairseq_mmkd.encoders.audio import AudioEncoderConfig
    from fairseq_mmkd.encoders.text import TextEncoderConfig

    t = arch
    if modality == "text":
        encoder = TextEncoderConfig(vocab_size=vocab_size, max_source_positions=t["text_positions"], prenet_depth=0)
    else:
        encoder = AudioEncoderConfig(conv_spec=t["audio_conv"], **t["conv_pos"], prenet_depth=0,
                                     alibi_heads=t["num_heads"], model_depth=t["depth"])
    cfg = D2vConfig(modality=modality, embed_dim=t["embed_dim"], depth=t["depth"], num_heads=t["num_heads"],
                    norm_eps=1e-5, encoder=encoder,
                    targets=TargetConfig(average_top_k_layers=t["depth"], instance_norm_target_layer=True,
                                         layer_norm_targets=False))
    torch.manual_seed(seed)
    model = D2vModel(cfg)
    init_random_(model)
    if modality == "text":  # N(0, 0.02) embeddings as data2vec2 (init_bert_params), the pad row zero
        for emb in (model.encoder.local_encoder.embed_tokens, model.encoder.local_encoder.embed_positions):
            torch.nn.init.normal_(emb.weight, std=0.02)
            with torch.no_grad():
                emb.weight[encoder.pad_idx].zero_()
    save_d2v_checkpoint(model, path)


def json_lines(log: Path, kind: str) -> list:
    rows = []
    for line in log.read_text().splitlines():
        if f"[{kind}][" in line and "{" in line:
            try:
                rows.append(json.loads(line[line.index("{"):]))
            except json.JSONDecodeError:
                pass
    return rows


def retrieval_set(row: dict) -> str:
    """The name of the (first) retrieval set in a valid log row: ``cifar100``, ``docstrings``, ``sounds``."""
    names = [k[len("valid_"):-len("_top1")] for k in row if k.startswith("valid_") and k.endswith("_top1")
             and not k.startswith("valid_teacher_") and "_inv_" not in k]
    return "cifar100" if "cifar100" in names else names[0]


def described_set(modality: str) -> tuple:
    """``(classes, what, layout)`` of a demo's retrieval set."""
    if modality == "image":
        return len(PHOTOS), "scikit-image photo crops", "CIFAR-100 layout"
    from demo_audio import KINDS
    from demo_text import LABELLED_MODULES

    if modality == "text":
        return len(LABELLED_MODULES), "standard-library docstrings by module", "GLUE-style folder"
    return len(KINDS), "synthesised sounds by kind", "wav2vec manifests"


def training_losses(log: Path, key: str = "loss") -> tuple:
    """The logged distillation loss ``key`` at the start and at the end of training (interval lines, else epochs)."""
    rows = json_lines(log, "train_inner")
    if rows:
        return rows[0].get(key, "n/a"), rows[-1].get(key, "n/a")
    rows = json_lines(log, "train")
    return (rows[0].get(f"train_{key}", "n/a"), rows[-1].get(f"train_{key}", "n/a")) if rows else ("n/a", "n/a")


def table_header(width: int) -> None:
    print(f"{'metric':<{width}}{'teacher':>10}{'student @ first valid':>24}{'student @ end':>16}")


def retrieval_rows(first: dict, last: dict, name: str, prefix: str = "", width: int = 16) -> None:
    """The four retrieval rows of set ``name``: teacher, student at the first validation, student at the end."""
    for label, key in (("top-1", "top1"), ("top-3", "top3"), ("inverse top-1", "inv_top1"),
                       ("inverse top-3", "inv_top3")):
        key = f"{name}_{key}"
        t = last.get(f"valid_teacher_{key}", "n/a")
        print(f"{prefix + label:<{width}}{t:>10}{first.get(f'valid_{key}', 'n/a'):>24}"
              f"{last.get(f'valid_{key}', 'n/a'):>16}")


def read_run(out: Path):
    """The run's log, its validation rows and its last checkpoint; ``None`` (said on stderr) without validation."""
    import torch

    save = out / "checkpoints"
    log = save / "hydra" / "hydra_train.log"
    valid = json_lines(log, "valid")
    if not valid:
        print(f"no validation results in {log}", file=sys.stderr)
        return None
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    return save, log, valid, ckpt


def report(out: Path, seconds: float, random_teacher: bool, modality: str = "image") -> int:
    if modality == "all":
        return report_all(out, seconds)
    run = read_run(out)
    if run is None:
        return 1
    save, log, valid, ckpt = run
    first, last = valid[0], valid[-1]
    name = retrieval_set(last)
    student = sum(v.numel() for k, v in ckpt["model"].items() if ".student_blocks." in k or ".head." in k)
    encoder = sum(v.numel() for k, v in ckpt["model"].items() if ".shared_encoder." in k)
    from fairseq_mmkd import load_d2v

    teacher = load_d2v(ckpt["cfg"]["model"]["teacher_checkpoint"])
    teacher_blocks = sum(p.numel() for p in teacher.blocks.parameters())
    ips = [float(r["wps"]) for r in json_lines(log, "train_inner")]
    n_classes, what, layout = described_set(modality)
    start, end = training_losses(log)

    print()
    print("=" * 72)
    print(f"fairseq_mmkd {modality} demo: {'RANDOMLY INITIALISED demo teacher' if random_teacher else 'your teacher'}, "
          f"{int(last['valid_num_updates']) if 'valid_num_updates' in last else '?'} updates")
    print(f"zero-shot retrieval of {what} ({n_classes} classes, chance {100 / n_classes:.0f}% top-1), {layout}")
    print("-" * 72)
    table_header(16)
    retrieval_rows(first, last, name)
    print("-" * 72)
    print(f"parameters: trainable student {student / 1e6:.2f}M | frozen shared encoder {encoder / 1e6:.2f}M | "
          f"teacher blocks (not saved) {teacher_blocks / 1e6:.2f}M")
    if ips:
        print(f"training speed: {sum(ips) / len(ips):.0f} {UNITS[modality]} (mean of logged intervals, this machine)")
    print(f"distillation loss: {start} at the start -> {end} at the end")
    print(f"checkpoints: {save}/checkpoint_best.pt, checkpoint_last.pt")
    pictures = f"{save}/retrieval_examples.png, " if modality == "image" else ""
    print(f"log: {log}   pictures: {pictures}{out}/metrics.png")
    print(f"demo took {seconds:.0f} s")
    print("=" * 72)
    return 0


def report_all(out: Path, seconds: float) -> int:
    """The multimodal demo's table: per modality, teacher vs student retrieval, then sizes, speed and losses."""
    from fairseq_mmkd import load_d2v
    from fairseq_mmkd.retrieval.sets.image_folder import folder_set_name

    run = read_run(out)
    if run is None:
        return 1
    save, log, valid, ckpt = run
    first, last = valid[0], valid[-1]
    task, model = ckpt["cfg"]["task"], ckpt["cfg"]["model"]
    modalities = [m for m in MODALITIES if model.get(f"{m}_teacher")]
    sets = {m: "cifar100" if m == "image" else folder_set_name(task[f"{m}_retrieval_folder"]) for m in modalities}
    student = sum(v.numel() for k, v in ckpt["model"].items() if ".student_blocks." in k or ".heads." in k)
    encoders = {m: sum(v.numel() for k, v in ckpt["model"].items() if f".shared_encoders.{m}." in k)
                for m in modalities}
    teachers = {m: sum(p.numel() for p in load_d2v(model[f"{m}_teacher"], modality=m).blocks.parameters())
                for m in modalities}
    ups = [float(r["ups"]) for r in json_lines(log, "train_inner")]
    batches = {"image": f"{task['image_batch_size']} images",
               "text": f"{task['text_batch_size']} blocks of {task['tokens_per_sample']} tokens",
               "audio": f"up to {task['audio_max_tokens']:,} samples"}

    print()
    print("=" * 72)
    print(f"fairseq_mmkd multimodal demo: RANDOMLY INITIALISED {', '.join(modalities)} teachers, one student, "
          f"{int(last['valid_num_updates']) if 'valid_num_updates' in last else '?'} updates")
    for m in modalities:
        n_classes, what, layout = described_set(m)
        print(f"{m}: zero-shot retrieval of {what} ({n_classes} classes, chance {100 / n_classes:.0f}% top-1), "
              f"{layout}")
    print("-" * 72)
    table_header(22)
    for m in modalities:
        retrieval_rows(first, last, sets[m], prefix=f"{m} ", width=22)
    print("-" * 72)
    print(f"parameters: trainable student {student / 1e6:.2f}M, one for all | frozen shared encoders "
          + ", ".join(f"{m} {n / 1e6:.2f}M" for m, n in encoders.items()) + " | teacher blocks (not saved) "
          + ", ".join(f"{m} {n / 1e6:.2f}M" for m, n in teachers.items()))
    if ups:
        print(f"training speed: {sum(ups) / len(ups):.2f} updates/s (mean of logged intervals, this machine), each "
              "update one batch per modality: " + ", ".join(batches[m] for m in modalities))
    losses = {m: training_losses(log, f"loss_{m}") for m in modalities}
    print("distillation loss, start -> end: " + ", ".join(f"{m} {a} -> {b}" for m, (a, b) in losses.items()))
    print(f"checkpoints: {save}/checkpoint_best.pt, checkpoint_last.pt")
    print(f"log: {log}   pictures: {save}/retrieval_examples.png, {out}/metrics.png")
    print(f"demo took {seconds:.0f} s")
    print("=" * 72)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--modality", choices=CHOICES, default="image")
    a.add_argument("--teacher", default=None)
    a.add_argument("--train-per-photo", type=int, default=40)
    a.add_argument("--retrieval-train", type=int, default=30)
    a.add_argument("--retrieval-test", type=int, default=10)
    b = sub.add_parser("report")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--modality", choices=CHOICES, default="image")
    b.add_argument("--seconds", type=float, default=0.0)
    b.add_argument("--random-teacher", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        try:
            if args.modality == "image-text":
                if args.teacher:
                    raise DemoError("--teacher names one teacher; --modality image-text distils the demo's random image "
                                    "and text teachers (for your own, run kd_image_text as the README shows)")
                from demo_image_text import prepare_image_text

                found = prepare_image_text(args.out)
            elif args.modality == "all":
                if args.teacher:
                    raise DemoError("--teacher names one teacher; --modality all distils the demo's three random "
                                    "teachers (for your own, run kd_multimodal as the README shows)")
                found = prepare_all(args.out)
            elif args.modality == "image":
                found = prepare(args.out, args.teacher, args.train_per_photo, args.retrieval_train,
                                args.retrieval_test)
            else:
                found = prepare_sequences(args.out, args.modality, args.teacher)
        except DemoError as e:
            print(f"[demo] {e}", file=sys.stderr)
            return 2
        for k, v in found.items():
            print(f"{k}={shlex.quote(str(v))}")
        return 0
    if args.modality == "image-text":
        from demo_image_text import report_image_text

        return report_image_text(args.out, args.seconds)
    return report(args.out, args.seconds, bool(args.random_teacher), args.modality)


if __name__ == "__main__":
    sys.exit(main())
