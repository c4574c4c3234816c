"""Image-caption pairs for fairseq: the training set (one caption of each image per epoch), the validation batch of
the losses, and the held-out set of zero-shot retrieval, read once and cached."""
import logging
import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..data import image as image_data
from ..data.captions import CaptionTokenizer, pad_captions
from ..data.common import sample_seed
from ..data.pairs import TRAIN_SPLITS, Pairs, read_pairs

logger = logging.getLogger(__name__)


class PairDataset(FairseqDataset):
    """Item ``i``: image ``i`` (augmented for training, centre-cropped else) and one of its captions, drawn per epoch
    from ``(seed, epoch, i)`` (for validation: its first). A batch holds ``image`` (the image task's batch) and
    ``text`` (padded token ids), ``nsamples`` pairs."""

    def __init__(self, pairs: Pairs, images: image_data.ImageListDataset, tokens: list, pad: int, seed: int,
                 train: bool = True):
        self.pairs, self.images, self.tokens, self.pad, self.seed, self.train = pairs, images, tokens, pad, seed, train
        self.by_image = [pairs.captions_of(i) for i in range(len(pairs))]

    def caption(self, index: int) -> int:
        options = self.by_image[index]
        if not self.train or len(options) == 1:
            return options[0]
        g = np.random.default_rng(sample_seed(self.seed, self.images.epoch, index, 1))
        return options[int(g.integers(len(options)))]

    def __getitem__(self, index):
        item = self.images[index]
        return {**item, "caption": self.tokens[self.caption(int(index))]}

    def __len__(self):
        return len(self.images)

    def collater(self, samples):
        if not samples:
            return {}
        image = self.images.collater([{k: v for k, v in s.items() if k != "caption"} for s in samples])
        ids, mask = pad_captions([s["caption"] for s in samples], self.pad)
        text = {"net_input": {"source": ids, "padding_mask": mask}, "nsamples": len(samples),
                "ntokens": int((~mask).sum())}
        return {"id": image["id"], "image": image, "text": text, "nsamples": len(samples)}

    def num_tokens(self, index):
        return 1

    def size(self, index):
        return 1

    def ordered_indices(self):
        if not self.train:
            return np.arange(len(self))
        return np.random.permutation(len(self))  # fairseq seeds numpy with (seed + epoch) around this call

    def set_epoch(self, epoch):
        self.images.set_epoch(epoch)


class PairData:
    """The task's pairs: training (``task.pairs``), validation (``task.valid_pairs``), the caption tokenizer."""

    modality = "image-text"

    def __init__(self, cfg, train: bool = True):
        self.cfg = cfg
        if train and not cfg.pairs:
            raise ValueError("task.pairs is not set: give the training pairs, a JSON list of {image, caption} "
                             "(ALBEF/BLIP) or Karpathy's dataset_coco.json / dataset_flickr30k.json")
        if not cfg.text_dict:
            raise ValueError("task.text_dict is not set: give the folder with the text teacher's dict.txt "
                             "(nlp_base.pt: RoBERTa's dict.txt)")
        if cfg.crop_scale_min <= 0 or cfg.crop_scale_min > 1:
            raise ValueError(f"task.crop_scale_min={cfg.crop_scale_min} must be in (0, 1]")
        self.tokenizer = CaptionTokenizer(cfg.text_dict, cfg.bpe_encoder_json or None, cfg.bpe_vocab or None,
                                          cfg.max_caption_tokens)
        self.train_pairs = read_pairs(cfg.pairs, cfg.image_root or None, TRAIN_SPLITS) if train else None
        self.valid_pairs = (read_pairs(cfg.valid_pairs, cfg.valid_image_root or None, (cfg.valid_split,))
                            if cfg.valid_pairs else None)
        self.train_tokens = (self.tokenizer.encode_all(self.train_pairs.captions, self.train_pairs.source) if train
                             else None)
        self.valid_tokens = (self.tokenizer.encode_all(self.valid_pairs.captions, self.valid_pairs.source)
                             if self.valid_pairs else None)
        if train:
            image_data.probe_images(self.train_pairs.images)
        self.input_size = None
        self.valid_images_cache = None  # uint8 centre crops of the validation images, read once (valid_images())

    def configure(self, image_model, text_vocab_size: int, text_positions: int) -> None:
        """Fit to the teachers: the image size, the dictionary, and captions cut to the text teacher's positions."""
        self.input_size = image_model.input_size
        self.tokenizer.check_teacher(text_vocab_size)
        if self.tokenizer.max_tokens > text_positions:
            logger.info(f"task.max_caption_tokens={self.tokenizer.max_tokens} is more than the text teacher's "
                        f"{text_positions} positions: captions are cut to {text_positions} tokens")
            self.tokenizer.max_tokens = text_positions
            self.train_tokens, self.valid_tokens = (
                None if tokens is None else [self.tokenizer.cut(t) for t in tokens]
                for tokens in (self.train_tokens, self.valid_tokens))

    def _images(self, pairs: Pairs, train: bool):
        if self.input_size is None:
            raise RuntimeError("build the model before loading datasets: the crop size comes from the image teacher")
        return image_data.ImageListDataset(pairs.images, self.input_size, train=train,
                                           scale=(self.cfg.crop_scale_min, 1.0),
                                           max_bad_fraction=self.cfg.max_bad_image_fraction, seed=self.cfg.seed)

    def train(self, epoch: int) -> PairDataset:
        return PairDataset(self.train_pairs, self._images(self.train_pairs, True), self.train_tokens,
                           self.tokenizer.pad, self.cfg.seed)

    def valid(self, count: int):
        from ._data import ValidRound

        pairs, tokens = ((self.valid_pairs, self.valid_tokens) if self.valid_pairs is not None
                         else (self.train_pairs, self.train_tokens))
        data = PairDataset(pairs, self._images(pairs, False), tokens, self.tokenizer.pad, self.cfg.seed, train=False)
        return ValidRound(data, count, data.collater)

    def valid_images(self) -> torch.Tensor:
        """uint8 ``[N, 3, S, S]``: the validation images as the eval transform crops them, decoded once
        (``data.image.load_eval_crops``): embedding them each round then costs no decoding."""
        if self.valid_images_cache is None:
            self.valid_images_cache = image_data.load_eval_crops(self.valid_pairs.images, self.input_size)
            logger.info(f"{len(self.valid_pairs.images)} validation images of {self.valid_pairs.source} read at "
                        f"{self.input_size} px")
        return self.valid_images_cache
