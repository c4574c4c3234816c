"""The plugin's data2vec 2.0 text and audio teachers compute what fairseq's own ``Data2VecMultiModel`` does.

Each case writes a small checkpoint with fairseq's trainer from the released ``base_text_only_task`` /
``base_audio_only_task`` configs (``fairseq_reference``), loads it with ``fairseq_mmkd.load_d2v`` (which
detects the modality) and compares every output with fairseq's: online weights (fairseq's feature path) and
EMA weights (the teacher inside fairseq's pretraining forward, composed as data2vec2 composes it), on
unpadded and right-padded batches. With padding, outputs are compared at valid positions (fairseq computes
junk at padded queries too) and the padding mask itself must agree; targets only without padding, where
the plugin normalises over valid positions on purpose (``fairseq_mmkd.modules.targets``).
"""
from __future__ import annotations

import pytest
import torch

from fairseq_mmkd.testing import fairseq_reference as ref
from fairseq_mmkd import CheckpointError, load_d2v, load_d2v_image
from fairseq_mmkd.testing.fairseq_reference import reference_outputs, write_reference_checkpoint

ATOL = 1e-5

CASES = {
    # text: the released layout (no prenet, no context norm), and a prenet with its context LayerNorm
    "text_base": ("text", {}),
    "text_prenet2": ("text", dict(prenet_depth=2)),
    # audio: the released layout (layer_norm extractor, per-head ALiBi scale, no prenet, top 2 of 3 blocks)
    "audio_base": ("audio", {}),
    "audio_default_extractor_prenet2": ("audio", dict(extractor_mode="default", prenet_depth=2)),
    "audio_alibi_per_layer_pos_pre_ln_prenet2": ("audio", dict(learned_alibi_scale_per_layer=True,
                                                               conv_pos_pre_ln=True, prenet_depth=2)),
    # 3 heads: not a power of two (ALiBi's mixed slope list); one ALiBi scale shared by all heads
    "audio_3_heads_shared_alibi_scale": ("audio", dict(num_heads=3, embed_dim=48, conv_pos_groups=4,
                                                       learned_alibi_scale_per_head=False)),
}
# Files edited after fairseq wrote them, as released files may differ from freshly trained ones.
EDITS = {
    "text_base_without_decoder": ("text_base", "strip_decoder"),
    "audio_base_without_decoder": ("audio_base", "strip_decoder"),
    "audio_base_old_alibi_shape": ("audio_base", "old_alibi_shape"),
}
LENGTHS = {"text": [24, 20, 13], "audio": [2000, 1700, 1200]}  # padded batches: right-padded to the longest


def strip_decoder(state):
    """What fairseq's ASR/GLUE loaders and presumably the released files do: no pretraining decoder."""
    for sd in (state["model"], state["model"]["_ema"]):
        for k in [k for k in sd if ".decoder." in k]:
            del sd[k]


def old_alibi_shape(state):
    """Older checkpoints stored the per-head ALiBi scale 4-D (``1 x H x 1 x 1``), in ``_ema`` too."""
    for sd in (state["model"], state["model"]["_ema"]):
        for k in [k for k in sd if k.endswith("alibi_scale")]:
            assert sd[k].shape[0] == 1
            sd[k] = sd[k].squeeze(0)


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """``case -> (path, fairseq model)``, each written by fairseq's trainer once per module."""
    root = tmp_path_factory.mktemp("fairseq_d2v2_text_audio")
    cache = {}

    def get(case):
        if case not in cache:
            path = root / f"{case}.pt"
            if case in EDITS:
                base, edit = EDITS[case]
                base_path, model = get(base)
                state = torch.load(base_path, map_location="cpu", weights_only=False)  # our own test file
                globals()[edit](state)
                torch.save(state, path)
                cache[case] = path, model
            else:
                modality, overrides = CASES[case]
                cache[case] = path, write_reference_checkpoint(path, modality=modality, **overrides)
        return cache[case]

    return get


def batch_for(model, padded: bool, seed: int = 0):
    """``(source, padding_mask)`` as the modality's fairseq dataset collates it (3 sequences)."""
    modality = ref.config_modality(model)
    gen = torch.Generator().manual_seed(seed)
    lengths = LENGTHS[modality] if padded else None
    if modality == "text":
        batch = ref.text_batch(model.cfg, 3, gen, lengths)
        return batch["source"], (batch["padding_mask"] if padded else None)
    batch = ref.audio_batch(model.cfg, 3, gen, lengths)
    return batch["source"], batch.get("padding_mask")


def assert_close(got, expected, what, valid=None):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, fairseq {tuple(expected.shape)}"
    diff = (got.float() - expected.float()).abs()
    if valid is not None:
        diff = diff * valid
    err = diff.max().item()
    assert err <= ATOL, f"{what}: max |ours - fairseq| = {err:.2e} > {ATOL:.0e}"


def assert_matches_fairseq(ours: dict, targets, expected: dict) -> None:
    if expected["padding_mask"] is None:
        assert ours["padding_mask"] is None, "fairseq saw no padding"
        valid = None
    else:
        assert ours["padding_mask"] is not None and torch.equal(ours["padding_mask"], expected["padding_mask"]), \
            "padding mask at sequence resolution differs from fairseq's"
        valid = (~expected["padding_mask"]).unsqueeze(-1)
    assert_close(ours["encoder_out"], expected["encoder_out"], "encoder_out", valid)
    assert len(ours["layer_results"]) == len(expected["layer_results"]), "number of shared blocks"
    for i, (a, b) in enumerate(zip(ours["layer_results"], expected["layer_results"])):
        assert_close(a, b, f"layer_results[{i}]", valid)
    for i, (a, b) in enumerate(zip(ours["block_out"], expected["block_out"])):
        assert_close(a, b, f"block_out[{i}]", valid)
    if "x" in expected:
        assert_close(ours["x"], expected["x"], "x (final features)", valid)
    if valid is None:
        assert_close(targets, expected["targets"], "targets")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("weights", ["model", "ema"])
@pytest.mark.parametrize("case", [*CASES, *EDITS])
def test_teacher_matches_fairseq(reference_checkpoint, case, weights, padded):
    path, fairseq_model = reference_checkpoint(case)
    source, padding_mask = batch_for(fairseq_model, padded)
    expected = reference_outputs(fairseq_model, source, weights, padding_mask)

    teacher = load_d2v(path, weights=weights)  # the modality comes from the file
    assert teacher.cfg.modality == ref.config_modality(fairseq_model)
    with torch.no_grad():
        ours = teacher(source, padding_mask)
    assert_matches_fairseq(ours, teacher.make_targets(ours["layer_results"]), expected)


@pytest.mark.parametrize("case", ["text_base", "audio_base"])
def test_online_and_ema_teachers_differ(reference_checkpoint, case):
    """Guards the parity test: picking the wrong weight set must be far outside its tolerance."""
    path, fairseq_model = reference_checkpoint(case)
    source, _ = batch_for(fairseq_model, padded=False)
    online = load_d2v(path, weights="model")(source)
    ema = load_d2v(path, weights="ema")(source)
    assert (online["block_out"][-1] - ema["block_out"][-1]).abs().max() > 1e3 * ATOL


def test_alibi_scale_matters(reference_checkpoint):
    """Guards the audio parity: one head's learned ALiBi scale, changed by 10%, moves the outputs far
    beyond the tolerance (the sequences are long enough for the bias to matter)."""
    path, fairseq_model = reference_checkpoint("audio_base")
    source, _ = batch_for(fairseq_model, padded=False)
    teacher = load_d2v(path)
    before = teacher(source)["block_out"][-1]
    with torch.no_grad():
        teacher.encoder.alibi_scale[0, 0, 1] *= 1.1
    assert (teacher(source)["block_out"][-1] - before).abs().max() > 100 * ATOL


@pytest.mark.parametrize("heads", [1, 3, 4, 12, 16])
def test_alibi_bias_equals_fairseqs(heads):
    """The bias table itself, against fairseq's ``get_alibi_bias`` (slopes for any head count)."""
    base = ref.import_reference().data2vec2.__name__.rsplit(".", 1)[0] + ".modalities.base"
    import importlib

    fairseq_bias = importlib.import_module(base).get_alibi_bias(
        {}, batch_size=2, time_steps=50, heads=heads, dtype=torch.float32, device="cpu")
    from fairseq_mmkd.encoders.audio import alibi_bias

    ours = alibi_bias(50, heads)
    assert torch.equal(ours.expand(2, -1, -1, -1), fairseq_bias)


def test_text_padding_mask_is_derived_from_pad_tokens(reference_checkpoint):
    """Users expect ``<pad>`` tokens to be masked without passing a mask (fairseq's model would attend to them)."""
    path, fairseq_model = reference_checkpoint("text_base")
    source, padding_mask = batch_for(fairseq_model, padded=True)
    teacher = load_d2v(path)
    implicit, explicit = teacher(source), teacher(source, padding_mask)
    assert torch.equal(implicit["padding_mask"], padding_mask)
    for a, b in zip(implicit["block_out"], explicit["block_out"]):
        assert torch.equal(a, b)
    unpadded, _ = batch_for(fairseq_model, padded=False)
    assert teacher(unpadded)["padding_mask"] is None


def test_padded_sequence_gets_the_targets_it_gets_alone(reference_checkpoint):
    """The plugin's departure from fairseq, on purpose: targets of a padded sequence (valid positions) equal
    those it gets in a batch of its own, because the per-layer instance norms skip the pads."""
    path, fairseq_model = reference_checkpoint("text_base")
    source, padding_mask = batch_for(fairseq_model, padded=True)
    teacher = load_d2v(path)
    out = teacher(source)
    padded = teacher.make_targets(out["layer_results"], padding_mask=out["padding_mask"])
    n = int((~padding_mask[2]).sum())
    alone = teacher(source[2:3, :n])
    alone_targets = teacher.make_targets(alone["layer_results"])
    assert (padded[2, :n] - alone_targets[0]).abs().max() < ATOL
    assert padded[2, n:].abs().max() == 0
    fairseq_style = teacher.make_targets(out["layer_results"])  # pads in the statistics
    assert (fairseq_style[2, :n] - alone_targets[0]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("case,kind", [("text_base", "text"), ("audio_base", "audio")])
def test_image_loader_refuses_text_and_audio(reference_checkpoint, case, kind):
    path, _ = reference_checkpoint(case)
    with pytest.raises(CheckpointError) as info:
        load_d2v_image(path)
    message = str(info.value)
    assert f"{kind} model, not an image model" in message and "load_d2v" in message and str(path) in message


def test_modality_that_the_file_lacks(reference_checkpoint):
    path, _ = reference_checkpoint("audio_base")
    with pytest.raises(CheckpointError, match="audio model, not a text model"):
        load_d2v(path, modality="text")


def test_audio_ema_teacher_uses_online_conv_stack(reference_checkpoint):
    """data2vec2's audio teacher: online conv extractor and projection, EMA everything after them."""
    path, fairseq_model = reference_checkpoint("audio_base")
    online, ema = load_d2v(path, weights="model"), load_d2v(path, weights="ema")
    for name, p in online.encoder.local_encoder.state_dict().items():
        assert torch.equal(p, ema.encoder.local_encoder.state_dict()[name]), name
    for name, p in online.encoder.project_features.state_dict().items():
        assert torch.equal(p, ema.encoder.project_features.state_dict()[name]), name
    assert not torch.equal(online.encoder.alibi_scale, ema.encoder.alibi_scale)
    fairseq_ema = fairseq_model.ema.model.modality_encoders["AUDIO"]
    assert torch.allclose(ema.encoder.alibi_scale, fairseq_ema.alibi_scale)


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_fairseq_reads_checkpoints_the_plugin_writes(tmp_path, modality):
    """Teachers written by the plugin (the demos' random ones, exported students) are real data2vec2 files:
    fairseq's own code rebuilds them from their cfg, loads the weights strictly, and computes the same."""
    from fairseq_mmkd import D2vConfig, D2vModel, TargetConfig
    from fairseq_mmkd.d2v.writing import save_d2v_checkpoint
    from fairseq_mmkd.encoders.audio import AudioEncoderConfig
    from fairseq_mmkd.encoders.text import TextEncoderConfig

    if modality == "text":
        enc = TextEncoderConfig(vocab_size=ref.TEXT_VOCAB + 5, max_source_positions=24, prenet_depth=1)
    else:
        enc = AudioEncoderConfig(conv_spec="[(32, 10, 5)] + [(32, 3, 2)] * 2", conv_pos_width=10, conv_pos_depth=2,
                                 conv_pos_groups=4, prenet_depth=1, alibi_heads=4, model_depth=2)
    cfg = D2vConfig(modality=modality, embed_dim=32, depth=2, num_heads=4, norm_eps=1e-5, encoder=enc,
                    targets=TargetConfig(average_top_k_layers=2, layer_norm_targets=False))
    torch.manual_seed(0)
    model = D2vModel(cfg).eval()
    with torch.no_grad():  # away from the initial LayerNorm affines, so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"{modality}.pt"
    task = model.encoder.fairseq_task_cfg(enc)
    if modality == "text":
        task["data"] = ref.text_dictionary_dir()  # fairseq sizes the vocabulary from dict.txt
    save_d2v_checkpoint(model, path, task_cfg=task)

    state, fairseq_model = ref.fairseq_load_checkpoint(path)
    source, padding_mask = batch_for(fairseq_model, padded=True)
    expected = reference_outputs(fairseq_model, source, "model", padding_mask)
    assert_matches_fairseq(load_d2v(path)(source, padding_mask), None, expected)
    # fairseq's pretraining forward (its EMA path) needs a decoder, which these files do not have: compare the
    # EMA teacher fairseq restored from the file with the one the plugin loads, weight by weight
    ema = load_d2v(path, weights="ema").state_dict()
    fairseq_ema = fairseq_model.ema.model
    if fairseq_model.cfg.ema_encoder_only:
        pairs = {f"blocks.{k}": v for k, v in fairseq_ema.state_dict().items()}
    else:
        prefix = f"modality_encoders.{modality.upper()}."
        pairs = {("encoder." + k[len(prefix):] if k.startswith(prefix) else k): v
                 for k, v in fairseq_ema.state_dict().items()}
    assert pairs and set(pairs) <= set(ema)
    for k, v in pairs.items():
        assert torch.equal(ema[k], v), k
