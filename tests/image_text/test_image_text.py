"""Image-text alignment (``d2v_kd_image_text``): pairs in both formats, captions for the text teacher, the contrastive
loss, zero-shot retrieval and classification, and the real fairseq-hydra-train run."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (DISTRIBUTED, REPO, assert_same_losses, assert_same_updates, fairseq_tool, hydra_train,
                      json_log_lines, launcher, learning_rates, load, load_last, training_flags, validate)
from fairseq_mmkd.data.captions import CaptionTokenizer, pad_captions
from fairseq_mmkd.data.pairs import PairsError, read_pairs
from fairseq_mmkd.data.text import TextDataError
from fairseq_mmkd.losses.contrastive import contrastive_loss
from fairseq_mmkd.retrieval.cross_modal import (CIFAR_TEMPLATES, class_prototypes, image_text_ranks,
                                                image_text_retrieval, zero_shot_accuracy)
from fairseq_mmkd.testing.fixtures import (caption_words, dictionary_size, make_sequence_teacher,
                                           write_albef_pairs, write_captioned_images, write_color_cifar,
                                           write_karpathy_pairs, write_word_dictionary)


@pytest.fixture(scope="session")
def pairs_root(tmp_path_factory):
    """Training pictures (ALBEF list, one entry per caption), held-out pictures (Karpathy file: train/restval/val/
    test splits), a word dictionary, and CIFAR-10 whose classes are the pictures' colours."""
    root = tmp_path_factory.mktemp("pairs")
    train = write_captioned_images(root, 40, seed=0, prefix="train")
    held_out = write_captioned_images(root, 20, seed=1, prefix="test", max_captions=4)
    write_albef_pairs(root / "train.json", train)
    write_karpathy_pairs(root / "dataset_coco.json", {"train": train[:30], "restval": train[30:], "val": held_out[:5],
                                                      "test": held_out})
    write_word_dictionary(root / "dict", caption_words())
    write_color_cifar(root / "cifar")
    return root


@pytest.fixture(scope="session")
def text_teacher(pairs_root):
    return make_sequence_teacher(pairs_root / "text_teacher.pt", "text", vocab_size=dictionary_size(pairs_root / "dict"))


# ----------------------------------------------------------------------------------------------------------------
# Pairs and captions
# ----------------------------------------------------------------------------------------------------------------

def test_both_formats_give_the_same_pairs(pairs_root, tmp_path):
    albef = read_pairs(pairs_root / "train.json")
    karpathy = read_pairs(pairs_root / "dataset_coco.json")  # train + restval
    assert albef.images == karpathy.images and albef.captions == karpathy.captions
    assert (albef.caption_image == karpathy.caption_image).all()
    per_image = write_albef_pairs(tmp_path / "lists.json", [(r.replace(str(pairs_root) + "/", ""), [c])
                                                            for r, c in zip(albef.images[:3], albef.captions[:3])],
                                  one_entry_per_caption=False)
    assert len(read_pairs(per_image, image_root=str(pairs_root))) == 3
    test = read_pairs(pairs_root / "dataset_coco.json", splits=("test",))
    assert len(test) == 20 and len(test.captions) == len(test.caption_image) > 20
    assert test.name == "dataset_coco"


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"), ("not_json", "not readable JSON"), ("unknown", "neither a JSON list"),
    ("empty", "holds no pairs"), ("split", "no images in split nope; its splits are restval, test, train, val"),
    ("root", "is not a folder; set task.image_root"), ("image", "1 of the 40 images"),
    ("caption", "an empty caption"),
])
def test_bad_pairs_are_one_line_naming_the_problem(pairs_root, tmp_path, case, message):
    path, kw = tmp_path / "p.json", {}
    data = json.loads((pairs_root / "train.json").read_text())
    if case == "missing":
        path = tmp_path / "absent.json"
    elif case == "not_json":
        path.write_text("{nope")
    elif case == "unknown":
        path.write_text(json.dumps({"annotations": []}))
    elif case == "empty":
        path.write_text("[]")
    elif case == "split":
        path, kw = pairs_root / "dataset_coco.json", {"splits": ("nope",)}
    elif case == "root":
        path, kw = pairs_root / "train.json", {"image_root": str(tmp_path / "no_such_folder")}
    elif case == "image":
        data[0]["image"] = "images/gone.png"
        path.write_text(json.dumps(data))
        kw = {"image_root": str(pairs_root)}
    elif case == "caption":
        data[0]["caption"] = "  "
        path.write_text(json.dumps(data))
        kw = {"image_root": str(pairs_root)}
    with pytest.raises(PairsError, match=message):
        read_pairs(path, **kw)


def test_captions_become_the_text_teachers_tokens(pairs_root):
    tok = CaptionTokenizer(str(pairs_root / "dict"), max_tokens=6)
    d = tok.dictionary
    ids = tok.encode("a red square")
    assert ids.tolist() == [d.bos(), d.index("a"), d.index("red"), d.index("square"), d.eos()]
    assert len(tok.encode("a big red square that is red")) == 6 and tok.encode("a big red square that")[-1] == d.eos()
    with pytest.raises(TextDataError, match="has no token the text teacher's dictionary knows"):
        tok.encode("zebra giraffe")
    tok.check_teacher(dictionary_size(pairs_root / "dict"))
    with pytest.raises(TextDataError, match="another dictionary"):
        tok.check_teacher(dictionary_size(pairs_root / "dict") + 3)
    ids, mask = pad_captions([torch.tensor([0, 5, 2]), torch.tensor([0, 2])], d.pad())
    assert ids.tolist() == [[0, 5, 2], [0, 2, d.pad()]] and mask.tolist() == [[False] * 3, [False, False, True]]


def write_byte_bpe(folder):
    """GPT-2's byte-level alphabet as encoder.json (256 symbols) and a few merges, in GPT-2's file formats."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = [("Ġ", "r"), ("Ġr", "e"), ("Ġre", "d"), ("s", "q")]
    vocab = alphabet + ["".join(m) for m in merges]
    (folder / "encoder.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}))
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder / "encoder.json", folder / "vocab.bpe"


def test_bpe_captions_are_encoded_as_fairseqs_own_gpt2_bpe_and_dictionary(tmp_path):
    """The path of nlp_base.pt's data: fairseq's GPT2BPE (as multiprocessing_bpe_encoder runs it) then the dictionary
    (as fairseq-preprocess binarizes), with <s> first and </s> last; case and punctuation kept."""
    from argparse import Namespace

    from fairseq.data import Dictionary
    from fairseq.data.encoders.gpt2_bpe import GPT2BPE

    encoder, vocab = write_byte_bpe(tmp_path)
    bpe = GPT2BPE(Namespace(gpt2_encoder_json=str(encoder), gpt2_vocab_bpe=str(vocab)))
    caption = "A red square, sq."
    words = bpe.encode(caption).split()
    write_word_dictionary(tmp_path / "dict", words)
    tok = CaptionTokenizer(str(tmp_path / "dict"), str(encoder), str(vocab), max_tokens=64)
    d = Dictionary.load(str(tmp_path / "dict" / "dict.txt"))
    expected = [d.bos()] + d.encode_line(bpe.encode(caption), add_if_not_exist=False, append_eos=True).tolist()
    assert tok.encode(caption).tolist() == expected
    assert tok.encode("a red square, sq.").tolist() != expected  # case matters, as in the teacher's data
    with pytest.raises(TextDataError, match="give both GPT-2 BPE files"):
        CaptionTokenizer(str(tmp_path / "dict"), str(encoder), None)


# ----------------------------------------------------------------------------------------------------------------
# Metrics and the loss
# ----------------------------------------------------------------------------------------------------------------

def brute_force_ranks(image, text, owner):
    sims = (image @ text.t()).tolist()
    i2t = []
    for i, row in enumerate(sims):
        best = max(s for j, s in enumerate(row) if owner[j] == i)
        i2t.append(sum(1 for j, s in enumerate(row) if owner[j] != i and s >= best))
    t2i = []
    for j in range(len(owner)):
        col = [sims[i][j] for i in range(len(sims))]
        t2i.append(sum(1 for i, s in enumerate(col) if i != owner[j] and s >= col[owner[j]]))
    return i2t, t2i


def test_recall_matches_a_brute_force_reference_with_ties_and_1_to_7_captions_per_image():
    g = torch.Generator().manual_seed(0)
    counts = [1, 7, 3, 2, 5, 1, 4, 6, 2, 3]
    owner = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    image = F.normalize(torch.randn(len(counts), 8, generator=g), dim=-1)
    text = F.normalize(image[owner] + 0.8 * torch.randn(len(owner), 8, generator=g), dim=-1)
    text[3] = text[5]  # exact ties between captions of different images
    image[4] = image[2]  # ... and between images
    i2t, t2i = image_text_ranks(image, text, owner, chunk=3)
    ref_i2t, ref_t2i = brute_force_ranks(image, text, owner.tolist())
    assert i2t.tolist() == ref_i2t and t2i.tolist() == ref_t2i
    metrics = image_text_retrieval(image, text, owner.numpy(), "set", chunk=4)
    for k in (1, 5, 10):
        assert metrics[f"set_i2t_r{k}"] == pytest.approx(100 * np.mean(np.array(ref_i2t) < k))
        assert metrics[f"set_t2i_r{k}"] == pytest.approx(100 * np.mean(np.array(ref_t2i) < k))
    assert metrics["set_rmean"] == pytest.approx(np.mean([metrics[f"set_{d}_r{k}"] for d in ("i2t", "t2i")
                                                          for k in (1, 5, 10)]))
    same = image_text_retrieval(image[owner], image[owner], torch.arange(len(owner)), "tie")
    assert same["tie_i2t_r1"] < 100  # identical embeddings of different items: ties count against the query


def test_zero_shot_prototypes_and_accuracy_match_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(50, 16, generator=g)
    names = ["cat", "dog", "car"]

    def embed(texts):
        return torch.stack([table[sum(map(ord, t)) % 50] + table[len(t) % 50] for t in texts])

    protos = class_prototypes(embed, names, CIFAR_TEMPLATES)
    for c, n in enumerate(names):
        direct = F.normalize(torch.stack([F.normalize(embed([t.format(n)])[0], dim=0) for t in CIFAR_TEMPLATES])
                             .mean(0), dim=0)
        torch.testing.assert_close(protos[c], direct)
    images = F.normalize(torch.randn(12, 16, generator=g), dim=-1)
    labels = torch.arange(12) % 3
    acc = zero_shot_accuracy(images, labels, protos, "x", ks=(1, 5))
    assert acc["x_zeroshot_top1"] == pytest.approx(100 * float(((images @ protos.t()).argmax(1) == labels)
                                                               .float().mean()))
    assert acc["x_zeroshot_top5"] == 100.0  # 5 > 3 classes: capped


def test_contrastive_loss_is_clips():
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07))
    out = contrastive_loss(image, text, scale)
    logits = image @ text.t() / 0.07
    ref = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    assert out["batch"] == 6 and float(out["loss"]) == pytest.approx(float(ref), rel=1e-6)
    assert float(contrastive_loss(image, text, torch.tensor(10.0))["scale"]) == pytest.approx(100.0)  # clamped


# ----------------------------------------------------------------------------------------------------------------
# Training through fairseq-hydra-train
# ----------------------------------------------------------------------------------------------------------------

def run_args(pairs_root, tiny_teacher, text_teacher, *extra):
    return [f"task.pairs={pairs_root / 'train.json'}", f"task.valid_pairs={pairs_root / 'dataset_coco.json'}",
            f"task.text_dict={pairs_root / 'dict'}", f"model.image_teacher={tiny_teacher}",
            f"model.text_teacher={text_teacher}", f"task.cifar10_root={pairs_root / 'cifar'}", "task.cifar100_root=null",
            "task.knn_k=5", "model.student_init=random", "optimization.lr=[0.003]", *extra]


def train(save, *args, **kw):
    return hydra_train(save, *args, config="kd_image_text", **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs_root, tiny_teacher, text_teacher):
    save = tmp_path_factory.mktemp("image_text") / "run"
    proc = train(save, *run_args(pairs_root, tiny_teacher, text_teacher), "optimization.max_update=80",
                 "dataset.validate_interval_updates=40", "lr_scheduler.warmup_updates=8", "common.log_interval=5")
    return save, proc.stdout + proc.stderr


def test_loss_falls_and_retrieval_rises_far_above_chance(trained):
    save, log = trained
    rows = json_log_lines(log, "train_inner")
    assert float(rows[-1]["contrastive"]) < 0.7 * float(rows[0]["contrastive"])
    for key in ("loss", "contrastive", "regression_image", "regression_text", "temperature", "pred_var_image",
                "target_var_text", "contrastive_accuracy"):
        assert key in rows[-1], key
    valid = json_log_lines(log, "valid")[-1]
    chance_r1 = 100 / 20  # 20 held-out images
    assert float(valid["valid_dataset_coco_i2t_r1"]) > 3 * chance_r1 and float(valid["valid_dataset_coco_t2i_r1"]) > 3 * chance_r1
    assert float(valid["valid_dataset_coco_rmean"]) > float(valid["valid_teacher_dataset_coco_rmean"])
    assert float(valid["valid_cifar10_zeroshot_top1"]) > 3 * 10 and "valid_cifar10_knn5" in valid  # 10 colour classes
    protocol = json.loads((save / "eval_protocol.json").read_text())
    assert protocol["modalities"]["cross_modal"]["pairs"]["images"] == 20


def test_best_checkpoint_follows_the_validation_pairs_rmean(trained):
    save, log = trained
    assert "best_checkpoint_metric=rmean: checkpoint_best.pt follows dataset_coco_rmean" in log
    assert (save / "checkpoint_best.pt").exists()


def test_checkpoints_load_without_the_teachers_and_the_evaluator_reproduces_the_log(trained, pairs_root, tmp_path):
    import subprocess
    import sys

    from fairseq_mmkd.models import load_student

    save, log = trained
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert not any(".teacher_blocks." in k for k in state["model"]) and "alignment.logit_scale" in state["model"]
    model = load_student(save / "checkpoint_last.pt")
    assert model.distiller.teacher_blocks is None
    out = tmp_path / "r.json"
    emb = tmp_path / "e.npz"
    subprocess.run([sys.executable, "-m", "fairseq_mmkd.retrieval", "--checkpoint", str(save / "checkpoint_last.pt"),
                    "--pairs", str(pairs_root / "dataset_coco.json"), "--json", str(out), "--save-embeddings",
                    str(emb), "--cifar10", str(pairs_root / "cifar"), "--zeroshot", "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    valid = json_log_lines(log, "valid")[-1]
    for key in ("dataset_coco_i2t_r1", "dataset_coco_t2i_r5", "dataset_coco_rmean", "cifar10_zeroshot_top1"):
        assert float(valid[f"valid_{key}"]) == pytest.approx(result[key], abs=0.005 + 1e-9), key
    saved = np.load(emb)
    recomputed = image_text_retrieval(torch.from_numpy(saved["image_embeddings"]),
                                      torch.from_numpy(saved["text_embeddings"]), saved["text_image_index"], "again")
    assert recomputed["again_rmean"] == pytest.approx(result["dataset_coco_rmean"])


@pytest.mark.parametrize("case,message", [
    ("no_dict", "task.text_dict is not set"),
    ("dict_mismatch", "another dictionary"),
    ("unknown_token", "has no token the text teacher's dictionary knows"),
    ("missing_root", "is not a folder; set task.image_root"),
    ("split", "no images in split nope"),
])
def test_bad_inputs_stop_before_training_in_one_line(case, message, tmp_path, pairs_root, tiny_teacher, text_teacher):
    args = run_args(pairs_root, tiny_teacher, text_teacher, "optimization.max_update=2")
    if case == "no_dict":
        args = [a for a in args if not a.startswith("task.text_dict")] + ["task.text_dict=''"]
    elif case == "dict_mismatch":
        write_word_dictionary(tmp_path / "dict", caption_words() + ["extra", "words"])
        args = [a for a in args if not a.startswith("task.text_dict")] + [f"task.text_dict={tmp_path / 'dict'}"]
    elif case == "unknown_token":
        data = json.loads((pairs_root / "train.json").read_text())
        data[0]["caption"] = "zebra giraffe"
        (tmp_path / "p.json").write_text(json.dumps(data))
        args = [a for a in args if not a.startswith("task.pairs")] + [f"task.pairs={tmp_path / 'p.json'}",
                                                                      f"task.image_root={pairs_root}"]
    elif case == "missing_root":
        args.append(f"task.image_root={tmp_path / 'nowhere'}")
    elif case == "split":
        args.append("task.valid_split=nope")
    proc = train(tmp_path / "run", *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-3000:]
    assert "begin training" not in out


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, pairs_root, tiny_teacher, text_teacher):
    """Negatives gathered from every worker: 2 gloo workers of 8 pairs train as one of 16 (same losses and weights),
    here from Karpathy's training splits (train + restval)."""
    common = [*run_args(pairs_root, tiny_teacher, text_teacher), f"task.pairs={pairs_root / 'dataset_coco.json'}",
              "optimization.max_update=6", "dataset.validate_interval_updates=6", "common.log_interval=1",
              "task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
              "checkpoint.maximize_best_checkpoint_metric=false"]
    one = train(tmp_path / "one", *common, "dataset.batch_size=16")
    two = train(tmp_path / "two", *common, "dataset.batch_size=8", *DISTRIBUTED, launcher=launcher(),
                env={"MASTER_ADDR": "127.0.0.1"})
    log_one, log_two = one.stdout + one.stderr, two.stdout + two.stderr
    assert "world_size=2" in log_two.replace(" ", "") or "distributed init (rank 1)" in log_two
    assert_same_losses(log_one, log_two)
    a, b = load_last(tmp_path / "one"), load_last(tmp_path / "two")
    assert_same_updates(a, b, learning_rates(log_one))
    wrong = train(tmp_path / "local", *common, "dataset.batch_size=8", "optimization.update_freq=[2]")
    with pytest.raises(AssertionError):  # accumulating two batches of 8 is not one batch of 16 negatives
        assert_same_losses(log_one, wrong.stdout + wrong.stderr)


def test_resume_is_exact(tmp_path, pairs_root, tiny_teacher, text_teacher):
    common = [*run_args(pairs_root, tiny_teacher, text_teacher), "lr_scheduler.max_update=14", "common.log_interval=1",
              "task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
              "checkpoint.maximize_best_checkpoint_metric=false", "checkpoint.save_interval_updates=5"]
    straight = train(tmp_path / "straight", *common, "optimization.max_update=14")
    train(tmp_path / "resumed", *common, "optimization.max_update=5")
    resumed = train(tmp_path / "resumed", *common, "optimization.max_update=14")
    assert "Loaded checkpoint" in resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert b["optimizer_history"][-1]["num_updates"] == 14
    assert_same_updates(a, b, learning_rates(straight.stdout + straight.stderr))


def test_the_aligned_student_exports_to_one_file_that_load_d2v_and_fairseq_read(trained, pairs_root, tmp_path):
    """Both encoders, the stack, the heads and the scale in one data2vec_multi file: load_d2v reads each modality,
    fairseq's own loader reads the file, and AlignedEncoders embeds images and captions as the student did."""
    from fairseq_mmkd.testing.fairseq_reference import fairseq_load_multimodal_checkpoint

    from fairseq_mmkd import load_d2v
    from fairseq_mmkd.distill.alignment import AlignedEncoders
    from fairseq_mmkd.export import export
    from fairseq_mmkd.models import load_student

    save, _ = trained
    out = tmp_path / "aligned.pt"
    models = export(save / "checkpoint_last.pt", out, text_dict=str(pairs_root / "dict" / "dict.txt"))
    assert set(models) == {"image", "text"}
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["cfg"]["model"]["_name"] == "data2vec_multi" and set(state["alignment"]["heads"]) == {"image", "text"}
    assert load_d2v(out, modality="image").cfg.depth == load_d2v(out, modality="text").cfg.depth == 2
    _, fairseq_model = fairseq_load_multimodal_checkpoint(out)
    assert {"IMAGE", "TEXT"} <= set(fairseq_model.modality_encoders)
    student = load_student(save / "checkpoint_last.pt")
    enc = AlignedEncoders.from_file(out)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    captions = ["a red square", "the blue circle on grey", "a picture of a green stripe"]
    ids = [enc.tokenizer.encode(c) for c in captions]
    from fairseq_mmkd.data.captions import pad_captions

    tokens, mask = pad_captions(ids, enc.tokenizer.pad)
    with torch.no_grad():
        # float32 through the same encoders and blocks, computed as another module tree: rounding only (~1e-6)
        torch.testing.assert_close(enc.embed_images(images), student.embed("image", images), atol=1e-5, rtol=0)
        torch.testing.assert_close(enc.embed_captions(captions), student.embed("text", tokens, mask), atol=1e-5,
                                   rtol=0)
    assert enc.scale == pytest.approx(float(student.alignment.logit_scale.exp()))


def test_fairseq_validate_prints_the_zero_shot_metrics_of_an_image_text_checkpoint(trained):
    save, log = trained
    valid, out = validate(save / "checkpoint_last.pt", task="d2v_kd_image_text")
    trained_valid = json_log_lines(log, "valid")[-1]
    for key in ("valid_dataset_coco_rmean", "valid_dataset_coco_i2t_r1", "valid_cifar10_zeroshot_top1",
                "valid_cifar10_top1"):
        assert valid[key] == trained_valid[key], key


def test_the_training_step_in_turns_has_the_one_pass_gradient(pairs_root, tiny_teacher, text_teacher):
    """backward_in_turns (one modality's activations at a time) gives the gradient of the one-pass loss, also with a
    stochastic depth (the look-ahead replays the captions' random draws)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from fairseq_mmkd import load_d2v
    from fairseq_mmkd.criterions.d2v_kd_image_text import D2vKDImageTextCriterion, D2vKDImageTextCriterionConfig
    from fairseq_mmkd.models.d2v_kd_image_text import D2vKDImageTextModel, D2vKDImageTextModelConfig

    teachers = {"image": load_d2v(tiny_teacher, modality="image"), "text": load_d2v(text_teacher, modality="text")}
    cfg = OmegaConf.structured(D2vKDImageTextModelConfig(student_depth=2, student_init="random", drop_path=0.3,
                                                         projection_dim=16))
    model = D2vKDImageTextModel(cfg, teachers).train()
    crit = D2vKDImageTextCriterion(OmegaConf.structured(D2vKDImageTextCriterionConfig(contrastive_weight=2.0)),
                                   SimpleNamespace())
    g = torch.Generator().manual_seed(0)
    tokens, mask = pad_captions([torch.tensor([0, 5, 6, 7, 2]), torch.tensor([0, 8, 2]), torch.tensor([0, 9, 5, 2])],
                                1)
    sample = {"image": {"net_input": {"source": torch.randn(3, 3, 32, 32, generator=g)}, "nsamples": 3},
              "text": {"net_input": {"source": tokens, "padding_mask": mask}, "nsamples": 3, "ntokens": 12},
              "nsamples": 3}

    def grads(run):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        result = run()
        return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss_a, size_a, log_a), ga = grads(lambda: (lambda r: (r[0].backward(), r)[1])(crit(model, sample)))
    (loss_b, size_b, log_b), gb = grads(lambda: crit.backward_in_turns(model, sample, lambda x: x.backward()))
    assert size_a == size_b == 3 and float(log_a["loss"]) == pytest.approx(float(log_b["loss"]), rel=1e-6)
    assert ga.keys() == gb.keys() and "alignment.logit_scale" in ga and "alignment.heads.text.weight" in ga
    for n in ga:  # float32 through the same graph pieces in another order: rounding only
        torch.testing.assert_close(gb[n], ga[n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_fairseq_train_with_flags_trains_an_image_text_run_as_fairseq_hydra_train(tmp_path, pairs_root, tiny_teacher,
                                                                                 text_teacher):
    common = [*run_args(pairs_root, tiny_teacher, text_teacher), "optimization.max_update=6", "common.log_interval=1",
              "task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
              "checkpoint.maximize_best_checkpoint_metric=false"]
    hydra = train(tmp_path / "hydra", *common)
    cfg = load(tmp_path / "hydra" / "checkpoint_last.pt")["cfg"]
    cfg["checkpoint"]["save_dir"] = str(tmp_path / "argparse")
    proc = fairseq_tool("fairseq-train", *training_flags(cfg))
    log_a, log_b = hydra.stdout + hydra.stderr, proc.stdout + proc.stderr
    assert_same_losses(log_a, log_b)
    assert_same_updates(load(tmp_path / "hydra" / "checkpoint_last.pt"), load(tmp_path / "argparse" / "checkpoint_last.pt"),
                        learning_rates(log_a))


def test_unreadable_images_are_skipped_counted_and_logged(tmp_path, pairs_root, tiny_teacher, text_teacher):
    """A corrupt picture among the training pairs: replaced by the next readable one, counted (bad_images) and named
    once in the log, within the image task's bad-file limit."""
    import shutil

    root = tmp_path / "pairs"
    shutil.copytree(pairs_root / "images", root / "images")
    shutil.copy(pairs_root / "train.json", root / "train.json")
    (root / "images" / "train_0030.png").write_bytes(b"not a png at all")
    args = [a for a in run_args(pairs_root, tiny_teacher, text_teacher) if not a.startswith("task.pairs")]
    proc = train(tmp_path / "run", *args, f"task.pairs={root / 'train.json'}", "optimization.max_update=12",
                 "common.log_interval=1", "task.retrieval=false", "checkpoint.best_checkpoint_metric=loss",
                 "checkpoint.maximize_best_checkpoint_metric=false", "task.max_bad_image_fraction=0.2")
    out = proc.stdout + proc.stderr
    assert "train_0030.png" in out
    assert sum(float(r.get("bad_images", 0)) for r in json_log_lines(out, "train_inner")) >= 1
