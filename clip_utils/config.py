"""The one Config dataclass (every knob, quick and full recipes), device choice and seeding."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Config:
    """Every knob in one place. The defaults are the published full-mode recipe."""

    mode: str = "full"  # "full" (pretrained encoders, real photos) or "quick" (CPU, synthetic data)
    # -- data --
    image_dir: str = ""  # relative image paths in a table are joined to this folder
    image_size: int = 224  # square input size fed to the image encoder
    max_length: int = 64  # longest caption in tokens; each batch pads only to its own longest
    on_bad_input: str = "skip"  # "skip": drop bad rows/images with a counted warning; "raise": stop
    num_workers: int = 2  # DataLoader worker processes on a GPU; on a CPU the model's threads use every core
    # -- model --
    image_model: str = "resnet50"  # any timm model name
    image_pretrained: bool = True  # load timm's ImageNet weights
    image_model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    image_pool: str = "avg"  # timm global pool; "flatten" keeps the small final grid, i.e. *where* things are
    text_model: str = "l3cube-pune/hindi-bert-v2"  # Hugging Face name or local folder
    text_pretrained: bool = True  # False: random-init BERT from text_config + WordPiece trained on captions
    text_config: dict = field(default_factory=dict)  # BertConfig arguments when text_pretrained is False
    vocab_size: int = 2000  # WordPiece vocabulary size when the tokenizer is trained on captions
    pooling: str = "cls"  # "cls" token or "mean" over non-padding tokens
    projection_dim: int = 256  # shared embedding size of both towers
    dropout: float = 0.1  # dropout inside the projection heads
    residual_heads: bool = True  # the published checkpoint's heads have no residual connection
    init_logit_scale: float = math.log(1 / 0.07)  # learnable temperature starts at 1/0.07, as in CLIP
    max_logit_scale: float = math.log(100)  # clamp so the temperature cannot run away
    loss: str = "clip"  # "clip" (symmetric InfoNCE) or "soft_target" (the published Simple-CLIP loss)
    freeze: str = "none"  # "image" locks the image tower (LiT: e.g. resnet50_clip.openai), "text", or "none"
    # -- optimisation --
    batch_size: int = 32  # pairs per step, over all processes; also the number of in-batch negatives + 1
    gradient_accumulation_steps: int = 1  # update every k batches; each batch keeps its own negatives
    hard_negatives: int = 0  # >1: build batches from groups of this many look-alike images (see similar_batches)
    epochs: int = 10  # passes over every caption of the training table
    head_lr: float = 1e-3  # projection heads and temperature
    image_encoder_lr: float = 1e-4  # image tower
    text_encoder_lr: float = 1e-5  # text tower (pretrained BERTs forget quickly)
    weight_decay: float = 1e-3  # AdamW weight decay on the heads
    patience: int = 1  # ReduceLROnPlateau: epochs without val improvement before a cut
    factor: float = 0.8  # ReduceLROnPlateau: multiply the learning rates by this
    max_minutes: float | None = None  # stop training after this many minutes (None: no limit)
    precision: str = "auto"  # "auto": bf16 where the GPU/CPU has it, else fp16 + scaler (GPU) or fp32 (CPU)
    seed: int = 42  # one seed for data order, augmentation and init
    device: str = "auto"  # "auto" picks CUDA when available, else CPU
    out_dir: str = "runs/clip-hindi"  # best checkpoint and history.csv go here

    @classmethod
    def full(cls, **overrides) -> "Config":
        """Published recipe: resnet50 + hindi-bert-v2, pretrained, on a GPU."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides) -> "Config":
        """CPU recipe: small random-init encoders that learn the synthetic set in minutes."""
        base = dict(
            mode="quick",
            image_size=64,  # synthetic scenes are 96 px; 64 px keeps shapes legible and doubles speed
            max_length=48,  # synthetic captions are at most ~40 tokens
            num_workers=0,  # tiny images decode faster than worker processes start
            image_model="resnet18",
            image_pretrained=False,
            image_model_kwargs=dict(channels=(32, 64, 128, 256), stem_width=32),  # a quarter-width ResNet-18
            image_pool="flatten",  # captions say left/right/top: keep the final 2x2 grid
            text_pretrained=False,
            text_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=512, max_position_embeddings=64),
            vocab_size=1000,
            pooling="mean",  # a from-scratch BERT learns word meanings long before a useful CLS token
            dropout=0.1,  # the published head dropout also narrows the train/val gap here
            batch_size=32,  # more steps beat more negatives on a tight CPU budget
            epochs=12,
            patience=0,  # on a 12-epoch budget, cut the rates at the first epoch without progress...
            factor=0.5,  # ...and halve them: +0.04 mean R@1 on unseen pairs (other_generator.py, 3 seeds)
            head_lr=1e-3,
            image_encoder_lr=1e-3,  # random init: the image tower learns as fast as the heads
            text_encoder_lr=3e-4,  # post-LayerNorm BERT from scratch diverges at higher rates
            max_minutes=4.0,  # a safety net for slow machines; the bars are met well inside it
            out_dir="runs/quick",
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_env(cls, **overrides) -> "Config":
        """Pick quick or full from CLIP_HINDI_MODE; without it, full on CUDA and quick otherwise."""
        mode = os.environ.get("CLIP_HINDI_MODE", "").strip().lower()
        if mode not in ("", "quick", "full"):
            raise ValueError(f"CLIP_HINDI_MODE must be 'quick' or 'full', got {mode!r}")
        if not mode:
            mode = "full" if torch.cuda.is_available() else "quick"
        return cls.full(**overrides) if mode == "full" else cls.quick(**overrides)


def _device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
