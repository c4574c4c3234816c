"""Loading a trained d2v_kd or d2v_kd_multimodal checkpoint for inference, without the teacher file."""

from ..d2v.loading import CheckpointError

STUDENT_MODELS = ("d2v_kd", "d2v_kd_multimodal", "d2v_kd_image_text")


def load_student(path, device="cpu", trust_checkpoint: bool = False):
    """A trained ``d2v_kd`` (or ``d2v_kd_multimodal``) checkpoint as an eval-mode model (no teacher file needed).

    Reads the file with the plugin's safe loader, then lets fairseq rebuild the task and model exactly as
    ``checkpoint_utils.load_model_ensemble_and_task`` would (importing this package registered them). A multimodal
    student is a ``D2vKDMultimodalModel``:
    ``modalities``, and ``modality_model(m)`` for what the single-modality code reads of one of them.
    """
    from fairseq import tasks
    from omegaconf import OmegaConf

    from ..d2v.loading import read_checkpoint

    state = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    cfg = state.get("cfg") if isinstance(state, dict) else None
    name = (cfg or {}).get("model", {}).get("_name") if isinstance(cfg, dict) else None
    if name not in STUDENT_MODELS:
        raise CheckpointError(f"{path}: is not a d2v_kd student checkpoint (nor d2v_kd_multimodal; model "
                              f"{name!r}); for a data2vec2 teacher checkpoint or an exported student use --teacher / "
                              "load_d2v")
    cfg = OmegaConf.create(cfg, flags={"allow_objects": True})
    task = tasks.setup_task(cfg.task, from_checkpoint=True)
    task.load_state_dict(state.get("task_state") or {})
    model = task.build_model(cfg.model, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    if name == "d2v_kd_image_text":  # how its captions are tokenised, for evaluation and export
        model.caption_settings = {k: cfg.task.get(k) for k in ("text_dict", "bpe_encoder_json", "bpe_vocab",
                                                                 "max_caption_tokens")}
    return model.eval().requires_grad_(False).to(device)
