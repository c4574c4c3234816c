"""fairseq's own data2vec 2.0 (``examples/data2vec``) as the reference the plugin is checked against.

The reference is fairseq's code, run as fairseq runs it, never a re-implementation: a small
``Data2VecMultiModel`` is configured from the released ``base_images_only_task.yaml`` (plus size
overrides), trained for a step by a real ``fairseq.trainer.Trainer`` and saved by
``Trainer.save_checkpoint`` (i.e. ``checkpoint_utils.torch_persistent_save``), so the files have exactly
the layout of released checkpoints. Reference outputs come from fairseq's own forward passes.

fairseq-fixed ships ``examples/data2vec`` but it does not import on Python 3.11 (dataclass instances as
field defaults; ``np.float`` removed from numpy). Nothing of fairseq is committed here: the package is
copied into a temporary directory at test time and patched there, once per process.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

# Sizes of the small reference model; anything of the released base config not listed stays as in
# base_images_only_task.yaml (post-LN, FFN targets, instance-norm + layer-norm targets, CLS token, ...).
SMALL = {
    "embed_dim": 32,
    "num_heads": 4,
    "depth": 3,
    "average_top_k_layers": 3,
    "input_size": 32,
    "patch_size": 8,
    "prenet_depth": 2,
    "num_extra_tokens": 1,
    "model.clone_batch": 2,
    "model.modalities.image.decoder.decoder_dim": 16,
    "model.modalities.image.decoder.decoder_groups": 4,
    "model.modalities.image.decoder.decoder_layers": 2,
}

# The same for text (base_text_only_task.yaml: post-LN, no prenet, FFN targets, instance norm per layer,
# average of every block, EMA of the blocks only) and audio (base_audio_only_task.yaml: conv extractor in
# layer_norm mode, conv positions, ALiBi with a learned per-head scale, no prenet, top-k < depth).
SMALL_TEXT = {
    "embed_dim": 32,
    "num_heads": 4,
    "depth": 3,
    "average_top_k_layers": 3,
    "max_source_positions": 24,
    "model.clone_batch": 2,
    "model.modalities.text.decoder.decoder_dim": 16,
    "model.modalities.text.decoder.decoder_layers": 2,
    "model.modalities.text.decoder.decoder_kernel": 3,
}
SMALL_AUDIO = {
    "embed_dim": 32,
    "num_heads": 4,
    "depth": 3,
    "average_top_k_layers": 2,
    "feature_encoder_spec": "[(32, 10, 5)] + [(32, 3, 2)] * 2",
    "conv_pos_depth": 2,
    "conv_pos_width": 10,
    "conv_pos_groups": 4,
    "model.clone_batch": 2,
    "model.modalities.audio.decoder.decoder_dim": 16,
    "model.modalities.audio.decoder.decoder_groups": 4,
    "model.modalities.audio.decoder.decoder_layers": 2,
}
TEXT_VOCAB = 30  # symbols in the test dict.txt; fairseq adds <s> <pad> </s> <unk> and <mask>: V = 35

# Per modality: released config, small sizes, and the short names that are keys of model.modalities.<m>.
MODALITIES = {
    "image": dict(config="base_images_only_task", small=SMALL, mode="IMAGE",
                  keys=("input_size", "patch_size", "prenet_depth", "num_extra_tokens", "ema_local_encoder",
                        "in_chans", "init_extra_token_zero")),
    "text": dict(config="base_text_only_task", small=SMALL_TEXT, mode="TEXT",
                 keys=("prenet_depth", "num_extra_tokens", "max_source_positions", "no_scale_embedding",
                       "layernorm_embedding")),
    "audio": dict(config="base_audio_only_task", small=SMALL_AUDIO, mode="AUDIO",
                  keys=("prenet_depth", "num_extra_tokens", "feature_encoder_spec", "extractor_mode",
                        "conv_pos_depth", "conv_pos_width", "conv_pos_groups", "conv_pos_pre_ln",
                        "learned_alibi_scale_per_head", "learned_alibi_scale_per_layer", "use_alibi_encoder",
                        "ema_local_encoder", "alibi_scale")),
}

_cache: dict = {}


def import_reference(tmpdir=None) -> SimpleNamespace:
    """Import a patched copy of fairseq's ``examples/data2vec``; the result is cached per process.

    Args:
        tmpdir: where the ``examples`` package is copied (default: a fresh temporary directory removed
            at exit). Ignored once the reference has been imported in this process.

    Returns:
        namespace with ``data2vec2`` (models module), ``tasks``, ``Modality`` and ``root`` (the copied
        ``examples/data2vec`` directory, whose ``config/v2`` holds the released yaml configs).
    """
    if "ref" in _cache:
        return _cache["ref"]
    import fairseq

    if tmpdir is None:
        tmpdir = tempfile.mkdtemp(prefix="fairseq_d2v_ref_")
        atexit.register(shutil.rmtree, tmpdir, ignore_errors=True)
    src = Path(fairseq.__file__).parent / "examples"
    dst = Path(tmpdir) / "examples"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "__init__.py", dst / "__init__.py")
    shutil.copytree(src / "data2vec", dst / "data2vec", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    _patch_for_python311(dst / "data2vec")

    # The top-level name `examples` is generic (fairseq's own copy, other projects): make sure ours wins.
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tmpdir))
    importlib.invalidate_caches()
    data2vec2 = importlib.import_module("examples.data2vec.models.data2vec2")
    ref_tasks = importlib.import_module("examples.data2vec.tasks")  # registers mae_image_pretraining
    modality = importlib.import_module("examples.data2vec.data.modality")
    assert Path(data2vec2.__file__).is_relative_to(tmpdir), data2vec2.__file__
    _cache["ref"] = SimpleNamespace(data2vec2=data2vec2, tasks=ref_tasks, Modality=modality.Modality,
                                    root=dst / "data2vec")
    return _cache["ref"]


def _patch_for_python311(root: Path) -> None:
    """Python 3.11 rejects dataclass instances as field defaults; numpy 2 has no ``np.float``."""
    mutable_default = re.compile(r"^(\s+\w+\s*:\s*[^=\n]+=\s*)(\w+)\(\)\s*$", re.M)
    sites = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        new, n = mutable_default.subn(r"\1__import__('dataclasses').field(default_factory=\2)", text)
        new = re.sub(r"\bnp\.float\b", "float", new)
        sites += n
        if new != text:
            path.write_text(new)
    if sites != 6:  # data2vec2.py x4, modalities/base.py x1, data2vec_text.py x1 in fairseq-fixed 0.12.3.1
        raise RuntimeError(f"expected 6 dataclass default sites to patch in {root}, found {sites}: "
                           "fairseq's examples/data2vec changed, check the patch")


def _config_overrides(overrides: dict, modality: str = "image") -> dict:
    """Expand short names (``depth``, ``patch_size``, ...) into dotted fairseq config keys."""
    spec = MODALITIES[modality]
    out = {}
    for key, value in {**spec["small"], **overrides}.items():
        if "." in key:
            out[key] = value
        elif key == "embed_dim":  # model and modality dims equal, as in every released model
            out["model.embed_dim"] = value
            if modality == "image":
                out["model.modalities.image.embed_dim"] = value
        elif key == "image_embed_dim":  # a differing modality dim adds a Linear after the patch embedding
            out["model.modalities.image.embed_dim"] = value
        elif key in spec["keys"]:
            out[f"model.modalities.{modality}.{key}"] = value
            if key == "input_size":
                out["task.input_size"] = value
            if key == "max_source_positions":
                out["task.tokens_per_sample"] = value
        else:
            out[f"model.{key}"] = value
    if "image_embed_dim" in overrides:
        out["model.modalities.image.embed_dim"] = overrides["image_embed_dim"]
    if modality == "image" and out["model.modalities.image.num_extra_tokens"] == 0:
        out.setdefault("model.cls_loss", 0.0)  # fairseq asserts a CLS token when cls_loss > 0
    return out


def text_dictionary_dir() -> str:
    """A folder with a fairseq ``dict.txt`` of ``TEXT_VOCAB`` symbols: what ``masked_lm`` builds its dictionary
    (and data2vec2's TextEncoder its vocabulary size) from."""
    if "dict_dir" not in _cache:
        folder = tempfile.mkdtemp(prefix="fairseq_d2v_text_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        Path(folder, "dict.txt").write_text("".join(f"w{i} {1000 - i}\n" for i in range(TEXT_VOCAB)))
        _cache["dict_dir"] = folder
    return _cache["dict_dir"]


def make_config(modality: str = "image", **overrides):
    """The full fairseq config a ``fairseq-hydra-train --config-name base_<modality>_only_task`` run gets.

    It is composed by hydra from the released yaml on top of ``FairseqConfig`` (fairseq's
    ``hydra_init`` schema), completed by ``add_defaults`` (every ``Data2VecMultiConfig`` and task
    field), then the overrides are applied and everything is resolved, as ``fairseq_cli.hydra_train``
    does. Overrides take short names (see ``SMALL``, ``SMALL_TEXT``, ``SMALL_AUDIO``) or dotted config keys.
    """
    ref = import_reference()
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    name = MODALITIES[modality]["config"]
    if ("yaml", name) not in _cache:
        hydra_init(name)
        # version_base 1.1 is what fairseq's `@hydra.main` (no version_base) gets; with newer semantics
        # the yaml's `# @package _group_` header would nest everything under a literal `_group_` key.
        with initialize_config_dir(config_dir=str(ref.root / "config" / "v2"), version_base="1.1"), \
                warnings.catch_warnings():
            # fairseq relies on hydra matching the yaml to the schema stored under the same name, which
            # hydra >= 1.1 still does but warns about; the warning is about hydra's future, not this test
            warnings.filterwarnings("ignore", message="(?s).*validated against ConfigStore schema")
            composed = compose(name)
        # composed once; kept unresolved so each config resolves its own overrides (${model.depth}, ...)
        _cache[("yaml", name)] = OmegaConf.to_container(composed, resolve=False)
    cfg = OmegaConf.create(_cache[("yaml", name)])
    add_defaults(cfg)
    settings = {"common.fp16": False, "common.cpu": True, "common.user_dir": str(ref.root),
                "common.tensorboard_logdir": None,
                "distributed_training.distributed_world_size": 1, "task.data": "/unused",
                "optimization.max_update": 100, "dataset.num_workers": 0}
    if modality == "image":
        settings["task.local_cache_path"] = None
    if modality == "text":
        settings["task.data"] = text_dictionary_dir()
    if "groups" in (cfg.optimizer or {}):  # composite optimizer (image, text): its own scheduler
        settings["optimizer.groups.default.lr_scheduler.warmup_updates"] = 2
    else:
        settings["lr_scheduler.warmup_updates"] = 2
    settings.update(_config_overrides(overrides, modality))
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=True)
    with omegaconf_no_object_check():
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


@contextlib.contextmanager
def _fresh_fairseq_metrics():
    """A trainer process starts with empty fairseq metrics; tests share one process, so isolate them."""
    from fairseq.logging import metrics

    saved = (metrics._aggregators.copy(), metrics._active_aggregators.copy(),
             metrics._active_aggregators_cnt.copy())
    metrics.reset()
    try:
        yield metrics
    finally:
        for live, old in zip((metrics._aggregators, metrics._active_aggregators,
                              metrics._active_aggregators_cnt), saved):
            live.clear()
            live.update(old)


def _perturb_(module, generator, scale) -> None:
    """Deterministic noise on every weight but the fixed position table (a constant in fairseq too)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("fixed_positional_encoder.positions"):
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def _online_to_ema_(model) -> None:
    """Copy the online weights into the EMA teacher, the way ``make_target_model`` initialises it."""
    ema = model.ema.model
    with torch.no_grad():
        if model.cfg.ema_encoder_only:
            for p_s, p_t in zip(model.blocks.parameters(), ema.parameters()):
                p_t.copy_(p_s)
        else:
            online = dict(model.named_parameters())
            for name, p_t in ema.named_parameters():
                p_t.copy_(online[name])
    model.ema.build_fp32_params()


def config_modality(cfg) -> str:
    """``"image"``, ``"text"`` or ``"audio"``: the modality a reference config (full or ``model`` section) or
    reference model builds."""
    model_cfg = cfg.cfg if hasattr(cfg, "modality_encoders") else getattr(cfg, "model", cfg)
    return str(model_cfg.supported_modality).split(".")[-1].lower()


def text_batch(model_cfg, batch_size: int, generator, lengths=None) -> dict:
    """Token ids as masked_lm's d2v2 dataset collates them: ``<s>`` then words, right-padded with ``<pad>``.
    ``model_cfg``: the config's ``model`` section (a reference model's ``.cfg``)."""
    length = model_cfg.modalities.text.max_source_positions
    lengths = lengths or [length] * batch_size
    tokens = torch.randint(4, 4 + TEXT_VOCAB, (batch_size, max(lengths)), generator=generator)
    tokens[:, 0] = 0  # <s>
    padding_mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    tokens[padding_mask] = 1  # <pad>
    return {"source": tokens, "padding_mask": padding_mask}


def audio_batch(model_cfg, batch_size: int, generator, lengths=None, samples: int = 2000) -> dict:
    """Normalised-looking samples; ``lengths`` right-pads with zeros and a sample-level mask, as fairseq's
    ``RawAudioDataset`` collater does with ``pad=True``."""
    lengths = lengths or [samples] * batch_size
    source = torch.randn(batch_size, max(lengths), generator=generator)
    padding_mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    source[padding_mask] = 0.0
    out = {"source": source}
    if len(set(lengths)) > 1:
        out["padding_mask"] = padding_mask
    return out


def _training_batch(cfg, batch_size, generator):
    """One training batch as the modality's pretraining dataset collates it (image: images plus block masks
    precomputed per clone; text: token blocks; audio: equal-length crops, masks drawn by the model)."""
    modality = config_modality(cfg)
    ids = torch.arange(batch_size)
    if modality == "text":
        return {"id": ids, "net_input": {**text_batch(cfg.model, batch_size, generator), "id": ids}}
    if modality == "audio":
        return {"id": ids, "net_input": {**audio_batch(cfg.model, batch_size, generator), "id": ids}}

    from fairseq.data.data_utils import compute_block_mask_2d

    img = cfg.model.modalities.image
    n = img.input_size // img.patch_size
    m = cfg.task.precompute_mask_config
    mask = compute_block_mask_2d(shape=(batch_size * cfg.model.clone_batch, n * n), mask_prob=m.mask_prob,
                                 mask_length=m.mask_length, mask_prob_adjust=m.mask_prob_adjust,
                                 inverse_mask=m.inverse_mask, require_same_masks=True,
                                 mask_dropout=m.mask_dropout)
    source = torch.randn(batch_size, img.in_chans, img.input_size, img.input_size, generator=generator)
    return {"id": ids, "net_input": {"source": source, "precomputed_mask": mask}}


def build_reference_trainer(seed: int = 0, modality: str = "image", **overrides):
    """A fairseq ``Trainer`` around a small single-modality ``Data2VecMultiModel`` built from ``make_config``.

    The online weights get deterministic noise (so LayerNorm affines and biases are away from their
    initial 1/0 and every parameter matters), then the EMA teacher is initialised from them as fairseq
    does. Use :func:`train_reference` to run training steps.
    """
    import_reference()
    from fairseq import tasks
    from fairseq.trainer import Trainer

    cfg = make_config(modality, **overrides)
    torch.manual_seed(seed)
    np.random.seed(seed)  # fairseq draws masks with numpy
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    _perturb_(model, torch.Generator().manual_seed(seed), 0.1)
    if model.ema is not None:
        _online_to_ema_(model)
    return Trainer(cfg, task, model, task.build_criterion(cfg.criterion))


def train_reference(trainer, steps: int, seed: int = 0):
    """Run ``steps`` real fairseq training steps (optimizer, lr scheduler, EMA update, metrics), then
    give the EMA weights their own noise: after a few steps EMA and online weights are still nearly
    equal, and the tests must be able to tell which set a loader picked. Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        trainer.train_step([_training_batch(trainer.cfg, 2, gen)])
    model = trainer.model
    if model.ema is not None:
        _perturb_(model.ema.model, gen, 0.05)
        model.ema.build_fp32_params()
    return model.eval()


def build_reference_model(seed: int = 0, train_steps: int = 0, modality: str = "image", **overrides):
    """A real fairseq ``Data2VecMultiModel`` (one modality, small), online and EMA weights differing.

    Args:
        seed: seeds weights, noise and training data.
        train_steps: real fairseq training steps to run before returning.
        overrides: short names (``depth``, ``layer_norm_first``, ``patch_size``, ...; see ``SMALL``) or
            dotted config keys (``model.clone_batch``).
    """
    trainer = build_reference_trainer(seed=seed, modality=modality, **overrides)
    with _fresh_fairseq_metrics():
        return train_reference(trainer, train_steps, seed)


def write_reference_checkpoint(path, seed: int = 0, train_steps: int = 1, numpy_metrics: bool = True,
                               modality: str = "image", **overrides):
    """Train a small reference model for ``train_steps`` and save it exactly as fairseq's trainer does.

    The file is written by ``Trainer.save_checkpoint`` (after ``consolidate_optimizer``, as
    ``checkpoint_utils.save_checkpoint`` does), with the ``extra_state`` a training loop passes. With
    ``numpy_metrics`` the fairseq metrics also hold numpy float64 meters (what a criterion or task that
    logs numpy values leaves there; the single-process trainer here logs only python numbers and 0-d
    tensors). torch >= 2.6 refuses such files under its default ``weights_only`` load.

    Returns:
        the reference ``Data2VecMultiModel`` in eval mode, holding the saved weights.
    """
    trainer = build_reference_trainer(seed=seed, modality=modality, **overrides)
    with _fresh_fairseq_metrics() as metrics:
        with metrics.aggregate("train"), metrics.aggregate("train_inner"):
            model = train_reference(trainer, train_steps, seed)
            if numpy_metrics:
                metrics.log_scalar("target_var_np", np.float64(0.998), weight=2, round=3)
                metrics.log_scalar("masked_pct_np", np.mean(np.array([0.8125, 0.75])), round=3)
        trainer.consolidate_optimizer()
        trainer.save_checkpoint(str(path), {
            "train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": train_steps, "shuffle": True},
            "val_loss": None,
        })
    return model


def _capture_blocks(blocks):
    """Hooks recording the input of the first block and ``(output, target)`` of every block."""
    record = {"input": None, "outputs": []}

    def pre_hook(_module, args):
        if record["input"] is None:
            record["input"] = args[0].detach().clone()

    def hook(_module, _args, output):
        record["outputs"].append(tuple(t.detach().clone() for t in output))

    handles = [blocks[0].register_forward_pre_hook(pre_hook)]
    handles += [blk.register_forward_hook(hook) for blk in blocks]
    return record, handles


def reference_outputs(model, source: torch.Tensor, weights: str = "model",
                      padding_mask: Optional[torch.Tensor] = None) -> dict:
    """fairseq's own outputs for ``source``, in the layout of ``fairseq_mmkd.D2vModel``'s outputs.

    ``weights="model"`` runs the student feature path (``features_only``, no mask, extra tokens kept).
    ``weights="ema"`` runs fairseq's full pretraining forward (masking, decoder, loss) and records what
    its EMA teacher computes: the input of the first EMA block, every EMA block's output and target,
    and the targets fairseq's ``make_targets`` builds from them with the checkpoint's settings.
    ``padding_mask`` (text: tokens, audio: samples; True at padding) goes to fairseq's forward as is.

    Returns:
        dict with ``encoder_out``, ``layer_results``, ``block_out`` (extra tokens included), ``targets``
        (extra tokens excluded), ``padding_mask`` (sequence resolution, as the blocks saw it) and, for
        ``"model"``, ``x`` (after the final norm of pre-LN models).
    """
    model.eval()
    mode = str(model.cfg.supported_modality).split(".")[-1]
    n_extra = model.modality_encoders[mode].modality_cfg.num_extra_tokens
    out = {}
    block_masks = []

    def record_mask(_module, _args, kwargs):
        block_masks.append(kwargs.get("padding_mask"))

    with torch.no_grad():
        if weights == "model":
            record, handles = _capture_blocks(model.blocks)
            handles.append(model.blocks[0].register_forward_pre_hook(record_mask, with_kwargs=True))
            try:
                res = model(source, mode=mode, padding_mask=padding_mask, mask=False, features_only=True,
                            remove_extra_tokens=False)
            finally:
                for h in handles:
                    h.remove()
            out["x"] = res["x"]
            out["targets"] = model.make_targets([lr[:, n_extra:] for lr in res["layer_results"]],
                                                model.average_top_k_layers)
            assert all(torch.equal(a, b[1]) for a, b in zip(res["layer_results"], record["outputs"]))
        elif weights == "ema":
            teacher = model.ema.model
            blocks = teacher if model.cfg.ema_encoder_only else teacher.blocks
            record, handles = _capture_blocks(blocks)
            handles.append(blocks[0].register_forward_pre_hook(record_mask, with_kwargs=True))
            targets = []

            def make_targets(y, num_layers):
                targets.append(type(model).make_targets(model, y, num_layers))
                return targets[-1]

            model.make_targets = make_targets
            try:
                model(source, mode=mode, padding_mask=padding_mask, id=torch.arange(source.shape[0]))
            finally:
                del model.make_targets
                for h in handles:
                    h.remove()
            out["targets"] = targets[0]
        else:
            raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    out["encoder_out"] = record["input"]
    out["block_out"] = [o for o, _ in record["outputs"]]
    out["layer_results"] = [t for _, t in record["outputs"]]
    pm = block_masks[0] if block_masks else None
    out["padding_mask"] = pm if pm is not None and bool(pm.any()) else None
    return out


def fairseq_load_checkpoint(path):
    """Read a checkpoint with ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` and rebuild its model.

    This is how fairseq itself (fine-tuning, ``fairseq-validate``) opens a data2vec2 file: the task and
    model are built from the stored cfg with ``from_checkpoint=True``, and the weights (``_ema``
    included) are loaded strictly.
    """
    import_reference()
    from fairseq import checkpoint_utils, tasks

    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    task = tasks.setup_task(state["cfg"].task)
    model = task.build_model(state["cfg"].model, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)
    return state, model.eval()


def fairseq_load_multimodal_checkpoint(path):
    """``fairseq_load_checkpoint`` with data2vec2's ``multimodal_pretraining`` task registered (fairseq keeps it in
    ``examples/data2vec/tasks/multimodal.py``, which its package ``__init__`` leaves out)."""
    import_reference()
    importlib.import_module("examples.data2vec.tasks.multimodal")
    return fairseq_load_checkpoint(path)


@contextlib.contextmanager
def torch_load_without_weights_only():
    """fairseq passes no ``weights_only`` to ``torch.load``; torch >= 2.6 then defaults it to True and
    refuses numpy scalars. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is the documented way back."""
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old


def write_classifier_checkpoint(path, pretrained_path, num_classes: int = 5):
    """Fine-tune-ready classifier (``mae_image_classification``) built from ``pretrained_path`` by fairseq
    and saved by its trainer: the layout of the released ``*_ft.pt`` files (backbone under ``model.*``,
    ``fc_norm`` and ``head`` beside it, no ``_ema``, pretraining cfg in ``cfg.model.pretrained_model_args``).
    """
    import_reference()
    for name in ("models.mae_image_classification", "tasks.mae_image_classification"):  # registers both
        importlib.import_module(f"examples.data2vec.{name}")
    from fairseq import tasks
    from fairseq.dataclass.initialize import add_defaults
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from fairseq.trainer import Trainer
    from omegaconf import OmegaConf

    pretrained_cfg = torch.load(pretrained_path, map_location="cpu", weights_only=False)["cfg"]  # test-made
    cfg = OmegaConf.create(pretrained_cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.model = {"_name": "mae_image_classification", "model_path": str(pretrained_path),
                 "num_classes": num_classes}
    cfg.task = {"_name": "mae_image_classification", "data": "/unused",
                "input_size": pretrained_cfg["task"]["input_size"]}
    add_defaults(cfg)
    with omegaconf_no_object_check():
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    task = tasks.setup_task(cfg.task)
    with torch_load_without_weights_only():  # the pretrained file may hold numpy metrics
        model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    with _fresh_fairseq_metrics():
        trainer.consolidate_optimizer()
        trainer.save_checkpoint(str(path), {"train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 0,
                                                                 "shuffle": True}, "val_loss": None})
    return model
