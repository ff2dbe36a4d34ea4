"""clip_utils: a Hindi CLIP model, from data to zero-shot, in one readable module.

Read it top to bottom: config, Hindi text, data, model, losses, training,
evaluation and retrieval, plots, checkpoints. The notebooks in `notebooks/`
import everything from here; nothing is copied into them.

Two modes share every function below; only the `Config` differs:
  quick: CPU, no network, synthetic Hindi scenes, small random-init encoders.
  full:  GPU, real photos, pretrained timm and Hugging Face encoders.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Config",
    "normalize_caption", "train_wordpiece_tokenizer", "keeps_devanagari",
    "make_synthetic_dataset", "synthetic_classes", "split_by_image", "prepare_quick_data",
    "FLICKR8K_URLS", "XM3600_URLS", "PUBLISHED_XM3600_HINDI", "download", "extract_archive",
    "read_captions", "load_flickr8k", "download_flickr8k", "prepare_full_data", "prepare_data", "load_xm3600",
    "download_xm3600",
    "clean_table",
    "load_image", "image_transforms", "make_loader",
    "ImageEncoder", "TextEncoder", "ProjectionHead", "CLIPModel", "build_model",
    "clip_loss", "soft_target_loss",
    "make_optimizer", "train_step", "similar_batches", "fit",
    "encode_images", "encode_texts", "recall_at_k", "retrieval_metrics",
    "embed_gallery", "top_k_scores", "search_images", "zero_shot_classify", "HINDI_TEMPLATES",
    "use_devanagari_font", "plot_history", "show_retrieval", "show_zero_shot",
    "save_checkpoint", "load_checkpoint", "load_published_checkpoint",
]


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

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
    batch_size: int = 32  # pairs per step; also the number of in-batch negatives + 1
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


# ----------------------------------------------------------------------------
# Hindi text
# ----------------------------------------------------------------------------

# Invisible characters that creep in from the web and machine translation. Deleting
# them (not replacing them with a space) keeps the word around them in one piece.
# ZWJ/ZWNJ only choose between conjunct glyph forms, so the word's meaning stays.
_INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u202a-\u202e]")
_DANDA_SPACE = re.compile(r"\s+([।॥])")  # "है ।" -> "है।"


def normalize_caption(text) -> str:
    """NFC-normalise a caption, drop invisible characters, tidy dandas and whitespace ("" for NaN)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = unicodedata.normalize("NFC", str(text))  # precomposed and decomposed nukta become one spelling
    text = _INVISIBLE.sub("", text)
    text = text.replace("।।", "॥").replace("|", "।")  # ASCII pipe is a common stand-in for the danda
    text = " ".join(text.split())
    return _DANDA_SPACE.sub(r"\1", text)


# A word's final vowel signs and nasal marks: Hindi inflects by them (काला/काली/काले, बूँद/बूँदें).
_ENDING = re.compile("[\u0900-\u0903\u093a\u093b\u093e-\u094c\u094e\u094f\u0955-\u0957\u0962\u0963]+$")


def _stem_and_ending(word: str) -> tuple[str, str]:
    """Split a word's inflectional ending off its stem: "काली" -> ("काल", "ी"); short words stay whole."""
    match = _ENDING.search(word)
    if match is None or match.start() < 2:  # का, की, है, में: too short to have a stem worth sharing
        return word, ""
    return word[:match.start()], word[match.start():]


def train_wordpiece_tokenizer(captions, vocab_size: int = 1000):
    """Build a WordPiece tokenizer from captions: frequent stems and endings, every character as fallback.

    Hindi adjectives, nouns and verbs inflect by their final vowel sign (काला गोला, काली पतंग,
    काले गोले). The vocabulary holds the stem (काल) and the ending (##ी) as separate pieces, so a
    form that never occurs in training (काली, if every black shape in training was masculine)
    still shares the stem's embedding instead of falling apart into meaningless characters.

    Built by counting, not with the `tokenizers` trainer: that trainer breaks frequency ties in
    hash order, so its vocabulary (and every token id) changed from run to run. Words outside the
    vocabulary split into characters ("##" marks a piece inside a word), so nothing becomes [UNK]
    unless its characters never occur in the captions.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    splitter = pre_tokenizers.BertPreTokenizer()  # Unicode-aware: danda and commas are punctuation
    words = Counter(word for caption in captions
                    for word, _ in splitter.pre_tokenize_str(normalize_caption(caption)))
    counts = Counter()
    for word, n in words.items():
        stem, ending = _stem_and_ending(word)
        counts[stem] += n
        if ending:
            counts["##" + ending] += n
    chars = sorted({ch for word in words for ch in word})
    pieces = [p for p, _ in sorted(counts.items(), key=lambda pc: (-pc[1], pc[0])) if len(p.removeprefix("##")) > 1]
    room = max(0, vocab_size - len(specials) - 2 * len(chars))
    vocab = specials + chars + ["##" + ch for ch in chars] + pieces[:room]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    # NFC only: BERT's default normaliser lowercases and strips accents, which deletes matras.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def keeps_devanagari(tokenizer, text: str = "नमस्ते क्षत्रिय किताबें") -> bool:
    """True if the tokenizer's normaliser and pieces keep every matra and virama of `text`."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    if normalizer is not None and unicodedata.normalize("NFC", normalizer.normalize_str(text)) != text:
        return False  # e.g. BERT's lowercase/strip_accents turns नमस्ते into नमसत
    pieces = tokenizer.tokenize(text)
    joined = "".join(p.removeprefix("##").lstrip("▁Ġ") for p in pieces)
    return joined == text.replace(" ", "") and tokenizer.unk_token not in pieces


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
# A table is a pandas DataFrame with columns `image` (absolute, or relative to
# cfg.image_dir) and `caption`, one row per caption, several rows per image allowed.

# Synthetic scenes: (name, gender, plural) for shapes; colours with their RGB.
_SHAPES = {  # primary name -> synonyms, each (word, gender, plural)
    "गोला": [("गोला", "m", "गोले"), ("वृत्त", "m", "वृत्त")],
    "वर्ग": [("वर्ग", "m", "वर्ग")],
    "त्रिभुज": [("त्रिभुज", "m", "त्रिभुज")],
    "तारा": [("तारा", "m", "तारे"), ("सितारा", "m", "सितारे")],
    "पतंग": [("पतंग", "f", "पतंगें")],
    "अंगूठी": [("अंगूठी", "f", "अंगूठियाँ"), ("छल्ला", "m", "छल्ले")],
}
_COLOURS = {  # masculine singular form -> RGB
    "लाल": (215, 30, 30), "नीला": (30, 70, 220), "हरा": (30, 150, 50), "पीला": (235, 200, 20),
    "काला": (25, 25, 25), "नारंगी": (245, 125, 0), "बैंगनी": (130, 40, 180), "गुलाबी": (245, 120, 190),
}
_SIZES = {"बड़ा": 0.15, "छोटा": 0.085}  # radius as a fraction of the image side
_POSITIONS = {  # single-object positions: (x, y) and ways to say it
    "बीच": ((0.5, 0.5), ["बीच में"]), "बाएँ": ((0.24, 0.5), ["बाईं ओर", "बाईं तरफ़"]),
    "दाएँ": ((0.76, 0.5), ["दाईं ओर", "दाईं तरफ़"]), "ऊपर": ((0.5, 0.24), ["ऊपर", "ऊपर की ओर"]),
    "नीचे": ((0.5, 0.76), ["नीचे", "नीचे की ओर"]),
}
_SLOTS = {2: ["बाएँ", "दाएँ"], 3: ["बाएँ", "बीच", "दाएँ"]}
_SLOT_X = {2: [0.27, 0.73], 3: [0.18, 0.5, 0.82]}
# (colour, shape) pairs never drawn in training scenes: test images use them.
HELD_OUT_PAIRS = [("लाल", "त्रिभुज"), ("नीला", "तारा"), ("हरा", "अंगूठी"),
                  ("पीला", "वर्ग"), ("बैंगनी", "गोला"), ("नारंगी", "पतंग")]


def _inflect(adjective: str, gender: str, plural: bool) -> str:
    """Hindi adjectives ending in -ā agree: नीला गोला, नीली पतंग, नीले गोले."""
    if not adjective.endswith("ा"):
        return adjective  # लाल, नारंगी, ... never change
    if gender == "f":
        return adjective[:-1] + "ी"
    return adjective[:-1] + ("े" if plural else "ा")


def _noun_phrase(obj: dict, rng: random.Random, count: int = 1) -> tuple[str, str]:
    """'एक बड़ी नीली पतंग' or 'दो छोटे लाल गोले'; returns (phrase, gender)."""
    word, gender, plural_word = rng.choice(_SHAPES[obj["shape"]])
    plural = count > 1
    size = _inflect(obj["size"], gender, plural)
    colour = _inflect(obj["colour"], gender, plural)
    number = {1: "एक", 2: "दो", 3: "तीन"}[count]
    return f"{number} {size} {colour} {plural_word if plural else word}", gender


def _captions_for(objects: list[dict], same: bool, rng: random.Random, n: int) -> list[str]:
    """Several differently worded, fully descriptive captions of one scene."""
    captions = set()
    for _ in range(20 * n):
        if len(captions) == n:
            break
        if same:  # one group of identical objects: plural agreement, no positions needed
            phrase, gender = _noun_phrase(objects[0], rng, count=len(objects))
            parts, verb_rest = [phrase], ("रही हैं" if gender == "f" else "रहे हैं")
            be = "हैं"
        else:
            parts, genders = [], []
            for obj in objects:
                phrase, gender = _noun_phrase(obj, rng)
                parts.append((rng.choice(_POSITIONS[obj["pos"]][1]), phrase))
                genders.append(gender)
            if len(objects) == 1:
                be, verb_rest = "है", ("रही है" if genders[0] == "f" else "रहा है")
            else:
                be, verb_rest = "हैं", "रहे हैं"
        style = rng.randrange(4)
        if same:
            desc = parts[0]
        elif style == 3:  # clause per object: "एक नीला गोला बाईं ओर है और ..."
            clauses = [f"{np_} {pos} है" for pos, np_ in parts]
            captions.add(" और ".join([", ".join(clauses[:-1])] + clauses[-1:] if len(clauses) > 1
                                     else clauses) + "।")
            continue
        else:
            items = [f"{pos} {np_}" for pos, np_ in parts]
            desc = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " और " + items[-1]
        if style == 0:
            captions.add(f"{desc}।")
        elif style == 1:
            captions.add(f"{rng.choice(['चित्र में', 'इस तस्वीर में'])} {desc} {be}।")
        else:
            captions.add(f"{desc} दिखाई दे {verb_rest}।")
    return sorted(captions)


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill, rng: random.Random) -> None:
    angle = rng.uniform(-0.25, 0.25)  # slight rotation so no two drawings are identical

    def polygon(points):
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=fill)

    if shape == "गोला":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "अंगूठी":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "वर्ग":
        polygon([(-r * 0.85, -r * 0.85), (r * 0.85, -r * 0.85), (r * 0.85, r * 0.85), (-r * 0.85, r * 0.85)])
    elif shape == "त्रिभुज":
        polygon([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)])
    elif shape == "पतंग":
        polygon([(0, -r * 1.1), (r * 0.7, 0), (0, r * 1.1), (-r * 0.7, 0)])
    elif shape == "तारा":
        polygon([((r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                  -(r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)])


def _class_name(colour: str, shape: str) -> str:
    return f"{_inflect(colour, _SHAPES[shape][0][1], False)} {shape}"


def synthetic_classes(kind: str = "colour_shape") -> dict[str, list[str]]:
    """Zero-shot classes of the synthetic scenes ("colour_shape", "shape" or "colour") with prompts.

    Prompts name both sizes with the right gender ("एक बड़ी नीली पतंग", "एक छोटी नीली पतंग"),
    as the training captions do; labels match the table's `label`, `shape` and `colour` columns.
    """
    classes = {}
    for colour in _COLOURS:
        for shape, synonyms in _SHAPES.items():
            gender = synonyms[0][1]
            label = {"colour_shape": _class_name(colour, shape), "shape": shape, "colour": colour}[kind]
            prompts = [f"एक {_inflect(size, gender, False)} " +
                       (f"{_inflect(colour, gender, False)} " if kind != "shape" else "") +
                       (shape if kind != "colour" else "") for size in _SIZES]
            classes.setdefault(label, []).extend(p.strip() for p in prompts)
    return {label: sorted(set(prompts)) for label, prompts in classes.items()}


def _random_object(rng: random.Random) -> dict:
    return dict(shape=rng.choice(list(_SHAPES)), colour=rng.choice(list(_COLOURS)), size=rng.choice(list(_SIZES)))


def make_synthetic_dataset(out_dir, n_images: int = 1200, seed: int = 0, image_px: int = 96,
                           captions_per_image: int = 3) -> pd.DataFrame:
    """Draw procedural scenes with grammatical Hindi captions; returns a table with a `held_out` column.

    Args:
        out_dir: folder for the PNG files (created).
        n_images: number of distinct scenes (no two share a description).
        seed: the same seed gives the same images and captions.
        image_px: side of each square image.
        captions_per_image: differently worded captions per image.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    held = set(HELD_OUT_PAIRS)
    seen, rows = set(), []
    while len(seen) < n_images:
        n_obj = rng.choice([1, 1, 2, 2, 3])
        same = n_obj > 1 and rng.random() < 0.25
        first = _random_object(rng)
        objects = [dict(first) if same else _random_object(rng) for _ in range(n_obj)]
        if n_obj == 1:
            objects[0]["pos"] = rng.choice(list(_POSITIONS))
        else:
            for obj, slot in zip(objects, _SLOTS[n_obj]):
                obj["pos"] = slot
        key = tuple((o["shape"], o["colour"], o["size"], o["pos"]) for o in objects)
        if key in seen:
            continue
        seen.add(key)
        index = len(seen) - 1
        background = tuple(rng.randint(225, 255) for _ in range(3))
        image = Image.new("RGB", (image_px, image_px), background)
        draw = ImageDraw.Draw(image)
        for k, obj in enumerate(objects):
            if n_obj == 1:
                (x, y) = _POSITIONS[obj["pos"]][0]
            else:
                x, y = _SLOT_X[n_obj][k], 0.5 + rng.uniform(-0.12, 0.12)
            x, y = x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03)
            fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in _COLOURS[obj["colour"]])
            radius = _SIZES[obj["size"]] * image_px * rng.uniform(0.9, 1.1)
            _draw_shape(draw, obj["shape"], x * image_px, y * image_px, radius, fill, rng)
        path = out_dir / f"scene_{index:05d}.png"
        image.save(path)
        is_held_out = any((o["colour"], o["shape"]) in held for o in objects)
        single = objects[0] if n_obj == 1 else dict(shape="", colour="")
        for caption in _captions_for(objects, same, rng, captions_per_image):
            rows.append(dict(image=str(path.resolve()), caption=caption, n_objects=n_obj, held_out=is_held_out,
                             shape=single["shape"], colour=single["colour"],
                             label=_class_name(single["colour"], single["shape"]) if n_obj == 1 else ""))
    return pd.DataFrame(rows)


def split_by_image(df: pd.DataFrame, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
                   force_test=None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split a table into train/val/test so that no image appears in two splits.

    Args:
        df: table with an `image` column.
        val_frac, test_frac: fractions of the images (not rows) for validation and test.
        seed: shuffling seed.
        force_test: optional boolean row mask; images of those rows go to test (e.g. unseen combinations).
    """
    forced = set(df.loc[force_test, "image"]) if force_test is not None else set()
    images = [im for im in pd.unique(df["image"]) if im not in forced]
    np.random.default_rng(seed).shuffle(images)
    n_val, n_test = round(len(images) * val_frac), round(len(images) * test_frac)
    val = set(images[:n_val])
    test = set(images[n_val:n_val + n_test]) | forced
    parts = (~df["image"].isin(val | test), df["image"].isin(val), df["image"].isin(test))
    return tuple(df[mask].reset_index(drop=True) for mask in parts)


def prepare_quick_data(data_dir, n_images: int = 1200, seed: int = 0):
    """Make (or reload) the quick-mode synthetic set and its train/val/test tables.

    Test holds every scene with a held-out colour-shape pair, so test captions are
    combinations the model never saw in training.
    """
    def make():
        df = make_synthetic_dataset(Path(data_dir) / "images", n_images=n_images, seed=seed)
        return split_by_image(df, val_frac=0.1, test_frac=0.0, seed=seed, force_test=df["held_out"])

    return _cached_splits(data_dir, make)


def _cached_splits(data_dir, make):
    """(train, val, test) from data_dir/{train,val,test}.csv, or from make() once, then written there."""
    paths = [Path(data_dir) / f"{name}.csv" for name in ("train", "val", "test")]
    if all(p.exists() for p in paths):
        return tuple(pd.read_csv(p) for p in paths)
    splits = make()
    for part, path in zip(splits, paths):
        part.to_csv(path, index=False)
    return splits


# -- Real data: download, unpack, parse ---------------------------------------
# Full mode trains on Flickr8k photos with (machine-translated) Hindi captions and
# evaluates on XM3600's human-written Hindi captions. Downloads resume and verify;
# archives are unpacked so that no member can escape its folder.

FLICKR8K_URLS = {
    "images": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
    "text": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
}
XM3600_URLS = {
    "captions": "https://google.github.io/crossmodal-3600/web-data/captions.zip",
    "images": "https://open-images-dataset.s3.amazonaws.com/crossmodal-3600/images.tgz",
}
# Text-to-image R@1/5/10 on XM3600 Hindi (CLIP_benchmark protocol), open_clip's multilingual table.
PUBLISHED_XM3600_HINDI = {
    "xlm-roberta-base-ViT-B-32": (16.8, 34.9, 44.5),
    "mSigLIP ViT-B-16": (17.3, 34.8, 43.5),
    "nllb-clip-large-siglip": (42.0, 67.2, 76.9),
}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest, size: int | None = None, sha256: str | None = None) -> Path:
    """Fetch `url` to `dest` with a progress bar, resuming a partial download; skip a finished one.

    Args:
        url: http(s) address (file:// works too).
        dest: the file to write; "<dest>.part" holds an unfinished download.
        size, sha256: expected size in bytes and checksum, verified when given.
    """
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.exists() and (size is None or dest.stat().st_size == size):
        if sha256 and _sha256(dest) != sha256:
            raise IOError(f"{dest} exists but its sha256 is not {sha256}: delete it and download again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        error.close()
        # 416 "range not satisfiable": complete only if the server's size ("bytes */N") is what we have
        if error.code != 416 or error.headers.get("Content-Range", "").rpartition("/")[2] != str(done):
            part.unlink(missing_ok=True)  # a stale part file bigger than the file: start over next time
            raise
        response = None
    if response is not None:
        with response:
            if getattr(response, "status", None) != 206:  # the server sent the whole file: start over
                done = 0
            remaining = int(response.headers.get("Content-Length") or 0)
            with open(part, "ab" if done else "wb") as f, tqdm(
                    total=done + remaining or None, initial=done, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        if remaining and part.stat().st_size != done + remaining:  # the connection dropped early
            raise IOError(f"download of {url} stopped at {part.stat().st_size} of {done + remaining} bytes; "
                          "run again to resume")
    got = part.stat().st_size
    if size is not None and got != size:
        raise IOError(f"download of {url} has {got} bytes, expected {size}; run again to resume")
    if sha256 and _sha256(part) != sha256:
        part.unlink()
        raise IOError(f"download of {url} does not match sha256 {sha256}; deleted, run again")
    os.replace(part, dest)
    return dest


def extract_archive(archive, dest) -> Path:
    """Unpack a .zip or .tar(.gz) into `dest`, refusing any member that would land outside it."""
    import tarfile
    import zipfile

    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not (dest / name).resolve().is_relative_to(dest):
                    raise ValueError(f"unsafe archive {archive}: member {name!r} would escape {dest}")
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            # "data" refuses absolute paths, "..", links out of dest and device files
            tf.extractall(dest, filter="data")
    return dest


def _fetch(url: str, folder) -> Path:
    """Download and unpack once; a marker file records that unpacking finished."""
    folder = Path(folder)
    marker = folder / f".{Path(url).name}.done"
    if not marker.exists():
        extract_archive(download(url, folder / "downloads" / Path(url).name), folder)
        marker.touch()
    return folder


def _image_name(name: str) -> str:
    """"1000_ab.jpg#2" or "1000_ab" -> "1000_ab.jpg"; other names pass through."""
    name = name.strip().split("#")[0]
    return name if "." in name else name + ".jpg"


def read_captions(source) -> pd.DataFrame:
    """Read a caption file (path or URL) into a table (image file name, caption), detecting its format.

    Formats, told apart by the first line:
      token: "1000268201_693b08cb0e.jpg#0<TAB>caption" (the official Flickr8k.token.txt);
      csv:   a header "image,caption"; a caption may hold commas (quoted or not);
      text:  "image_id caption", split at the first space.
    Names without an extension get ".jpg"; "#n" caption numbers are dropped.
    """
    import csv
    import io

    source = str(source)
    if source.startswith(("http://", "https://")):
        tag = hashlib.sha1(source.encode()).hexdigest()[:8]  # two URLs may end in the same file name
        source = download(source, Path.home() / ".cache" / "clip-hindi" / f"{tag}-{Path(source).name}")
    text = Path(source).read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{source}: no captions")
    first = lines[0]
    if "\t" in first and "#" in first.split("\t")[0]:
        pairs = [line.split("\t", 1) for line in lines]
    elif {"image", "caption"} <= {c.strip().lower() for c in next(csv.reader([first]))}:
        header, *rows = [row for row in csv.reader(io.StringIO(text)) if row]
        header = [c.strip().lower() for c in header]
        if header == ["image", "caption"]:  # unquoted commas split a caption into fields: join them back
            pairs = [(row[0], ",".join(row[1:])) for row in rows]
        else:  # more columns: take the two by name
            i, j = header.index("image"), header.index("caption")
            pairs = [(row[i], row[j]) if len(row) == len(header) else () for row in rows]
    else:
        pairs = [line.split(None, 1) for line in lines]
    bad = [i + 1 for i, pair in enumerate(pairs) if len(pair) != 2]
    if bad:
        raise ValueError(f"{source}: cannot split line(s) {bad[:5]} into image and caption")
    return pd.DataFrame(dict(image=[_image_name(im) for im, _ in pairs],
                             caption=[normalize_caption(c) for _, c in pairs]))


def load_flickr8k(root, captions) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Map a caption file onto the official Flickr8k train/dev/test lists: (train, val, test) tables.

    Prints how many images of each split have 0, 1, ... captions; captions of images that are
    in no split list (such as the broken key "2258277193_586949ec62.jpg.1") or missing on disk
    are dropped and counted.

    Args:
        root: folder holding Flicker8k_Dataset/ (sic) and Flickr_8k.{train,dev,test}Images.txt.
        captions: a caption file or URL in any format read_captions knows, or a table.
    """
    root = Path(root)
    image_dirs = [p for name in ("Flicker8k_Dataset", "Flickr8k_Dataset") for p in root.rglob(name)
                  if p.is_dir() and "__MACOSX" not in p.parts]  # macOS zips carry a shadow copy
    if not image_dirs:
        raise FileNotFoundError(f"no Flicker8k_Dataset/ folder under {root}: run download_flickr8k first")
    image_dir = max(image_dirs, key=lambda p: sum(1 for _ in p.glob("*.jpg")))
    table = captions if isinstance(captions, pd.DataFrame) else read_captions(captions)
    on_disk = {p.name for p in image_dir.iterdir()}
    splits, used = [], set()
    for split in ("train", "dev", "test"):
        lists = list(root.rglob(f"Flickr_8k.{split}Images.txt"))
        if not lists:
            raise FileNotFoundError(f"Flickr_8k.{split}Images.txt not found under {root}")
        names = [n.strip() for n in lists[0].read_text().splitlines() if n.strip()]
        used |= set(names)
        part = table[table["image"].isin(names) & table["image"].isin(on_disk)]
        counts = part["image"].value_counts().reindex(names, fill_value=0).value_counts().sort_index()
        print(f"{split}: {len(names)} images; images by number of captions: "
              + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        splits.append(part.assign(image=[str(image_dir / n) for n in part["image"]]).reset_index(drop=True))
    no_split = ~table["image"].isin(used)
    missing = table["image"].isin(used) & ~table["image"].isin(on_disk)
    if no_split.any() or missing.any():
        warnings.warn(f"dropped {no_split.sum()} captions of images in no split list "
                      f"(e.g. {table.loc[no_split, 'image'].head(2).tolist()}) and {missing.sum()} "
                      f"captions of images missing in {image_dir}", stacklevel=2)
    return tuple(splits)


def download_flickr8k(data_dir) -> Path:
    """Download and unpack the Flickr8k photos and split lists (about 1 GB) into data_dir."""
    for url in FLICKR8K_URLS.values():
        _fetch(url, data_dir)
    return Path(data_dir)


def prepare_full_data(data_dir, captions):
    """Flickr8k with Hindi captions as (train, val, test) tables, downloaded and cached as CSVs.

    Args:
        data_dir: where photos, lists and the CSVs go.
        captions: the Hindi caption file or URL (public copies are machine-translated; see README).
    """
    def make():
        if not captions:  # checked before the 1 GB download, not after it
            raise RuntimeError("Full mode needs Flickr8k Hindi captions: set CLIP_HINDI_CAPTIONS to a local file or "
                               "URL (CSV image,caption; Flickr8k.token.txt layout; or 'image_id caption' lines). "
                               "See the README.")
        return load_flickr8k(download_flickr8k(data_dir), captions)

    return _cached_splits(data_dir, make)


def prepare_data(cfg: Config, data_dir, captions=None):
    """(train, val, test) for cfg.mode: the synthetic set in quick mode, Flickr8k + Hindi captions in full mode.

    Full mode takes the caption file from `captions`, else from the CLIP_HINDI_CAPTIONS environment variable.
    """
    if cfg.mode != "full":
        return prepare_quick_data(data_dir)
    return prepare_full_data(data_dir, captions or os.environ.get("CLIP_HINDI_CAPTIONS", ""))


def load_xm3600(captions_jsonl, image_dir, language: str = "hi", all_captions: bool = False) -> pd.DataFrame:
    """XM3600 captions in one language as a table; by default only each image's first caption.

    The first caption per image (3,600 pairs) is the CLIP_benchmark protocol behind the
    published multilingual numbers; all_captions=True keeps every caption instead.

    Args:
        captions_jsonl: captions.jsonl, one JSON object per image ("image/key", language -> {"caption": [...]}).
        image_dir: folder of "<image/key>.jpg" files.
        language: the caption language code.
        all_captions: keep every caption instead of the first.
    """
    rows, no_caption = [], 0
    with open(captions_jsonl, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            captions = record.get(language, {}).get("caption", [])
            if not captions:
                no_caption += 1
                continue
            path = str(Path(image_dir) / f"{record['image/key']}.jpg")
            rows += [dict(image=path, caption=normalize_caption(c)) for c in captions[:None if all_captions else 1]]
    if no_caption:
        warnings.warn(f"{no_caption} XM3600 images have no {language!r} caption", stacklevel=2)
    return pd.DataFrame(rows, columns=["image", "caption"])


def download_xm3600(data_dir) -> tuple[Path, Path]:
    """Download and unpack XM3600 (captions and 3,600 images, about 800 MB); returns (captions.jsonl, image folder)."""
    data_dir = Path(data_dir)
    for url in XM3600_URLS.values():
        _fetch(url, data_dir)
    jsonl = next(data_dir.rglob("captions.jsonl"), None)
    image = next((p for p in data_dir.rglob("*.jpg") if "downloads" not in p.relative_to(data_dir).parts), None)
    if jsonl is None or image is None:
        raise FileNotFoundError(f"captions.jsonl or the .jpg images are missing under {data_dir} after unpacking")
    return jsonl, image.parent


def _resolve(path, cfg: Config) -> str:
    path = str(path)
    return path if os.path.isabs(path) or not cfg.image_dir else os.path.join(cfg.image_dir, path)


def load_image(path, max_side: int | None = None) -> np.ndarray:
    """Decode any image file to an RGB uint8 array (H, W, 3); huge images are shrunk while decoding."""
    from PIL import Image

    with Image.open(path) as image:
        if max_side:
            image.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2, 1/4, 1/8 scale: cheap
        image.load()
        if max_side and max(image.size) > 2 * max_side:
            image.thumbnail((2 * max_side, 2 * max_side))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")  # paste on white: transparent pixels would otherwise turn black
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        return np.asarray(image.convert("RGB"))


def clean_table(df: pd.DataFrame, cfg: Config, check_images: bool = True) -> pd.DataFrame:
    """Validate a caption table: required columns, usable captions, readable images.

    Bad rows raise a ValueError naming the row and file (cfg.on_bad_input="raise") or are
    dropped with one warning that counts them ("skip"). Captions come back normalised.

    Args:
        df: table with `image` and `caption` columns.
        cfg: supplies image_dir, image_size and on_bad_input.
        check_images: decode every distinct image once, so no bad file surfaces mid-epoch.
    """
    missing = {"image", "caption"} - set(df.columns)
    if missing:
        raise ValueError(f"table needs columns 'image' and 'caption'; missing {sorted(missing)} "
                         f"(has {list(df.columns)})")
    df = df.copy()
    df["caption"] = [normalize_caption(c) for c in df["caption"]]
    duplicated = df.duplicated(["image", "caption"]) & df["caption"].ne("")  # empty ones are counted below
    if duplicated.any():  # an exact repeat would count twice as much; dropping it loses nothing
        warnings.warn(f"dropped {duplicated.sum()} duplicate (image, caption) rows, e.g. row "
                      f"{duplicated.idxmax()}", stacklevel=2)
        df = df[~duplicated]
    row_names = list(df.index)  # messages name rows by the caller's index, not by position
    df = df.reset_index(drop=True)
    problems = {}  # row index -> (kind, detail)
    for i in np.flatnonzero(df["caption"].eq("").to_numpy()):
        problems[i] = ("empty or missing caption", "")
    if check_images:
        bad_files = {}
        for image in pd.unique(df["image"]):
            path = _resolve(image, cfg)
            try:
                load_image(path, max_side=cfg.image_size)
            except Exception as error:  # any decoder failure means the file is unusable
                bad_files[image] = ("unreadable image", f"{path} ({type(error).__name__}: {error})")
        for i, image in enumerate(df["image"]):
            if image in bad_files:
                problems.setdefault(i, bad_files[image])
    if problems and cfg.on_bad_input == "raise":
        first = min(problems)
        raise ValueError(f"{len(problems)} bad rows; first is row {row_names[first]}: "
                         f"{' '.join(problems[first]).strip()} "
                         f"(set on_bad_input='skip' to drop them with a warning)")
    if problems:
        kinds = pd.Series([kind for kind, _ in problems.values()]).value_counts()
        examples = sorted({detail.split(" (")[0] for _, detail in problems.values() if detail})[:3]
        warnings.warn(f"skipped {len(problems)} of {len(df)} rows: " +
                      ", ".join(f"{n} {kind}" for kind, n in kinds.items()) +
                      (f"; e.g. {', '.join(examples)}" if examples else ""), stacklevel=2)
        df = df.drop(index=list(problems)).reset_index(drop=True)
    return df


def image_transforms(cfg: Config, train: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """Albumentations pipeline: light, caption-safe augmentation for training; resize + normalise for eval.

    No flips and no hue changes: captions say "left", "right" and name colours.
    """
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    steps = [A.Resize(cfg.image_size, cfg.image_size)]
    if train:
        steps += [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.04, 0.04), rotate=(-5, 5),
                           border_mode=1, p=0.7),  # replicate border: no black wedges
                  A.RandomBrightnessContrast(0.1, 0.1, p=0.5)]
    steps += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, seed=cfg.seed)


class _PairDataset(torch.utils.data.Dataset):
    """Rows of a clean table as (image tensor, caption, image index); a failed decode yields None."""

    def __init__(self, df: pd.DataFrame, cfg: Config, transform):
        self.paths = [_resolve(p, cfg) for p in df["image"]]
        self.captions = list(df["caption"])
        self.image_ids, self.images = pd.factorize(df["image"])  # captions of one image share an id
        self.transform, self.max_side = transform, cfg.image_size

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        try:
            image = load_image(self.paths[i], max_side=self.max_side)
        except Exception as error:  # a file broken since clean_table: skip it, the collate counts it
            warnings.warn(f"skipping unreadable image {self.paths[i]}: {error}")
            return None
        return self.transform(image=image)["image"], self.captions[i], int(self.image_ids[i])


def _seed_worker(worker_id: int) -> None:
    """Each worker process augments with its own stream, derived from the loader's per-epoch seed."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


def _collate(batch, tokenizer, max_length: int) -> dict:
    """Stack images and tokenise captions, padding only to the longest caption in this batch."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return {}
    images, captions, image_ids = zip(*batch)
    tokens = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length,
                       return_tensors="pt")
    return dict(images=torch.stack(images), input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"], image_ids=torch.tensor(image_ids))


def make_loader(df: pd.DataFrame, tokenizer, cfg: Config, train: bool, mean=None, std=None, batches=None):
    """A DataLoader over every caption row; training shuffles with a seeded generator unless given batches.

    Args:
        df: a clean table (see clean_table).
        tokenizer: Hugging Face tokenizer used per batch.
        cfg: batch size, workers, image size, seed.
        train: augment and shuffle (and drop a ragged last batch).
        mean, std: the image encoder's normalisation (defaults to ImageNet's).
        batches: optional list of row-index lists to use instead of shuffling (see similar_batches).
    """
    norm = {k: v for k, v in dict(mean=mean, std=std).items() if v is not None}
    lengths = np.array([len(ids) for ids in tokenizer(list(df["caption"]))["input_ids"]])
    if (lengths > cfg.max_length).any():
        warnings.warn(f"{(lengths > cfg.max_length).sum()} of {len(lengths)} captions are longer than "
                      f"max_length={cfg.max_length} tokens (longest {lengths.max()}) and will be truncated",
                      stacklevel=2)
    dataset = _PairDataset(df, cfg, image_transforms(cfg, train, **norm))
    cuda = _device(cfg).type == "cuda"
    # On a CPU the forward and backward passes already use every core: worker processes would only
    # compete with them (measured: 2 workers on 2 cores made full-size training steps 2x slower).
    workers = cfg.num_workers if cuda else 0
    order = (dict(batch_sampler=batches) if batches is not None else
             dict(batch_size=cfg.batch_size, shuffle=train, drop_last=train and len(dataset) > cfg.batch_size))
    return torch.utils.data.DataLoader(
        dataset, **order, num_workers=workers, pin_memory=cuda, worker_init_fn=_seed_worker,
        collate_fn=partial(_collate, tokenizer=tokenizer, max_length=cfg.max_length),
        generator=torch.Generator().manual_seed(cfg.seed))


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

class ImageEncoder(nn.Module):
    """Any timm backbone with its classifier removed: images (B, 3, H, W) -> pooled features (B, F)."""

    def __init__(self, cfg: Config):
        super().__init__()
        import timm

        pool = "" if cfg.image_pool == "flatten" else cfg.image_pool
        self.model = timm.create_model(cfg.image_model, pretrained=cfg.image_pretrained, num_classes=0,
                                       global_pool=pool, **cfg.image_model_kwargs)
        with torch.no_grad():  # feature size depends on pooling and input size: measure it once
            self.out_dim = self.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1]
        self.train()
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])  # the encoder's own
        if cfg.image_pretrained and data_cfg["input_size"][-1] != cfg.image_size:
            warnings.warn(f"{cfg.image_model} was pretrained at {data_cfg['input_size'][-1]} px but "
                          f"cfg.image_size is {cfg.image_size}; set image_size to match its pretraining")

    def forward(self, images):
        return self.model(images).flatten(1)  # (B, F); F = C * h * w when image_pool="flatten"


class TextEncoder(nn.Module):
    """A Hugging Face encoder: token ids (B, T) -> one vector per caption (B, H), CLS or mean pooled."""

    def __init__(self, cfg: Config, model=None):
        super().__init__()
        from transformers import AutoModel

        self.model = model if model is not None else AutoModel.from_pretrained(cfg.text_model)
        self.pooling = cfg.pooling
        self.out_dim = self.model.config.hidden_size

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear -> Dropout, plus a residual, then LayerNorm: (B, F) -> (B, D)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, residual: bool = True):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)
        self.residual = residual

    def forward(self, x):
        projected = self.projection(x)  # (B, D)
        x = self.dropout(self.fc(F.gelu(projected)))  # (B, D)
        return self.layer_norm(x + projected if self.residual else x)


class CLIPModel(nn.Module):
    """Two towers and a learnable temperature; forward(batch) -> (image_embeds, text_embeds), unnormalised.

    A frozen tower (cfg.freeze) gets no gradients and stays in eval mode, so its batch-norm
    statistics and dropout do not change while the other tower learns.
    """

    def __init__(self, cfg: Config, image_encoder: ImageEncoder, text_encoder: TextEncoder):
        super().__init__()
        if cfg.freeze not in ("none", "image", "text"):
            raise ValueError(f"cfg.freeze must be 'none', 'image' or 'text', got {cfg.freeze!r}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.freeze = cfg.freeze  # a name, not a module attribute: that would duplicate state-dict keys
        if self.freeze != "none":
            self._frozen_tower().requires_grad_(False)
        self.image_projection = ProjectionHead(image_encoder.out_dim, cfg.projection_dim, cfg.dropout,
                                               cfg.residual_heads)
        self.text_projection = ProjectionHead(text_encoder.out_dim, cfg.projection_dim, cfg.dropout,
                                              cfg.residual_heads)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def _frozen_tower(self):
        return {"image": self.image_encoder, "text": self.text_encoder}.get(self.freeze)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze != "none":
            self._frozen_tower().eval()
        return self

    def encode_image(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze != "image"):
            features = self.image_encoder(images)  # (B, F); no graph kept for a frozen tower
        return self.image_projection(features)  # (B, D)

    def encode_text(self, input_ids, attention_mask):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze != "text"):
            features = self.text_encoder(input_ids, attention_mask)  # (B, H)
        return self.text_projection(features)  # (B, D)

    def forward(self, batch: dict):
        return (self.encode_image(batch["images"]),
                self.encode_text(batch["input_ids"], batch["attention_mask"]))


def build_model(cfg: Config, captions=None):
    """Build (model, tokenizer): pretrained by name in full mode, small and random-init in quick mode.

    With cfg.text_pretrained False, a WordPiece tokenizer is trained on `captions` and a BERT
    is built from cfg.text_config; otherwise both load from cfg.text_model (name or folder).
    """
    _seed_everything(cfg.seed)
    if cfg.text_pretrained:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.text_model)
        text_encoder = TextEncoder(cfg)
    else:
        from transformers import BertConfig, BertModel

        if captions is None:
            raise ValueError("build_model needs captions to train a tokenizer when text_pretrained=False")
        tokenizer = train_wordpiece_tokenizer(captions, cfg.vocab_size)
        bert_config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 **cfg.text_config)
        text_encoder = TextEncoder(cfg, BertModel(bert_config))
    probe = "नमस्ते क्षत्रिय किताबें" if cfg.text_pretrained else normalize_caption(next(iter(captions)))
    if not keeps_devanagari(tokenizer, probe):
        warnings.warn(f"tokenizer of {cfg.text_model!r} loses Devanagari matras or virama "
                      f"(or maps them to {tokenizer.unk_token}): Hindi captions will be mangled")
    return CLIPModel(cfg, ImageEncoder(cfg), text_encoder), tokenizer


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------

def clip_loss(image_embeds, text_embeds, logit_scale, image_ids=None):
    """Symmetric cross-entropy (InfoNCE) over cosine similarities scaled by exp(logit_scale).

    Several captions of the same image in one batch (equal `image_ids`) are all positives:
    the target spreads evenly over them instead of calling a true match a negative.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)  # (B, D)
    text_embeds = F.normalize(text_embeds, dim=-1)  # (B, D)
    logits = logit_scale.exp() * text_embeds @ image_embeds.T  # (B_text, B_image)
    if image_ids is None:
        targets = torch.arange(len(logits), device=logits.device)  # pair i matches pair i
    else:
        same = (image_ids[:, None] == image_ids[None, :]).float()  # (B, B), symmetric
        targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def soft_target_loss(image_embeds, text_embeds, temperature: float = 1.0):
    """The published Simple-CLIP loss: unnormalised embeddings, soft targets from in-modality similarity.

    Captions of the same image get no special treatment: targets come only from how similar
    the embeddings already are, which is what lets this loss collapse to one point.
    """
    logits = text_embeds @ image_embeds.T / temperature  # (B, B)
    images_similarity = image_embeds @ image_embeds.T  # (B, B)
    texts_similarity = text_embeds @ text_embeds.T  # (B, B)
    targets = F.softmax((images_similarity + texts_similarity) / 2 * temperature, dim=-1)
    texts_loss = F.cross_entropy(logits, targets)
    images_loss = F.cross_entropy(logits.T, targets.T)
    return (images_loss + texts_loss) / 2


def _batch_loss(model: CLIPModel, batch: dict, cfg: Config):
    image_embeds, text_embeds = model(batch)
    if cfg.loss == "soft_target":
        return soft_target_loss(image_embeds.float(), text_embeds.float())
    return clip_loss(image_embeds.float(), text_embeds.float(), model.logit_scale, batch["image_ids"])


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def make_optimizer(model: CLIPModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW with three named groups: image encoder, text encoder, heads (with the temperature)."""
    heads = [*model.image_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]
    groups = [
        dict(name="image_encoder", params=list(model.image_encoder.parameters()), lr=cfg.image_encoder_lr),
        dict(name="text_encoder", params=list(model.text_encoder.parameters()), lr=cfg.text_encoder_lr),
        dict(name="heads", params=heads, lr=cfg.head_lr, weight_decay=cfg.weight_decay),
    ]
    # fused: one kernel for all parameters; on a CPU it steps a BERT-base 7x faster than the default
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, weight_decay=0.0, fused=fused)


def _cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 math (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _autocast(device: torch.device, precision: str = "auto"):
    """Mixed precision: bf16 where the hardware has it (GPU or CPU), else fp16 + grad scaler on GPUs, fp32 on CPUs."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"cfg.precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "fp32" or (device.type != "cuda" and precision == "auto" and not _cpu_has_bf16()):
        return torch.autocast(device.type, enabled=False), None
    if device.type != "cuda":
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 only emulates it: slow
    dtype = torch.bfloat16 if native_bf16 or precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # fp16 gradients underflow
    return torch.autocast("cuda", dtype=dtype), scaler


def _to(batch: dict, device: torch.device) -> dict:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)  # as the image tower
    return batch


def train_step(model: CLIPModel, batch: dict, optimizer, cfg: Config, autocast=None, scaler=None) -> float:
    """One optimisation step: forward, loss, backward, update; returns the loss.

    A non-finite loss raises FloatingPointError before the update, so the weights stay good.

    Args:
        model: a CLIPModel in train mode.
        batch: from make_loader, already on the model's device.
        optimizer: from make_optimizer.
        cfg: loss choice and temperature clamp.
        autocast, scaler: mixed-precision context and fp16 grad scaler (None: fp32).
    """
    with autocast or contextlib.nullcontext():
        loss = _batch_loss(model, batch, cfg)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, cfg.max_logit_scale)
    return loss.item()


def similar_batches(image_embeds, image_ids, batch_size: int, group: int, seed: int) -> list[list[int]]:
    """Row batches made of groups of images the model finds most alike: hard in-batch negatives.

    In a random batch of simple scenes, colour and position nearly always tell the images apart,
    so the loss never asks for shape. Grouping each image with its nearest neighbours under the
    current image embeddings puts exactly the images the model confuses into one softmax. Every
    row (caption) is still used once per epoch; the ragged last batch is dropped. A group shrinks
    when its anchor's nearest images have no unused rows left, and groups may straddle batches.

    Args:
        image_embeds: (I, D) embeddings of the table's distinct images.
        image_ids: (N,) index into image_embeds of each row.
        batch_size: rows per batch.
        group: images per group; groups are shuffled, then cut into batches.
        seed: the same seed and embeddings give the same batches.
    """
    rng = np.random.default_rng(seed)
    image_ids = np.asarray(image_ids)
    embeds = F.normalize(image_embeds.float(), dim=-1)  # (I, D)
    similarity = embeds @ embeds.T  # (I, I)
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.topk(min(4 * group, len(embeds) - 1), dim=1).indices.tolist()  # (I, K), nearest first
    rows_of = [[] for _ in range(len(embeds))]  # each image's unused rows, in random order
    for row in rng.permutation(len(image_ids)):
        rows_of[image_ids[row]].append(int(row))
    groups = []
    for image in image_ids[rng.permutation(len(image_ids))]:  # an image anchors as many groups as it has rows
        if not rows_of[image]:
            continue
        members = [rows_of[image].pop()]
        for other in neighbours[image]:
            if len(members) == group:
                break
            if rows_of[other]:
                members.append(rows_of[other].pop())
        groups.append(members)
    rows = [row for k in rng.permutation(len(groups)) for row in groups[k]]
    if len(rows) <= batch_size:  # as with random batches: a table smaller than one batch is one batch
        return [rows]
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


@torch.no_grad()
def _mean_loss(model, loader, cfg, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        if batch:
            with autocast:
                total += _batch_loss(model, _to(batch, device), cfg).item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return total / max(count, 1)


def fit(model: CLIPModel, tokenizer, train_df: pd.DataFrame, val_df: pd.DataFrame, cfg: Config,
        resume: bool = False) -> pd.DataFrame:
    """Train with AdamW + ReduceLROnPlateau on val loss; keep the best checkpoint; return the history.

    One history row per epoch: train and val loss, each group's learning rate, the temperature,
    seconds (and peak GPU memory on CUDA). cfg.out_dir receives "best" (lowest val loss, loaded
    back into `model` at the end), "last" (weights plus optimizer, scheduler and scaler state,
    for resuming) and history.csv. Each epoch reseeds shuffling, augmentation and dropout from
    cfg.seed and the epoch number, so a resumed run repeats an uninterrupted one. With
    cfg.hard_negatives > 1, every epoch after the first takes its batches from similar_batches.

    Args:
        model, tokenizer: from build_model.
        train_df, val_df: caption tables (checked with clean_table here).
        cfg: the run's Config.
        resume: continue from cfg.out_dir/"last" if it exists (a Colab session died mid-run).
    """
    from tqdm.auto import tqdm

    _seed_everything(cfg.seed)
    device = _device(cfg)
    model.to(device)
    model.image_encoder.to(memory_format=torch.channels_last)  # faster convolutions on GPUs and on CPUs
    train_df, val_df = clean_table(train_df, cfg), clean_table(val_df, cfg)
    norm = dict(mean=model.image_encoder.mean, std=model.image_encoder.std)
    train_loader = make_loader(train_df, tokenizer, cfg, train=True, **norm)
    val_loader = make_loader(val_df, tokenizer, cfg, train=False, **norm)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor,
                                                           patience=cfg.patience)
    autocast, scaler = _autocast(device, cfg.precision)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history, best, first_epoch = [], math.inf, 1
    if resume and (out_dir / "last" / "training_state.pt").exists():
        history, best = _restore_training(out_dir / "last", model, optimizer, scheduler, scaler)
        first_epoch = len(history) + 1
        print(f"resuming after epoch {len(history)} from {out_dir / 'last'}")
    start = time.time()
    for epoch in range(first_epoch, cfg.epochs + 1):
        epoch_start = time.time()
        if cfg.hard_negatives > 1 and epoch > 1:  # mine look-alikes with the weights the last epoch left
            pairs = train_loader.dataset
            image_embeds = encode_images(model, list(pairs.images), cfg)  # (I, D), indexed by pairs.image_ids
            batches = similar_batches(image_embeds, pairs.image_ids, cfg.batch_size, cfg.hard_negatives, cfg.seed + epoch)
            train_loader = make_loader(train_df, tokenizer, cfg, train=True, batches=batches, **norm)
        torch.manual_seed(cfg.seed + epoch)  # dropout
        train_loader.generator.manual_seed(cfg.seed + epoch)  # shuffling (random batches) and worker seeds
        train_loader.dataset.transform.set_random_seed(cfg.seed + epoch)  # augmentation
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False)
        for step, batch in enumerate(bar):
            if not batch:
                continue
            batch = _to(batch, device)
            try:
                loss = train_step(model, batch, optimizer, cfg, autocast, scaler)
            except FloatingPointError as error:
                kept = (f"the last good weights are in {out_dir / 'best'} and {out_dir / 'last'}" if history
                        else "no checkpoint was written yet")
                raise FloatingPointError(f"{error} at epoch {epoch}, batch {step}; training stopped, {kept}") from None
            except torch.OutOfMemoryError as error:
                raise torch.OutOfMemoryError(f"out of memory at epoch {epoch}, batch {step} with batch_size="
                                             f"{cfg.batch_size}: try Config(batch_size={max(1, cfg.batch_size // 2)}) "
                                             f"or a smaller image_size. ({error})") from None
            n = len(batch["input_ids"])
            running, seen = running + loss * n, seen + n
            bar.set_postfix(loss=f"{running / seen:.3f}")
            if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
                break
        val_loss = _mean_loss(model, val_loader, cfg, device, autocast)
        scheduler.step(val_loss)
        row = dict(epoch=epoch, train_loss=running / max(seen, 1), val_loss=val_loss,
                   **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                   temperature=1 / model.logit_scale.exp().item(), seconds=time.time() - epoch_start)
        if device.type == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        history.append(row)
        print(f"epoch {epoch}: train {row['train_loss']:.4f}  val {val_loss:.4f}  "
              f"({row['seconds']:.0f}s)" + ("  best" if val_loss < best else ""))
        if val_loss < best:
            best = val_loss
            save_checkpoint(out_dir / "best", model, tokenizer, cfg)
        _save_training(out_dir / "last", model, tokenizer, cfg, optimizer, scheduler, scaler, history, best)
        pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)
        if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
            print(f"stopping: the {cfg.max_minutes}-minute budget (cfg.max_minutes) is spent")
            break
    if math.isfinite(best):
        _load_weights(model, out_dir / "best" / "model.safetensors")
    return pd.DataFrame(history)


def _save_training(path, model, tokenizer, cfg, optimizer, scheduler, scaler, history, best) -> None:
    """The "last" checkpoint: weights, tokenizer and config, plus everything fit needs to go on."""
    save_checkpoint(path, model, tokenizer, cfg,
                    extra={"training_state.pt": dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                                     scaler=scaler.state_dict() if scaler else None,
                                                     history=history, best=best)})


def _restore_training(path, model, optimizer, scheduler, scaler) -> tuple[list, float]:
    _load_weights(model, path / "model.safetensors")
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return state["history"], state["best"]


# ----------------------------------------------------------------------------
# Evaluation and retrieval
# ----------------------------------------------------------------------------

@torch.no_grad()
def encode_images(model: CLIPModel, images, cfg: Config, batch_size: int = 128) -> torch.Tensor:
    """Unit-length embeddings (N, D) of images given as paths, PIL images or RGB arrays."""
    device = next(model.parameters()).device
    transform = image_transforms(cfg, train=False, mean=model.image_encoder.mean, std=model.image_encoder.std)
    if model.training:  # eval() walks every module: skip it when there is nothing to switch
        model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        arrays = [load_image(_resolve(im, cfg), cfg.image_size) if isinstance(im, (str, Path))
                  else np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
                  for im in images[start:start + batch_size]]
        pixels = torch.stack([transform(image=a)["image"] for a in arrays]).to(device)  # (b, 3, H, W)
        out.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
    return torch.cat(out)  # (N, D)


@torch.no_grad()
def encode_texts(model: CLIPModel, tokenizer, texts, cfg: Config, batch_size: int = 256) -> torch.Tensor:
    """Unit-length embeddings (M, D) of captions (normalised like the training captions)."""
    device = next(model.parameters()).device
    if model.training:
        model.eval()
    out = []
    texts = [normalize_caption(t) for t in texts]
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], padding="longest", truncation=True,
                           max_length=cfg.max_length, return_tensors="pt").to(device)
        out.append(F.normalize(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float(),
                               dim=-1).cpu())
    return torch.cat(out)  # (M, D)


def recall_at_k(similarity: torch.Tensor, caption_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@K both ways and median ranks from a (captions, images) similarity matrix.

    Every caption of an image counts as correct for image-to-text (Flickr/XM3600 protocol).

    Args:
        similarity: (M, N) scores, caption m against image n.
        caption_to_image: (M,) index of each caption's image.
        ks: the K values to report.
    """
    similarity = torch.as_tensor(similarity, dtype=torch.float32)
    caption_to_image = torch.tensor(np.asarray(caption_to_image), dtype=torch.long)
    n_captions, n_images = similarity.shape
    correct = torch.zeros(n_captions, n_images, dtype=torch.bool)  # (M, N)
    correct[torch.arange(n_captions), caption_to_image] = True
    # Rank = how many candidates score strictly higher than the best correct one (0 = top).
    t2i_best = similarity.masked_fill(~correct, -math.inf).max(1).values  # (M,)
    t2i_rank = (similarity > t2i_best[:, None]).sum(1)  # (M,)
    sim_t = similarity.T  # (N, M)
    i2t_best = sim_t.masked_fill(~correct.T, -math.inf).max(1).values  # (N,)
    i2t_rank = (sim_t > i2t_best[:, None]).sum(1)  # (N,)
    has_caption = correct.any(0)  # images without captions cannot be scored image-to-text
    i2t_rank = i2t_rank[has_caption]
    metrics = {}
    for k in ks:
        metrics[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
    for k in ks:
        metrics[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
    metrics["t2i_median_rank"] = t2i_rank.float().median().item() + 1
    metrics["i2t_median_rank"] = i2t_rank.float().median().item() + 1
    return metrics


def retrieval_metrics(model: CLIPModel, tokenizer, df: pd.DataFrame, cfg: Config) -> dict:
    """R@1/5/10 text-to-image and image-to-text plus median ranks over a caption table."""
    df = clean_table(df, cfg)
    images = list(pd.unique(df["image"]))
    caption_to_image = pd.Categorical(df["image"], categories=images).codes
    image_embeds = encode_images(model, images, cfg)  # (N, D)
    text_embeds = encode_texts(model, tokenizer, list(df["caption"]), cfg)  # (M, D)
    return recall_at_k(text_embeds @ image_embeds.T, caption_to_image)


def _image_fingerprint(model: CLIPModel) -> str:
    """A hash of everything that shapes an image embedding: the image tower and its head, not the text side."""
    digest = hashlib.sha1()
    image_side = {**model.image_encoder.state_dict(prefix="image_encoder."),
                  **model.image_projection.state_dict(prefix="image_projection.")}
    for name, tensor in image_side.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embed_gallery(model: CLIPModel, images, cfg: Config, cache_dir=None, dtype=torch.float16,
                  in_memory: bool = True):
    """Gallery embeddings (N, D), computed once and cached on disk for later searches.

    The cache file is named by a hash of the image-side weights, the preprocessing and the file list
    (paths, sizes, modification times), so a retrained model or a changed gallery computes afresh. float16
    halves memory and search time; the ranking barely changes.

    Args:
        model, cfg: a trained model and its Config.
        images: image paths.
        cache_dir: folder for the cache (None: no cache).
        dtype: storage type of the embeddings.
        in_memory: False returns a read-only memory map instead of a tensor, for galleries
            larger than memory: top_k_scores then reads it from disk chunk by chunk.
    """
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"embed_gallery stores float16 or float32, not {dtype}")
    if cache_dir is None:
        return encode_images(model, images, cfg).to(dtype)
    files = hashlib.sha1(f"{cfg.image_size} {model.image_encoder.mean} {model.image_encoder.std}\n".encode())
    for image in images:
        stat = os.stat(_resolve(image, cfg))
        files.update(f"{image}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = f"gallery-{_image_fingerprint(model)[:12]}-{files.hexdigest()[:12]}-{str(dtype)[6:]}.npy"
    path = Path(cache_dir) / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        embeds = encode_images(model, images, cfg).to(dtype).numpy()
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, embeds)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated cache behind
    embeds = np.load(path, mmap_mode=None if in_memory else "r")
    return torch.from_numpy(embeds) if in_memory else embeds


def top_k_scores(image_embeds, query_embed: torch.Tensor, k: int, chunk_size: int = 1 << 18):
    """(scores, indices) of the k gallery rows most similar to one query, scanning the gallery in chunks.

    Args:
        image_embeds: (N, D) tensor or numpy array (a memory map is read chunk by chunk).
        query_embed: (D,) unit vector.
        k: how many results.
        chunk_size: rows per chunk; bounds the temporary memory.
    """
    best_scores, best_indices = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]  # an empty gallery finds nothing
    for start in range(0, len(image_embeds), chunk_size):
        chunk = image_embeds[start:start + chunk_size]
        chunk = torch.from_numpy(np.array(chunk)) if isinstance(chunk, np.ndarray) else chunk  # reads a memory map
        scores = chunk @ query_embed.to(chunk.dtype)  # (n,)
        top = scores.topk(min(k, len(scores)))
        best_scores.append(top.values.float())
        best_indices.append(top.indices + start)
    scores, indices = torch.cat(best_scores), torch.cat(best_indices)
    top = scores.topk(min(k, len(scores)))
    return top.values, indices[top.indices]


def search_images(query: str, model: CLIPModel, tokenizer, images, cfg: Config, k: int = 5,
                  image_embeds=None) -> pd.DataFrame:
    """Top-k images for a Hindi query, as a table of image and cosine score.

    Args:
        query: free Hindi text, e.g. "घास पर कुत्ता".
        model, tokenizer: a trained pair.
        images: the gallery (paths, PIL images or arrays).
        cfg: the model's Config.
        k: how many results.
        image_embeds: precomputed gallery embeddings (encode_images or embed_gallery), to search many times cheaply.
    """
    if image_embeds is None:
        image_embeds = encode_images(model, images, cfg)
    with torch.inference_mode():  # no autograd bookkeeping at all: a few hundred microseconds per query
        query_embed = encode_texts(model, tokenizer, [query], cfg)[0]  # (D,)
        scores, indices = top_k_scores(image_embeds, query_embed, k)
    return pd.DataFrame(dict(image=[images[i] for i in indices.tolist()], score=scores.tolist()))


HINDI_TEMPLATES = ["{}", "एक {} की तस्वीर", "{} का चित्र", "इस चित्र में {} है"]


def zero_shot_classify(model: CLIPModel, tokenizer, images, class_names, cfg: Config,
                       templates=HINDI_TEMPLATES, image_embeds=None) -> torch.Tensor:
    """Class probabilities (N, C) from Hindi prompts: each class averages its prompts' embeddings.

    Args:
        model, tokenizer: a trained pair.
        images: paths, PIL images or arrays (ignored when image_embeds is given).
        class_names: Hindi names, one per class, filled into `templates`; or a dict
            {name: [its own prompts]} when prompts must agree with the noun's gender.
        cfg: the model's Config.
        templates: prompts with one "{}" for the class name; more templates, steadier classes.
        image_embeds: optional precomputed encode_images output.
    """
    if image_embeds is None:
        image_embeds = encode_images(model, images, cfg)  # (N, D)
    if not isinstance(class_names, dict):
        class_names = {name: [t.format(name) for t in templates] for name in class_names}
    class_embeds = torch.stack([encode_texts(model, tokenizer, prompts, cfg).mean(0)
                                for prompts in class_names.values()])  # (C, D)
    class_embeds = F.normalize(class_embeds, dim=-1)  # averaging shrinks the vectors: renormalise
    scale = model.logit_scale.exp().detach().cpu()
    return (scale * image_embeds.float() @ class_embeds.T).softmax(-1)  # (N, C); float16 galleries too


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------

def use_devanagari_font() -> str | None:
    """Register Noto Sans Devanagari with matplotlib (Latin falls back to DejaVu Sans); returns its name."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) < (3, 11):
        warnings.warn(f"matplotlib {matplotlib.__version__} cannot shape Devanagari: install matplotlib>=3.11")
    candidates = []
    try:
        import fontpkg_noto_sans_devanagari as fontpkg  # pip package carrying the font file

        candidates += sorted(Path(fontpkg.ROOT).glob("files/*.ttf"))
    except ImportError:
        pass
    candidates += [Path(f) for f in font_manager.findSystemFonts() if "NotoSansDevanagari" in Path(f).name]
    if not candidates:
        warnings.warn("no Noto Sans Devanagari font found: pip install fontpkg-noto-sans-devanagari")
        return None
    font_manager.fontManager.addfont(str(candidates[0]))
    name = font_manager.FontProperties(fname=str(candidates[0])).get_name()
    plt.rcParams["font.family"] = [name, "DejaVu Sans"]
    return name


def _save(fig, path):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_history(history: pd.DataFrame, path=None, title: str = "प्रशिक्षण (training)"):
    """Train and validation loss per epoch beside each group's learning rate."""
    import matplotlib.pyplot as plt

    use_devanagari_font()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    ax_loss.plot(history["epoch"], history["val_loss"], "s-", label="validation loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=title)
    ax_loss.legend()
    for column in [c for c in history.columns if c.startswith("lr_")]:
        ax_lr.plot(history["epoch"], history[column], "o-", label=column.removeprefix("lr_"))
    ax_lr.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="learning rate per group")
    ax_lr.legend()
    fig.tight_layout()
    return _save(fig, path)


def show_retrieval(query: str, results: pd.DataFrame, cfg: Config, path=None, truth=None):
    """The query above a row of the top images with their scores (a correct image is framed green)."""
    import matplotlib.pyplot as plt

    use_devanagari_font()
    fig, axes = plt.subplots(1, len(results), figsize=(2.2 * len(results), 2.8), squeeze=False)
    for ax, (_, row) in zip(axes[0], results.iterrows()):
        ax.imshow(load_image(_resolve(row["image"], cfg)))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{row['score']:.2f}", fontsize=10)
        if truth is not None and row["image"] in set(truth):
            for spine in ax.spines.values():
                spine.set(color="green", linewidth=4)
    fig.suptitle(f"खोज (query): {query}", fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def show_zero_shot(image, class_names, probs, cfg: Config, path=None, top: int = 5):
    """An image beside horizontal bars of its most likely Hindi class names."""
    import matplotlib.pyplot as plt

    use_devanagari_font()
    probs = torch.as_tensor(probs).flatten()
    order = probs.argsort(descending=True)[:top].tolist()[::-1]
    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(7, 2.6), gridspec_kw=dict(width_ratios=[1, 1.6]))
    ax_img.imshow(load_image(_resolve(image, cfg)) if isinstance(image, (str, Path)) else image)
    ax_img.axis("off")
    ax_bar.barh([class_names[i] for i in order], probs[order].numpy(), color="tab:orange")
    ax_bar.set(xlim=(0, 1), xlabel="probability")
    ax_bar.tick_params(axis="y", labelsize=11)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------

def _load_weights(model: nn.Module, path, strict: bool = True) -> tuple[list, list]:
    from safetensors.torch import load_file

    return _load_state(model, load_file(str(path)), strict)


def _load_state(model: nn.Module, state: dict, strict: bool) -> tuple[list, list]:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, shape mismatch {mismatched[:10]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected


def save_checkpoint(path, model: CLIPModel, tokenizer, cfg: Config, extra: dict | None = None) -> Path:
    """Write one folder: model.safetensors, config.json (run + text-encoder config) and the tokenizer.

    The folder is written beside its destination and renamed into place, so a crash mid-save
    leaves the previous checkpoint intact. `extra` maps file names to objects saved with torch.save
    (plain tensors, numbers and dicts only, so torch.load(weights_only=True) can read them).
    """
    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    meta = dict(config=dataclasses.asdict(cfg), text_encoder_config=model.text_encoder.model.config.to_dict())
    (tmp / "config.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path, device: str | None = None):
    """Rebuild (model, tokenizer, cfg) from a save_checkpoint folder, offline (no downloads)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(path)
    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in meta["config"].items() if k in known})
    if "channels" in cfg.image_model_kwargs:  # JSON turned the tuple into a list
        cfg.image_model_kwargs["channels"] = tuple(cfg.image_model_kwargs["channels"])
    cfg = dataclasses.replace(cfg, image_pretrained=False)  # weights come from the file, not timm
    text_config = AutoConfig.for_model(**meta["text_encoder_config"])
    text_encoder = TextEncoder(cfg, AutoModel.from_config(text_config))
    model = CLIPModel(cfg, ImageEncoder(cfg), text_encoder)
    _load_weights(model, path / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return model.to(device or _device(cfg)).eval(), tokenizer, cfg


def load_published_checkpoint(path_or_repo="damerajee/clip-hindi", cfg: Config | None = None,
                              text_encoder_model=None):
    """Load the published `model.pt` (a local file or a Hub repository) into the architecture it was trained with.

    Its projection heads have no residual connection and its loss had a fixed temperature of 1;
    both are reproduced here. Missing or unexpected keys are reported in a warning, never
    silently ignored; a key whose shape differs raises.

    Args:
        path_or_repo: a .pt state dict (read with weights_only=True) or a Hub repo id holding model.pt.
        cfg: architecture names (image_model, text_model); defaults to Config.full().
        text_encoder_model: an already built Hugging Face encoder (e.g. from a local config).
    """
    from transformers import AutoConfig, AutoModel

    path = Path(str(path_or_repo))
    if not path.exists():
        if path.suffix or str(path_or_repo).count("/") != 1:  # looks like a file, not "owner/name"
            raise FileNotFoundError(f"no checkpoint file {path}")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(path_or_repo), "model.pt"))
    cfg = dataclasses.replace(cfg or Config.full(), image_pretrained=False, residual_heads=False,
                              init_logit_scale=0.0)
    if text_encoder_model is None:
        text_encoder_model = AutoModel.from_config(AutoConfig.from_pretrained(cfg.text_model))
    model = CLIPModel(cfg, ImageEncoder(cfg), TextEncoder(cfg, text_encoder_model))
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    missing, unexpected = _load_state(model, state, strict=False)
    missing = [k for k in missing if k != "logit_scale"]  # the published loss had no learnable temperature
    if len(missing) > len(model.state_dict()) // 2:  # e.g. a dict wrapped in {"state_dict": ...}
        raise ValueError(f"{path} does not hold the published layout: {len(missing)} of the model's keys are "
                         f"missing (e.g. {missing[:3]}); its own keys look like {list(state)[:3]}")
    if missing or unexpected:
        warnings.warn(f"published checkpoint {path}: {len(missing)} missing keys {missing[:5]}, "
                      f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    model.logit_scale.requires_grad_(False)
    return model.eval()
