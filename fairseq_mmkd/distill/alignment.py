"""What aligns a multimodal student's image and text embeddings: pooling per modality, optional projection heads, and
CLIP's learned temperature (fairseq-free).

The student stack itself is ``multimodal.MultimodalDistiller`` (frozen image and text encoders and teachers, one
student stack). ``Alignment`` turns the student's last-block features of either modality into one L2-normalised
embedding per item: the image's CLS token (or the mean of its patches), the caption's mean over its valid tokens (or
its ``<s>`` token), through a linear head per modality when ``projection_dim`` is set. ``logit_scale`` is CLIP's:
``log(1 / 0.07)`` at the start, learned, used clamped at ``log(100)`` (``losses.contrastive``).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.contrastive import CLIP_INIT_TEMPERATURE, initial_logit_scale
from ..retrieval.evaluate import pool_features

MODALITIES = ("image", "text")
POOLINGS = {"image": ("cls", "mean"), "text": ("mean", "cls")}  # text "cls": the <s> token RoBERTa-style heads read


class Alignment(nn.Module):
    """Args:
        embed_dim: width of the student's features.
        projection_dim: a linear head per modality to this width (-1: ``embed_dim``); 0 for none (the pooled features
            are the embedding).
        pooling: modality -> ``"cls"`` or ``"mean"``.
        init_temperature: the temperature the learned logit scale starts from (CLIP: 0.07).
    """

    def __init__(self, embed_dim: int, projection_dim: int = 0, pooling: Optional[Mapping[str, str]] = None,
                 init_temperature: float = CLIP_INIT_TEMPERATURE):
        super().__init__()
        self.pooling = {"image": "cls", "text": "mean", **dict(pooling or {})}
        for m, p in self.pooling.items():
            if m not in POOLINGS or p not in POOLINGS[m]:
                raise ValueError(f"model.{m}_pooling={p}: use one of {POOLINGS.get(m, ())}")
        if projection_dim == -1:
            projection_dim = embed_dim
        if projection_dim < 0:
            raise ValueError(f"model.projection_dim={projection_dim}: use -1 (a head of the student's width), a width, "
                             "or 0 (no head)")
        if not init_temperature > 0:
            raise ValueError(f"model.init_temperature={init_temperature} must be positive (CLIP: 0.07)")
        self.embed_dim = projection_dim or embed_dim
        self.heads = (nn.ModuleDict({m: nn.Linear(embed_dim, projection_dim, bias=False) for m in MODALITIES})
                      if projection_dim else None)
        if self.heads is not None:
            for head in self.heads.values():
                nn.init.normal_(head.weight, std=embed_dim ** -0.5)  # CLIP's projection init
        self.logit_scale = nn.Parameter(torch.tensor(initial_logit_scale(init_temperature)))

    def embed(self, modality: str, features: torch.Tensor, padding_mask: Optional[torch.Tensor],
              num_extra_tokens: int) -> torch.Tensor:
        """``[B, T, D]`` student features (extra tokens first; ``padding_mask`` True at padding) -> ``[B, P]``,
        L2-normalised."""
        pooled = pool_features(features, num_extra_tokens, self.pooling[modality], padding_mask)
        if self.heads is not None:
            pooled = self.heads[modality](pooled)
        return F.normalize(pooled.float(), dim=-1)


class AlignedEncoders(nn.Module):
    """An exported image-text student (``python -m fairseq_mmkd.export``), ready to embed::

        enc = AlignedEncoders.from_file("aligned.pt")
        images = enc.embed_images(x)                      # normalised float [B, 3, S, S] -> [B, P]
        captions = enc.embed_captions(["a dog on a sofa"])  # -> [N, P], tokenised as in training
        similarity = images @ captions.t()                # cosine; x enc.scale for CLIP logits

    The image and text models are the file's two modalities (``load_d2v(path, modality=...)``, sharing the student's
    blocks), followed by the file's ``alignment`` entry (pooling, heads, scale).
    """

    def __init__(self, image, text, entry: dict, tokenizer=None):
        super().__init__()
        self.image, self.text, self.tokenizer = image, text, tokenizer
        heads = entry.get("heads")
        self.alignment = Alignment(image.cfg.embed_dim, projection_dim=int(entry["embed_dim"]) if heads else 0,
                                   pooling=entry["pooling"])
        with torch.no_grad():
            self.alignment.logit_scale.fill_(float(entry["logit_scale"]))
            if heads:
                for m, w in heads.items():
                    self.alignment.heads[m].weight.copy_(w)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path, device="cpu", text_dict: Optional[str] = None) -> "AlignedEncoders":
        from ..d2v.loading import CheckpointError, load_d2v, read_checkpoint

        state = read_checkpoint(path)
        entry = state.get("alignment") if isinstance(state, dict) else None
        if not entry:
            raise CheckpointError(f"{path} holds no alignment entry: export a d2v_kd_image_text checkpoint with "
                                  "python -m fairseq_mmkd.export")
        image, text = load_d2v(path, modality="image"), load_d2v(path, modality="text")
        captions = dict(entry.get("captions") or {})
        tokenizer = None
        folder = text_dict or captions.get("text_dict")
        if folder:
            from ..data.captions import CaptionTokenizer

            tokenizer = CaptionTokenizer(folder, captions.get("bpe_encoder_json"), captions.get("bpe_vocab"),
                                         min(int(captions.get("max_caption_tokens") or 40),
                                             text.cfg.encoder.max_source_positions))
        return cls(image, text, entry, tokenizer).to(device)

    @property
    def scale(self) -> float:
        from ..losses.contrastive import clip_logit_scale

        return float(clip_logit_scale(self.alignment.logit_scale))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.image(images)
        return self.alignment.embed("image", out["x"], None, self.image.num_extra_tokens)

    def embed_tokens(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.text(tokens, padding_mask)
        return self.alignment.embed("text", out["x"], out["padding_mask"], self.text.num_extra_tokens)

    def embed_captions(self, captions) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("no caption tokenizer: pass text_dict= (the folder with the text teacher's dict.txt)")
        from ..data.captions import pad_captions

        ids, mask = pad_captions(self.tokenizer.encode_all(list(captions)), self.tokenizer.pad)
        device = self.alignment.logit_scale.device
        return self.embed_tokens(ids.to(device), mask.to(device) if bool(mask.any()) else None)
