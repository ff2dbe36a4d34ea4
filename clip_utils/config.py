"""The one Config dataclass (every knob, quick and full recipes), device choice and seeding."""
from __future__ import annotations

import json
import math
import numbers
import os
import random
import re
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
    # How training and evaluation see a photo, one choice for both. "square": stretch the whole photo to
    # image_size x image_size (the published recipe, and its checkpoint was trained so). "crop": keep the aspect
    # ratio, shorter side to image_size / the tower's crop_pct, then a random square crop to train and the centre
    # one to evaluate (open_clip's way). Square by default: the published recipe is the full-mode default.
    image_geometry: str = "square"
    max_length: int = 64  # longest caption in tokens; each batch pads only to its own longest
    translator: str = "facebook/nllb-200-distilled-600M"  # English->Hindi model when no Hindi caption file is given
    on_bad_input: str = "skip"  # "skip": drop bad rows/images with a counted warning; "raise": stop
    num_workers: int = 2  # DataLoader worker processes on a GPU; on a CPU the model's threads use every core
    image_cache: str = ""  # a folder: decode each training image once at image_size (see cache_images); "": every epoch
    # -- model --
    image_model: str = "resnet50"  # a timm name, or a transformers CLIP name/folder (has a "/"): its vision tower
    image_pretrained: bool = True  # load timm's ImageNet weights
    image_model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    image_pool: str = "avg"  # timm global pool; "flatten" keeps the small final grid, i.e. *where* things are;
    # "model": the model's own head as timm builds it (LiT's CLIP towers: attention pool, class token)
    text_model: str = "l3cube-pune/hindi-bert-v2"  # Hugging Face name or local folder
    text_pretrained: bool = True  # False: random-init BERT from text_config + WordPiece trained on captions
    text_config: dict = field(default_factory=dict)  # BertConfig arguments when text_pretrained is False
    vocab_size: int = 2000  # WordPiece vocabulary size when the tokenizer is trained on captions
    pooling: str = "cls"  # "cls" token, "mean" over non-padding tokens, or "pooler" (the model's own: CLIP's end token)
    projection_dim: int = 256  # shared embedding size of both towers
    dropout: float = 0.1  # dropout inside the projection heads
    residual_heads: bool = True  # Simple-CLIP heads: x + projected before the LayerNorm (the published ones too)
    heads: str = "mlp"  # "mlp": ProjectionHead per tower; "linear": bias-free linear maps, as OpenAI CLIP's own
    init_logit_scale: float = math.log(1 / 0.07)  # learnable temperature starts at 1/0.07, as in CLIP
    max_logit_scale: float = math.log(100)  # clamp so the temperature cannot run away
    loss: str = "clip"  # "clip" (symmetric InfoNCE) or "soft_target" (the published Simple-CLIP loss)
    freeze: str = "none"  # "image" locks the image tower (LiT: e.g. resnet50_clip.openai), "text", or "none"
    # -- optimisation --
    batch_size: int = 32  # pairs per step, over all processes; also the number of in-batch negatives + 1
    # k > 1: one update scores k * batch_size rows against each other (open_clip's --accum-freq): a first pass
    # embeds all k batches without gradients, then each is embedded again with them. Memory of one batch
    # (plus k batches' embeddings), negatives of k, about 1.3x the compute of a plain step (forward twice)
    gradient_accumulation_steps: int = 1
    hard_negatives: int = 0  # >1: build batches from groups of this many look-alike images (see similar_batches)
    epochs: int = 10  # passes over every caption of the training table
    head_lr: float = 1e-3  # projection heads and temperature
    image_encoder_lr: float = 1e-4  # image tower
    text_encoder_lr: float = 1e-5  # text tower (pretrained BERTs forget quickly)
    # AdamW weight decay on the heads' matrices. The one change to the published recipe (which decays every head
    # parameter): no decay on biases, LayerNorm gains and the temperature, as open_clip, because decay pulls
    # them toward 0, i.e. a LayerNorm toward silence and the temperature toward 1, which no data asks for
    weight_decay: float = 1e-3
    patience: int = 1  # ReduceLROnPlateau: epochs without val improvement before a cut
    factor: float = 0.8  # ReduceLROnPlateau: multiply the learning rates by this
    max_minutes: float | None = None  # stop training after this many minutes (None: no limit); an epoch it cuts
    # short is not recorded, and fit(resume=True) repeats it
    select_best: str = "val_loss"  # what best/ keeps: lowest "val_loss", or highest "val_t2i_r1" (validation R@1)
    collective_timeout_minutes: float = 10.0  # several processes: a rank that waits this long for the others
    # during training fails the launch (the command line's data-preparation wait is apart: 60 minutes)
    precision: str = "auto"  # "auto": bf16 where the GPU/CPU has it, else fp16 + scaler (GPU) or fp32 (CPU)
    seed: int = 42  # one seed for data order, augmentation and init
    device: str = "auto"  # "auto" picks CUDA when available, else CPU
    out_dir: str = "runs/clip-hindi"  # best checkpoint and history.csv go here

    def __post_init__(self):
        # Runs on every construction, so dataclasses.replace checks too: a typo fails here, not as a silent default.
        for name in self.__dataclass_fields__:  # numpy numbers and paths work everywhere as plain Python values
            setattr(self, name, _plain(getattr(self, name)))
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid Config: " + "; ".join(problems))

    @classmethod
    def full(cls, **overrides) -> "Config":
        """Published recipe: resnet50 + hindi-bert-v2, pretrained, on a GPU."""
        _check_renamed(overrides)
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides) -> "Config":
        """CPU recipe: small random-init encoders that learn the synthetic set in minutes."""
        base = dict(
            mode="quick",
            image_size=64,  # synthetic scenes are 96 px; 64 px keeps shapes legible and doubles speed
            image_geometry="square",  # the scenes are square: nothing to crop, nothing stretched
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
        _check_renamed(overrides)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_env(cls, **overrides) -> "Config":
        """Pick quick or full from CLIP_HINDI_MODE; without it, full on CUDA and quick otherwise.

        CLIP_HINDI_EPOCHS, CLIP_HINDI_BATCH_SIZE, CLIP_HINDI_IMAGE_SIZE and CLIP_HINDI_MAX_MINUTES change a
        recipe without editing a notebook (the offline full-mode rehearsal runs one small epoch at 64 px);
        explicit overrides win.
        """
        mode = os.environ.get("CLIP_HINDI_MODE", "").strip().lower()
        if mode not in ("", "quick", "full"):
            raise ValueError(f"CLIP_HINDI_MODE must be 'quick' or 'full', got {mode!r}")
        if not mode:
            mode = "full" if _pick_device().type == "cuda" else "quick"
        from_env = {}
        for name, kind in (("epochs", int), ("batch_size", int), ("image_size", int), ("max_minutes", float)):
            value = os.environ.get(f"CLIP_HINDI_{name.upper()}", "").strip()
            if value:
                try:
                    from_env[name] = kind(value)
                except ValueError:
                    raise ValueError(f"CLIP_HINDI_{name.upper()} must be a number, got {value!r}") from None
        overrides = {**from_env, **overrides}
        return cls.full(**overrides) if mode == "full" else cls.quick(**overrides)


# Enumerated fields and their allowed values (the code branches on exactly these).
_CHOICES = {
    "mode": ("quick", "full"),
    "on_bad_input": ("skip", "raise"),
    "image_pool": ("avg", "max", "avgmax", "catavgmax", "token", "map", "flatten", "model"),  # timm's + ours
    "pooling": ("cls", "mean", "pooler"),
    "loss": ("clip", "soft_target"),
    "freeze": ("none", "image", "text"),
    "precision": ("auto", "bf16", "fp32"),
    "heads": ("mlp", "linear"),
    "image_geometry": ("square", "crop"),
    "select_best": ("val_loss", "val_t2i_r1"),
}
# Fields that were renamed: the old name gets an error that names the new one.
_RENAMED = {"eval_resize": "image_geometry (one geometry for training and evaluation: 'square' or 'crop')"}
_DEVICE = re.compile(r"auto|cpu|cuda")  # fit runs on Accelerate: one GPU per process, chosen by CUDA_VISIBLE_DEVICES


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Numeric and typed fields: (field, test, what is allowed).
_RANGES = [
    ("image_size", lambda v: _integer(v) and v >= 1, "an integer >= 1 (pixels)"),
    ("max_length", lambda v: _integer(v) and v >= 3, "an integer >= 3 (tokens: [CLS], a word, [SEP])"),
    ("num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("image_pretrained", lambda v: isinstance(v, bool), "True or False"),
    ("text_pretrained", lambda v: isinstance(v, bool), "True or False"),
    ("residual_heads", lambda v: isinstance(v, bool), "True or False"),
    ("translator", lambda v: isinstance(v, str) and v.strip() != "", "a Hugging Face model name or folder"),
    ("image_cache", lambda v: isinstance(v, str), "a folder path, or '' for no cache"),
    ("image_model", lambda v: isinstance(v, str) and v.strip() != "", "a timm model name"),
    ("text_model", lambda v: isinstance(v, str) and v.strip() != "", "a Hugging Face model name or folder"),
    ("image_model_kwargs", lambda v: isinstance(v, dict), "a dict of timm.create_model arguments"),
    ("text_config", lambda v: isinstance(v, dict), "a dict of BertConfig arguments"),
    ("vocab_size", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("projection_dim", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("dropout", lambda v: _number(v) and 0 <= v < 1, "a number with 0 <= dropout < 1"),
    ("max_logit_scale", lambda v: _number(v) and v > 0, "a number > 0 (log of the largest logit scale)"),
    ("batch_size", lambda v: _integer(v) and v >= 2,
     "an integer >= 2 (a contrastive loss needs at least one negative in each batch)"),
    ("gradient_accumulation_steps", lambda v: _integer(v) and v >= 1, "an integer >= 1 (batches per update)"),
    ("hard_negatives", lambda v: _integer(v) and (v == 0 or v >= 2), "0 (random batches) or a group size >= 2"),
    ("epochs", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("head_lr", lambda v: _number(v) and v > 0, "a learning rate > 0"),
    ("image_encoder_lr", lambda v: _number(v) and v > 0, "a learning rate > 0"),
    ("text_encoder_lr", lambda v: _number(v) and v > 0, "a learning rate > 0"),
    ("weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("patience", lambda v: _integer(v) and v >= 0, "an integer >= 0 (epochs)"),
    ("factor", lambda v: _number(v) and 0 < v < 1, "a number with 0 < factor < 1"),
    ("max_minutes", lambda v: v is None or (_number(v) and v > 0), "None (no limit) or a number > 0"),
    ("collective_timeout_minutes", lambda v: _number(v) and v > 0, "a number of minutes > 0"),
    ("seed", lambda v: _integer(v) and 0 <= v < 2**32, "an integer with 0 <= seed < 2**32 (numpy's range)"),
]


def _plain(value):
    """numpy scalars and arrays as Python numbers and tuples, paths as strings, inside dicts and lists too:
    what checkpoints can write to config.json (a numpy integer would fail only after a whole epoch)."""
    if isinstance(value, np.ndarray):
        return tuple(_plain(v) for v in value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


# Keys of the dict fields that our code sets itself, and the Config field to use instead.
_OWN_KEYS = {"text_config": {"vocab_size": "vocab_size", "pad_token_id": "(the tokenizer's)"},
             "image_model_kwargs": {"pretrained": "image_pretrained", "num_classes": "(0: features)",
                                    "global_pool": "image_pool"}}


def _dict_problems(cfg: Config) -> list[str]:
    """Unknown BertConfig keys in text_config and keys our code sets itself, named as unknown fields are."""
    problems = []
    for name, own in _OWN_KEYS.items():
        value = getattr(cfg, name)
        clash = [key for key in value if key in own] if isinstance(value, dict) else []
        problems += [f"{name}[{key!r}]: set by clip_utils; use {own[key]}" for key in clash]
    if isinstance(cfg.text_config, dict) and cfg.text_config:
        import inspect

        from transformers import BertConfig

        known = set(inspect.signature(BertConfig.__init__).parameters) | set(BertConfig().to_dict())
        unknown = sorted(str(k) for k in cfg.text_config if k not in known)
        if unknown:
            problems.append(f"text_config has unknown BertConfig keys {unknown}: use "
                            f"{', '.join(sorted(k for k in known - {'self'} if not k.startswith('_'))[:40])}")
    for name in cfg.__dataclass_fields__:
        try:
            json.dumps(getattr(cfg, name))
        except (TypeError, ValueError):
            problems.append(f"{name}={getattr(cfg, name)!r}: use numbers, strings, lists and dicts "
                            "(checkpoints write the Config to config.json)")
    return problems


def _config_problems(cfg: Config) -> list[str]:
    """One message per bad field, naming it, its value and what is allowed."""
    problems = [f"{name}={getattr(cfg, name)!r}: use " + " or ".join(map(repr, allowed))
                for name, allowed in _CHOICES.items() if getattr(cfg, name) not in allowed]
    if not (isinstance(cfg.device, str) and _DEVICE.fullmatch(cfg.device)):
        problems.append(f"device={cfg.device!r}: use 'auto', 'cpu' or 'cuda' (to pick a GPU, set CUDA_VISIBLE_DEVICES)")
    problems += [f"{name}={getattr(cfg, name)!r}: use {allowed}" for name, test, allowed in _RANGES
                 if not test(getattr(cfg, name))]
    if not (_number(cfg.init_logit_scale) and 0 <= cfg.init_logit_scale <= (
            cfg.max_logit_scale if _number(cfg.max_logit_scale) else math.inf)):
        problems.append(f"init_logit_scale={cfg.init_logit_scale!r}: use a number from 0 to max_logit_scale="
                        f"{cfg.max_logit_scale!r} (training clamps it to that range)")
    positions = cfg.text_config.get("max_position_embeddings", 512) if isinstance(cfg.text_config, dict) else 512
    if not cfg.text_pretrained and _integer(cfg.max_length) and _integer(positions) and cfg.max_length > positions:
        problems.append(f"max_length={cfg.max_length!r}: use at most text_config['max_position_embeddings']="
                        f"{positions} (a longer caption has no position embedding)")
    return problems + _dict_problems(cfg)


def _check_renamed(overrides: dict) -> None:
    old = sorted(set(overrides) & set(_RENAMED))
    if old:
        raise ValueError(f"Config has no field {old[0]!r} any more: use {_RENAMED[old[0]]}")


def _pick_device(choice: str = "auto") -> torch.device:
    """The one device decision: "auto" is CUDA when a GPU is visible, else the CPU; "cuda" without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={choice!r}, but no GPU is visible (torch.cuda.is_available() is False): "
                         "use device='auto' or 'cpu'")
    return device


def _device(cfg: Config) -> torch.device:
    """The device cfg.device picks (see _pick_device); fit's Accelerator, the loaders and loading all ask here."""
    return _pick_device(cfg.device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
