"""The newcomer's path: the demos in a reduced mode (image; text, audio and all three at once), their tables and
pictures, and the metrics plot."""
from __future__ import annotations

import re
import subprocess

import pytest
from PIL import Image

from conftest import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(["bash", "scripts/demo.sh", "--updates", "30", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_prints_a_table_with_real_numbers(demo):
    out, stdout = demo
    assert "RANDOMLY INITIALISED" in stdout
    rows = {m.group(1): [float(x) for x in m.group(2).split()]
            for m in re.finditer(r"^(top-1|top-3|inverse top-1|inverse top-3)\s+([\d.\s]+)$", stdout, re.M)}
    assert set(rows) == {"top-1", "top-3", "inverse top-1", "inverse top-3"}, stdout[-2000:]
    for values in rows.values():
        assert len(values) == 3 and all(0 <= v <= 100 for v in values)
    assert rows["top-1"][0] > 3 * 5, "the random teacher retrieves photo crops far above chance (5%)"
    assert re.search(r"training speed: \d+ images/s", stdout)
    assert re.search(r"trainable student [\d.]+M \| frozen shared encoder [\d.]+M", stdout)
    assert re.search(r"demo took \d+ s", stdout)
    assert (out / "checkpoints" / "checkpoint_best.pt").exists()


def test_validation_writes_a_retrieval_grid_and_the_plot_script_a_png(demo):
    out, _ = demo
    for png in (out / "checkpoints" / "retrieval_examples.png", out / "metrics.png"):
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    per_update = sorted((out / "checkpoints" / "retrieval_examples").glob("update_*.png"))
    assert [p.name for p in per_update] == ["update_000025.png", "update_000030.png"]


ROW_LABELS = ("top-1", "top-3", "inverse top-1", "inverse top-3")
CHANCE = {"image": 100 / 20, "text": 100 / 12, "audio": 100 / 8}  # photos, docstring modules, kinds of sound


def table_rows(stdout: str, prefix: str = "") -> dict:
    """``label -> [teacher, student @ first valid, student @ end]`` of a demo's table."""
    pattern = rf"^{re.escape(prefix)}(top-1|top-3|inverse top-1|inverse top-3)\s+([\d.\s]+)$"
    return {m.group(1): [float(x) for x in m.group(2).split()] for m in re.finditer(pattern, stdout, re.M)}


@pytest.fixture(scope="module")
def sequence_demos(tmp_path_factory):
    """The text, audio and multimodal demos in a reduced mode, one after the other in one --out folder: the
    multimodal demo reuses the text and audio demos' data and teachers, as a user running them in turn would."""
    out = tmp_path_factory.mktemp("demo_seq")
    runs = {}
    for modality in ("text", "audio", "all"):  # 40 updates: two logged intervals (log_interval 20)
        proc = subprocess.run(["bash", "scripts/demo.sh", "--modality", modality, "--updates", "40", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (modality, proc.stdout[-3000:] + proc.stderr[-3000:])
        runs[modality] = (proc.stdout, (out / "checkpoints" / "checkpoint_best.pt").exists())
    return out, runs


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_text_and_audio_demos_print_the_image_demos_table_with_real_numbers(sequence_demos, modality):
    _, runs = sequence_demos
    stdout, saved = runs[modality]
    assert f"fairseq_mmkd {modality} demo: RANDOMLY INITIALISED demo teacher, 40 updates" in stdout, stdout[-2000:]
    assert f"data2vec2 {modality} model" in stdout and "not a pretrained one" in stdout
    rows = table_rows(stdout)
    assert set(rows) == set(ROW_LABELS), stdout[-2000:]
    for values in rows.values():
        assert len(values) == 3 and all(0 <= v <= 100 for v in values)
    chance = CHANCE[modality]
    assert rows["top-1"][0] > 2 * chance, f"the random {modality} teacher retrieves well above chance ({chance:.1f}%)"
    assert rows["top-1"][2] > 2 * chance, "the student (on the same frozen encoder) too"
    assert re.search(rf"training speed: \d+ {'tokens' if modality == 'text' else 'samples'}/s", stdout)
    assert re.search(r"trainable student [\d.]+M \| frozen shared encoder [\d.]+M", stdout)
    loss = re.search(r"distillation loss: ([\d.]+) at the start -> ([\d.]+) at the end", stdout)
    start, end = map(float, loss.groups())
    assert end < start
    assert re.search(r"demo took \d+ s", stdout) and saved


def test_multimodal_demo_prints_one_table_per_modality_with_real_numbers(sequence_demos):
    out, runs = sequence_demos
    stdout, saved = runs["all"]
    assert "fairseq_mmkd multimodal demo: RANDOMLY INITIALISED image, text, audio teachers, one student, 40 updates" \
        in stdout, stdout[-3000:]
    for modality in ("image", "text", "audio"):
        rows = table_rows(stdout, prefix=f"{modality} ")
        assert set(rows) == set(ROW_LABELS), (modality, stdout[-3000:])
        for values in rows.values():
            assert len(values) == 3 and all(0 <= v <= 100 for v in values)
        assert rows["top-1"][0] > 2 * CHANCE[modality], (modality, rows)
        assert rows["top-1"][2] > CHANCE[modality], (modality, rows)
    assert re.search(r"trainable student [\d.]+M, one for all \| frozen shared encoders image [\d.]+M, "
                     r"text [\d.]+M, audio [\d.]+M", stdout)
    assert re.search(r"training speed: [\d.]+ updates/s", stdout)
    losses = re.search(r"distillation loss, start -> end: image ([\d.]+) -> ([\d.]+), text ([\d.]+) -> ([\d.]+), "
                       r"audio ([\d.]+) -> ([\d.]+)", stdout)
    assert losses, stdout[-2000:]
    assert saved and (out / "teacher_random_d2v2_image.pt").exists()  # its own image teacher, of the others' width


def test_demo_refuses_a_teacher_it_cannot_feed_in_one_line(sequence_demos, tmp_path):
    from conftest import make_sequence_teacher

    out, _ = sequence_demos
    other_dict = make_sequence_teacher(tmp_path / "other_dict.pt", "text", vocab_size=50)
    for args, message in ((["--modality", "text", "--teacher", str(out / "teacher_random_d2v2_audio.pt")],
                           "is a data2vec 2.0 audio model; the text demo needs a text teacher"),
                          (["--modality", "text", "--teacher", str(other_dict)],
                           "embeds 50 tokens, but the text demo's dictionary"),
                          (["--modality", "audio", "--updates", "ten"],
                           "--updates must be a positive number of updates, got 'ten'"),
                          (["--modality", "all", "--teacher", str(out / "teacher_random_d2v2_text.pt")],
                           "--teacher names one teacher")):
        proc = subprocess.run(["bash", "scripts/demo.sh", *args, "--out", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert "[demo] teacher" not in proc.stdout  # stopped before training


def test_plot_script_reports_a_log_without_json_lines(tmp_path):
    log = tmp_path / "empty.log"
    log.write_text("nothing here\n")
    proc = subprocess.run([str(REPO / ".venv/bin/python"), "scripts/plot_metrics.py", str(log), "--output",
                           str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no fairseq json log lines" in proc.stderr


def test_image_text_demo_prints_teachers_vs_student_with_chance_levels_and_a_picture(tmp_path):
    """--modality image-text, reduced (60 updates): unaligned random teachers near chance, an aligned student well
    above it, and the picture of queries with their top captions and images."""
    out = tmp_path / "it"
    proc = subprocess.run(["bash", "scripts/demo.sh", "--modality", "image-text", "--updates", "60", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1): [float(x.rstrip("%")) for x in m.group(2).split()]
            for m in re.finditer(r"^((?:image->text|text->image) R@\d+|zero-shot colours top-\d)\s+([\d.%\s]+)$",
                                 proc.stdout, re.M)}
    assert len(rows) == 8, proc.stdout[-2000:]
    chance, teacher, _, student = rows["text->image R@1"]
    assert teacher < 4 * chance < student, rows
    assert rows["image->text R@5"][3] > 2 * rows["image->text R@5"][0]
    assert rows["zero-shot colours top-1"][3] > 2 * rows["zero-shot colours top-1"][0]
    picture = out / "checkpoints" / "image_text_examples.png"
    with Image.open(picture) as img:
        assert img.size[0] > 300 and img.size[1] > 300
