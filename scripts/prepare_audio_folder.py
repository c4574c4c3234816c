#!/usr/bin/env python
"""Turn a folder of labelled audio (one subfolder per class) into the retrieval folder audio validation reads.

    python scripts/prepare_audio_folder.py SPEECH_COMMANDS_DIR /data/commands --valid-list validation_list.txt
    python scripts/prepare_audio_folder.py MY_SOUNDS_DIR /data/sounds --valid-percent 20

Writes ``DEST/train.tsv`` and ``DEST/valid.tsv`` (wav2vec manifests: the source folder on the first line, then
``relative/path<TAB>num_samples``) and ``DEST/train.label`` / ``DEST/valid.label`` (the class of each line, in
manifest order): the layout of ``task.retrieval_folder`` for audio teachers, train as memory bank and valid as
queries. Subfolders starting with ``_`` (Speech Commands' ``_background_noise_``) are skipped. The split comes
from a list of relative paths (``--valid-list``, e.g. Speech Commands' ``validation_list.txt``; files in
``--exclude-list`` such as its ``testing_list.txt`` are left out) or a seeded per-class fraction. Every file must be
16 kHz (data2vec 2.0 audio models take nothing else): others are listed and the script exits 2.

For the unlabelled training manifest use fairseq's own script:
``python -m fairseq.examples.wav2vec.wav2vec_manifest AUDIO_DIR --dest DIR --ext flac --valid-percent 0``.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

RATE = 16000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="folder with one subfolder of audio files per class")
    p.add_argument("dest", type=Path, help="where to write train/valid .tsv and .label (created if missing)")
    p.add_argument("--ext", default="wav", help="audio file extension (default wav)")
    p.add_argument("--valid-list", type=Path, help="file of relative paths that form the valid split")
    p.add_argument("--exclude-list", type=Path, help="file of relative paths to leave out (e.g. a test split)")
    p.add_argument("--valid-percent", type=float, default=20.0, help="per-class valid share without --valid-list")
    p.add_argument("--seed", type=int, default=1, help="seed of the random split")
    return p.parse_args(argv)


def read_list(path) -> set:
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()} if path else set()


def main(argv=None) -> int:
    import soundfile

    args = parse_args(argv)
    source = args.source.expanduser().resolve()
    if not source.is_dir():
        print(f"error: {source} is not a folder", file=sys.stderr)
        return 2
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    if not classes:
        print(f"error: {source} has no class subfolders (expected SOURCE/<class>/*.{args.ext})", file=sys.stderr)
        return 2
    valid_list, excluded = read_list(args.valid_list), read_list(args.exclude_list)
    rng = random.Random(args.seed)
    splits = {"train": [], "valid": []}
    wrong_rate = []
    for label in classes:
        files = sorted(p.relative_to(source).as_posix() for p in (source / label).rglob(f"*.{args.ext}"))
        files = [f for f in files if f not in excluded]
        if args.valid_list:
            chosen = {f for f in files if f in valid_list}
        else:
            shuffled = files[:]
            rng.shuffle(shuffled)
            chosen = set(shuffled[:round(len(files) * args.valid_percent / 100)])
        for rel in files:
            info = soundfile.info(str(source / rel))
            if info.samplerate != RATE:
                wrong_rate.append(f"{rel} ({info.samplerate} Hz)")
                continue
            splits["valid" if rel in chosen else "train"].append((rel, info.frames, label))
    if wrong_rate:
        print(f"error: {len(wrong_rate)} files are not {RATE} Hz, e.g. {', '.join(wrong_rate[:3])}; resample them "
              f"(e.g. sox in.wav -r {RATE} out.wav)", file=sys.stderr)
        return 2
    for split, rows in splits.items():
        if not rows:
            print(f"error: the {split} split is empty; check --valid-list / --valid-percent", file=sys.stderr)
            return 2
    args.dest.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (args.dest / f"{split}.tsv").write_text(str(source) + "\n" + "".join(f"{r}\t{n}\n" for r, n, _ in rows))
        (args.dest / f"{split}.label").write_text("".join(f"{label}\n" for _, _, label in rows))
    print(f"[prepare] {len(classes)} classes, {len(splits['train'])} train and {len(splits['valid'])} valid clips in "
          f"{args.dest}\nTraining: task.retrieval_folder={args.dest}\nStandalone: python -m fairseq_mmkd.retrieval "
          f"--checkpoint CKPT [--teacher] --folder {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
