"""Write a ``D2vModel`` as a data2vec 2.0 (``data2vec_multi``) checkpoint in fairseq's trainer layout.

Used to export trained students (so fairseq's data2vec2 fine-tuning tooling and ``load_d2v_image`` can
start from them) and to create the demo's small, randomly initialised teacher. The file has what fairseq's
``checkpoint_utils.load_checkpoint_to_cpu`` expects: ``args``/``cfg``/``model`` (with ``_ema``)/
``criterion``/``optimizer_history``/``task_state``/``extra_state``, and only safe types (tensors,
containers, primitives), so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations


import torch

from ..files import atomic_write
from .model import D2vConfig, D2vModel
from ..encoders import get_encoder_class
from ..modules.targets import TargetConfig

_TARGET_FIELDS = tuple(TargetConfig.__dataclass_fields__)


def d2v_model_cfg(cfg: D2vConfig) -> dict:
    """The ``cfg['model']`` section fairseq's ``Data2VecMultiConfig`` accepts for this architecture.

    Pretraining-only parts are switched off (no decoder, no dropout, no masking loss terms). The EMA copy
    follows the released models of the modality: a full copy for images, the blocks only for text
    (``ema_encoder_only``), everything but the conv stack and projection for audio.
    """
    enc_cls = get_encoder_class(cfg.modality)
    modality = {
        "prenet_layerdrop": 0.0, "prenet_dropout": 0.0, "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0,
        "num_extra_tokens": 0, "init_extra_token_zero": False, "ema_local_encoder": False, "local_grad_mult": 1.0,
        "use_alibi_encoder": False, "decoder": None, "num_alibi_heads": cfg.num_heads, "model_depth": cfg.depth,
        **enc_cls.fairseq_modality_cfg(cfg.encoder),
    }
    if cfg.encoder_norm_eps is not None and cfg.encoder_norm_eps != cfg.norm_eps:
        modality["norm_eps"] = cfg.encoder_norm_eps  # read by load_d2v; fairseq's own code drops it (docs/tools.md)
    model = {
        "_name": "data2vec_multi", "depth": cfg.depth, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio, "norm_eps": cfg.norm_eps, "norm_affine": cfg.norm_affine,
        "layer_norm_first": cfg.layer_norm_first, "end_of_block_targets": cfg.end_of_block_targets,
        "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "encoder_dropout": 0.0, "post_mlp_drop": 0.0,
        "attention_dropout": 0.0, "activation_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0,
        "clone_batch": 1, "ema_encoder_only": bool(getattr(enc_cls, "ema_encoder_only", False)),
        "supported_modality": enc_cls.fairseq_name, "skip_ema": False,
        "loss_beta": 0.0, "loss_scale": None, "cls_loss": 0.0, "recon_loss": 0.0, "d2v_loss": 1.0,
        "shared_decoder": None, "mae_init": False, "modalities": {cfg.modality: modality},
    }
    model.update({name: getattr(cfg.targets, name) for name in _TARGET_FIELDS})
    model["average_top_k_layers"] = min(cfg.targets.average_top_k_layers, cfg.depth)
    return model


def d2v_state_dict(model: D2vModel) -> dict:
    """The model's weights under fairseq's names, with an identical EMA copy in ``_ema``, laid out as
    data2vec2 stores it for the modality (see ``d2v_model_cfg``)."""
    enc_cls = type(model.encoder)
    prefix = f"modality_encoders.{enc_cls.fairseq_name}."
    state = {}
    for key, value in model.state_dict().items():
        name = prefix + key[len("encoder."):] if key.startswith("encoder.") else key
        state[name] = value.detach().to("cpu", torch.float32).clone()
    model_cfg = d2v_model_cfg(model.cfg)
    if model_cfg["ema_encoder_only"]:
        ema = {k[len("blocks."):]: v.clone() for k, v in state.items() if k.startswith("blocks.")}
    else:
        local = model_cfg["modalities"][model.cfg.modality]
        online = () if local.get("ema_local_encoder") else tuple(prefix + p for p in enc_cls.online_in_ema_prefixes)
        ema = {k: v.clone() for k, v in state.items() if not k.startswith(online)}
    state["_ema"] = ema
    return state


def trainer_layout(model_cfg: dict, state: dict, task_cfg: dict | None = None) -> dict:
    """A checkpoint dict shaped like the one ``fairseq.trainer.Trainer.state_dict`` writes."""
    from omegaconf import OmegaConf

    try:  # fairseq's own defaults for every other section, when fairseq is installed
        from fairseq.dataclass.configs import FairseqConfig

        cfg = OmegaConf.to_container(OmegaConf.structured(FairseqConfig), resolve=True, enum_to_str=True)
    except ImportError:  # the core works without fairseq; those sections are then minimal
        cfg = {"_name": None, "common": {}, "checkpoint": {}, "dataset": {}, "optimization": {}}
    cfg["model"] = model_cfg
    cfg["task"] = task_cfg
    cfg["criterion"] = {"_name": "model"}
    return {
        "args": None, "cfg": cfg, "model": state, "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": {}, "extra_state": {"metrics": {}, "previous_training_time": 0.0,
                                          "train_iterator": {"epoch": 1, "iterations_in_epoch": 0,
                                                             "shuffle": True, "version": 2}},
    }


def atomic_save(obj, path) -> None:
    """``torch.save`` that never leaves a partial file (``files.atomic_write``)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_d2v_checkpoint(model: D2vModel, path, task_cfg: dict | None = None) -> None:
    """Write ``model`` as a data2vec2 checkpoint that ``load_d2v`` and fairseq both read.

    ``task_cfg``: the ``cfg['task']`` section (default: the modality's pretraining task,
    ``fairseq_task_cfg`` of its encoder); e.g. audio's ``normalize`` lives there.
    """
    enc_cls = type(model.encoder)
    task = task_cfg if task_cfg is not None else enc_cls.fairseq_task_cfg(model.cfg.encoder)
    atomic_save(trainer_layout(d2v_model_cfg(model.cfg), d2v_state_dict(model), task), path)


def save_multimodal_d2v_checkpoint(models: dict, path, task_cfgs: dict | None = None,
                                   shared: str | None = None, extra: dict | None = None) -> None:
    """Write several ``D2vModel`` s that share their blocks as one multimodal data2vec2 checkpoint.

    ``models``: modality -> model, in the order of the file; every model holds the same shared blocks (checked) in
    front of its own modality encoder. The file is data2vec2's multimodal layout: ``modality_encoders.<NAME>.*`` for
    each modality, with its own ``cfg.model.modalities.<modality>`` section (its ``norm_eps`` where the encoder's
    differs from the blocks'), ``supported_modality`` unset, one ``blocks.*``, an EMA copy of the blocks only
    (``ema_encoder_only``), and fairseq's ``multimodal_pretraining`` task with each modality's task section
    (``task_cfgs``: modality -> its ``cfg.task``; default: the encoder's ``fairseq_task_cfg``). The model-wide
    settings (``norm_eps``, target settings) are those of ``shared`` (default: the first modality). ``extra``: more
    top-level entries (an aligned student's ``alignment``), which fairseq's loader leaves alone.
    """
    if not models:
        raise ValueError("no modality to write")
    shared = shared or next(iter(models))
    first = models[shared]
    blocks = first.blocks.state_dict()
    for m, model in models.items():
        other = model.blocks.state_dict()
        if other.keys() != blocks.keys() or any(not torch.equal(other[k], blocks[k]) for k in blocks):
            raise ValueError(f"the {m} model's blocks differ from the {shared} model's: a multimodal file has one "
                             "stack of blocks")
        if model.cfg.norm_eps != first.cfg.norm_eps or model.cfg.layer_norm_first != first.cfg.layer_norm_first:
            raise ValueError(f"the {m} model's block settings differ from the {shared} model's")
    model_cfg = d2v_model_cfg(first.cfg)
    model_cfg["modalities"] = {m: d2v_model_cfg(model.cfg)["modalities"][m] for m, model in models.items()}
    model_cfg["supported_modality"] = None
    model_cfg["ema_encoder_only"] = True
    def weights(module, prefix):
        return {prefix + k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}

    state = {}
    for m, model in models.items():
        state.update(weights(model.encoder, f"modality_encoders.{type(model.encoder).fairseq_name}."))
    state.update(weights(first.blocks, "blocks."))
    if first.norm is not None:
        state.update(weights(first.norm, "norm."))
    state["_ema"] = weights(first.blocks, "")
    task_cfgs = task_cfgs or {}
    task = {"_name": "multimodal_pretraining"}
    for m, model in models.items():
        task[m] = task_cfgs.get(m) or type(model.encoder).fairseq_task_cfg(model.cfg.encoder)
    atomic_save({**trainer_layout(model_cfg, state, task), **(extra or {})}, path)
