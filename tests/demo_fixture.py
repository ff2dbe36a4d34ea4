"""A tiny trained model and a gallery it knows, for the demo tests: each colour word finds its own picture.

Eight pictures, one per colour, each a few shapes on white in that colour; captions name the colour
("एक लाल तस्वीर"). A two-layer text tower and a narrow ResNet learn them in seconds, so the browser test
checks real retrieval: an untrained model of the same shape ranks the right picture first only by chance.
"""
import random
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

import clip_utils as cu

COLOURS = {"लाल": (215, 30, 30), "नीला": (30, 70, 220), "हरा": (30, 150, 50), "पीला": (235, 200, 20),
           "काला": (25, 25, 25), "नारंगी": (245, 125, 0), "बैंगनी": (130, 40, 180), "गुलाबी": (245, 120, 190)}
ENGLISH = ["red", "blue", "green", "yellow", "black", "orange", "purple", "pink"]
CAPTIONS = ["{}", "एक {} तस्वीर", "{} रंग", "{} रंग का चित्र", "इस चित्र में {} है"]


def draw(path: Path, rgb, seed: int, size: int = 64) -> Path:
    """A white picture with three discs in one colour, placed by `seed`."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    for _ in range(3):
        r = rng.uniform(0.12, 0.22) * size
        x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
        pen.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    image.save(path)
    return path


def colour_table(folder, per_colour: int = 1, seed: int = 0) -> pd.DataFrame:
    """Pictures `<english>_<i>.png` in `folder`, with a row per caption (image, caption, colour)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, ((hindi, rgb), english) in enumerate(zip(COLOURS.items(), ENGLISH)):
        for i in range(per_colour):
            path = draw(folder / f"{english}_{i}.png", rgb, seed=seed * 1000 + c * 10 + i)
            rows += [dict(image=str(path), caption=t.format(hindi), colour=hindi) for t in CAPTIONS]
    return pd.DataFrame(rows)


def tiny_config(out_dir, **overrides) -> cu.Config:
    """Quick mode shrunk to train in seconds on the colour pictures."""
    base = dict(image_size=32, batch_size=8, epochs=16, vocab_size=1000,
                max_minutes=None,  # a wall-clock budget would make the test depend on machine load
                hard_negatives=0,
                patience=1000,  # no learning-rate cuts: the tiny validation set is too noisy to steer them
                text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64),
                image_model_kwargs=dict(channels=(8, 16, 16, 32), stem_width=8), out_dir=str(out_dir))
    return cu.Config.quick(**{**base, **overrides})


def train_colour_model(folder):
    """Train on one picture per colour in folder/train; save to folder/run/best. Returns (model, tokenizer, cfg)."""
    folder = Path(folder)
    train = colour_table(folder / "train", per_colour=4, seed=1)
    val = colour_table(folder / "val", per_colour=1, seed=2)
    cfg = tiny_config(folder / "run")
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    cu.fit(model, tokenizer, train, val, cfg)
    return model, tokenizer, cfg
