"""Quick-mode data: synthetic Hindi scenes of coloured shapes, drawn with grammatical captions
(and an English translation of each, for distillation from an English CLIP)."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd

from .tables import _cached_splits, split_by_image

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
# English for every Hindi word the captions use: each caption's translation is built from the same
# choices, so it draws nothing from the random stream (the Hindi data stays what it was).
_ENGLISH = {
    "गोला": "circle", "वृत्त": "circle", "वर्ग": "square", "त्रिभुज": "triangle", "तारा": "star", "सितारा": "star",
    "पतंग": "kite", "अंगूठी": "ring", "छल्ला": "ring",
    "लाल": "red", "नीला": "blue", "हरा": "green", "पीला": "yellow", "काला": "black", "नारंगी": "orange",
    "बैंगनी": "purple", "गुलाबी": "pink", "बड़ा": "big", "छोटा": "small",
    "बीच में": "in the middle", "बाईं ओर": "on the left", "बाईं तरफ़": "on the left side",
    "दाईं ओर": "on the right", "दाईं तरफ़": "on the right side", "ऊपर": "at the top",
    "ऊपर की ओर": "towards the top", "नीचे": "at the bottom", "नीचे की ओर": "towards the bottom",
    "चित्र में": "in the picture", "इस तस्वीर में": "in this image",
}


def _inflect(adjective: str, gender: str, plural: bool) -> str:
    """Hindi adjectives ending in -ā agree: नीला गोला, नीली पतंग, नीले गोले."""
    if not adjective.endswith("ा"):
        return adjective  # लाल, नारंगी, ... never change
    if gender == "f":
        return adjective[:-1] + "ी"
    return adjective[:-1] + ("े" if plural else "ा")


def _noun_phrase(obj: dict, rng: random.Random, count: int = 1) -> tuple[str, str, str]:
    """'एक बड़ी नीली पतंग' or 'दो छोटे लाल गोले'; returns (phrase, gender, English phrase)."""
    word, gender, plural_word = rng.choice(_SHAPES[obj["shape"]])
    plural = count > 1
    size = _inflect(obj["size"], gender, plural)
    colour = _inflect(obj["colour"], gender, plural)
    number = {1: "एक", 2: "दो", 3: "तीन"}[count]
    english = (f"{({1: 'a', 2: 'two', 3: 'three'}[count])} {_ENGLISH[obj['size']]} {_ENGLISH[obj['colour']]} "
               f"{_ENGLISH[word]}" + ("s" if plural else ""))
    return f"{number} {size} {colour} {plural_word if plural else word}", gender, english


def _captions_for(objects: list[dict], same: bool, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Several differently worded, fully descriptive captions of one scene, each as (Hindi, English)."""
    captions = {}  # Hindi -> its English translation
    for _ in range(20 * n):
        if len(captions) == n:
            break
        if same:  # one group of identical objects: plural agreement, no positions needed
            phrase, gender, english = _noun_phrase(objects[0], rng, count=len(objects))
            parts, verb_rest = [phrase], ("रही हैं" if gender == "f" else "रहे हैं")
            en_parts, en_be = [english], "are"
            be = "हैं"
        else:
            parts, genders, en_parts = [], [], []
            for obj in objects:
                phrase, gender, english = _noun_phrase(obj, rng)
                pos = rng.choice(_POSITIONS[obj["pos"]][1])
                parts.append((pos, phrase))
                en_parts.append((english, _ENGLISH[pos]))
                genders.append(gender)
            if len(objects) == 1:
                be, verb_rest = "है", ("रही है" if genders[0] == "f" else "रहा है")
            else:
                be, verb_rest = "हैं", "रहे हैं"
            en_be = "is"  # "there is a red circle on the left and a blue star ...": agrees with the first
        style = rng.randrange(4)
        if same:
            desc, en_desc = parts[0], en_parts[0]
        elif style == 3:  # clause per object: "एक नीला गोला बाईं ओर है और ..."
            clauses = [f"{np_} {pos} है" for pos, np_ in parts]
            en_clauses = [f"{np_} is {pos}" for np_, pos in en_parts]
            captions.setdefault(" और ".join([", ".join(clauses[:-1])] + clauses[-1:] if len(clauses) > 1
                                            else clauses) + "।", _english_list(en_clauses))
            continue
        else:
            items = [f"{pos} {np_}" for pos, np_ in parts]
            desc = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " और " + items[-1]
            en_desc = _english_list([f"{np_} {pos}" for np_, pos in en_parts])
        if style == 0:
            captions.setdefault(f"{desc}।", en_desc)
        elif style == 1:
            where = rng.choice(['चित्र में', 'इस तस्वीर में'])
            captions.setdefault(f"{where} {desc} {be}।", f"{_ENGLISH[where]} there {en_be} {en_desc}")
        else:
            visible = "is" if len(en_parts) == 1 and not same else "are"
            captions.setdefault(f"{desc} दिखाई दे {verb_rest}।", f"{en_desc} {visible} visible")
    return sorted(captions.items())


def _english_list(items: list[str]) -> str:
    """"a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


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
        for caption, english in _captions_for(objects, same, rng, captions_per_image):
            rows.append(dict(image=str(path.resolve()), caption=caption, english=english, n_objects=n_obj,
                             held_out=is_held_out,
                             shape=single["shape"], colour=single["colour"],
                             label=_class_name(single["colour"], single["shape"]) if n_obj == 1 else ""))
    return pd.DataFrame(rows)


def prepare_quick_data(data_dir, n_images: int = 1200, seed: int = 0):
    """Make (or reload) the quick-mode synthetic set and its train/val/test tables.

    Test holds every scene with a held-out colour-shape pair, so test captions are
    combinations the model never saw in training.
    """
    def make():
        df = make_synthetic_dataset(Path(data_dir) / "images", n_images=n_images, seed=seed)
        return split_by_image(df, val_frac=0.1, test_frac=0.0, seed=seed, force_test=df["held_out"])

    source = dict(captions="synthetic", n_images=n_images, seed=seed,
                  what=f"synthetic scenes drawn by clip_utils ({n_images:,} images, seed {seed})")
    return _cached_splits(data_dir, make, source)  # tables kept before sources were (no English column) redraw
