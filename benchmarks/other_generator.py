"""Quick mode on a synthetic Hindi set drawn by an independent generator (not make_synthetic_dataset).

Checks that Config.quick + build_model + fit + retrieval_metrics also work on scenes we did not
design the recipe around: other colours and shapes, a 3x3 grid of positions, textured gradient
backgrounds with drop shadows, and other caption wordings. The 200 test images each contain a
colour-shape pair that never occurs in train/val, and no two test images share a description.

    python benchmarks/other_generator.py [--seed 0] [--train-seed 42] [--out DIR] [--epochs N] [--train-pairs 2400]
                                         [--hard-negatives G]
"""
import argparse
import math
import os
import random
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

os.environ["TQDM_DISABLE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import clip_utils as cu  # noqa: E402

COLOURS = {"लाल": (210, 35, 35), "नीला": (35, 60, 200), "हरा": (30, 145, 60), "पीला": (245, 205, 20),
           "भूरा": (125, 75, 30), "आसमानी": (90, 190, 245), "काला": (25, 25, 25)}
SHAPES = {"वृत्त": ("m", "वृत्त"), "आयत": ("m", "आयत"), "षट्भुज": ("m", "षट्भुज"),  # name: (gender, plural)
          "अर्धचंद्र": ("m", "अर्धचंद्र"), "धन चिह्न": ("m", "धन चिह्न"), "बूँद": ("f", "बूँदें")}
HELD_OUT = {("लाल", "षट्भुज"), ("नीला", "अर्धचंद्र"), ("हरा", "बूँद"), ("पीला", "वृत्त"),
            ("भूरा", "आयत"), ("आसमानी", "धन चिह्न"), ("काला", "बूँद")}  # only ever in test
ROWS = {0: ["ऊपर"], 1: [""], 2: ["नीचे"]}
COLS = {0: ["बाईं ओर", "बाईं तरफ़"], 1: ["बीच में"], 2: ["दाईं ओर", "दाईं तरफ़"]}


def adj(colour, gender, plural=False, oblique=False):
    """-आ adjectives agree: हरा वृत्त, हरी बूँद, हरे वृत्त (pl), हरे वृत्त के (oblique)."""
    if not colour.endswith("ा"):
        return colour
    return colour[:-1] + ("ी" if gender == "f" else "े" if plural or oblique else "ा")


def phrase(obj, plural=False, oblique=False):
    gender, plural_noun = SHAPES[obj[1]]
    return f"{adj(obj[0], gender, plural, oblique)} {plural_noun if plural else obj[1]}"


def cell_phrases(row, col):
    if (row, col) == (1, 1):
        return ["ठीक बीच में", "बीचोंबीच"]
    out = [f"{r} {c}".strip() for r in ROWS[row] for c in COLS[col]]
    if row != 1 and col != 1:  # corners
        out.append(f"{'ऊपरी' if row == 0 else 'निचले'} {'बाएँ' if col == 0 else 'दाएँ'} कोने में")
    return out


def captions(scene, rng):
    """Every fully descriptive wording of a scene (kind, layout, objects)."""
    kind, layout, objs = scene
    if kind == "single":
        obj, g = objs[0], SHAPES[objs[0][1]][0]
        made, seen = ("बनी", "रही") if g == "f" else ("बना", "रहा")
        out = []
        for pos in cell_phrases(*layout):
            out += [f"तस्वीर में {pos} एक {phrase(obj)} है।", f"{pos} एक {phrase(obj)} {made} है।",
                    f"एक {phrase(obj)} {pos} दिख {seen} है।", f"एक {phrase(obj)}, {pos}।",
                    f"धुंधली पृष्ठभूमि पर {pos} एक {phrase(obj)}।"]
        return out
    first, second = ("बाईं ओर", "दाईं ओर") if layout == "h" else ("ऊपर", "नीचे")
    if kind == "pair":
        a, b = objs
        return [f"{first} एक {phrase(a)} और {second} एक {phrase(b)} है।",
                f"एक {phrase(a, oblique=True)} के {second} एक {phrase(b)} है।",
                f"एक {phrase(b, oblique=True)} के {first} एक {phrase(a)} है।",
                f"तस्वीर में दो आकृतियाँ हैं: {first} {phrase(a)} और {second} {phrase(b)}।",
                f"{phrase(a)} {first} है और {phrase(b)} {second}।"]
    obj = objs[0]  # "twin": two identical objects, plural agreement
    many, seen = phrase(obj, plural=True), ("रही" if SHAPES[obj[1]][0] == "f" else "रहे")
    where = "अगल-बगल" if layout == "h" else "ऊपर-नीचे"
    return [f"{'अगल-बगल' if layout == 'h' else 'एक के ऊपर एक,'} दो {many} हैं।",
            f"दो {many}, एक {first} और एक {second}।", f"तस्वीर में दो {many} {where} दिख {seen} हैं।",
            f"{first.replace(' ओर', '')} और {second} एक-एक {phrase(obj)} है।"]


def random_scene(rng, held_out):
    """A scene with (held_out=True) at least one held-out pair, or (False) none."""
    while True:
        pick = lambda: (rng.choice(list(COLOURS)), rng.choice(list(SHAPES)))  # noqa: E731
        kind = rng.choices(["single", "pair", "twin"], weights=[0.45, 0.4, 0.15])[0]
        layout = (rng.randrange(3), rng.randrange(3)) if kind == "single" else rng.choice("hv")
        objs = [pick()] if kind != "pair" else [pick(), pick()]
        if kind == "pair" and objs[0] == objs[1]:
            continue
        if any(o in HELD_OUT for o in objs) == held_out:
            return kind, layout, tuple(objs)


def draw_scene(scene, rng, px=96, ss=3):
    """Render at ss x size (antialiasing): gradient + texture background, shadowed shapes."""
    n = px * ss
    kind, layout, objs = scene
    base = np.array([rng.uniform(165, 215)] * 3) + [rng.uniform(-10, 10) for _ in range(3)]
    other = base + rng.uniform(-35, 35)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:n, 0:n] / n
    t = ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta) + 0.5)[..., None]
    img = base * (1 - t) + other * t
    texture = rng.choice(["noise", "stripes", "checks"])
    nrng = np.random.default_rng(rng.randrange(2**32))
    if texture == "noise":
        img += nrng.normal(0, 7, (n // ss, n // ss, 1)).repeat(ss, 0).repeat(ss, 1)
    elif texture == "stripes":
        img += 8 * np.sin((xx + yy) * rng.uniform(20, 40))[..., None]
    else:
        img += 6 * (((xx * 8).astype(int) + (yy * 8).astype(int)) % 2 * 2 - 1)[..., None]
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if kind == "single":
        centres = [((layout[1] + 0.5) / 3, (layout[0] + 0.5) / 3)]
        radius = 0.12
    else:
        off = rng.uniform(-0.06, 0.06)
        centres = [(0.28, 0.5 + off), (0.72, 0.5 + off)] if layout == "h" else [(0.5 + off, 0.28), (0.5 + off, 0.72)]
        radius = 0.15
    for (cx, cy), obj in zip(centres, objs * (2 if kind == "twin" else 1)):
        cx, cy = (cx + rng.uniform(-0.025, 0.025)) * n, (cy + rng.uniform(-0.025, 0.025)) * n
        mask = shape_mask(obj[1], cx, cy, radius * n * rng.uniform(0.9, 1.1), rng.uniform(-0.2, 0.2), n)
        shadow = Image.new("L", (n, n))
        shadow.paste(mask.point(lambda v: v * 0.35), (2 * ss, 2 * ss))
        image.paste((40, 40, 40), mask=shadow)
        fill = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[obj[0]])
        image.paste(fill, mask=mask)
    return image.resize((px, px), Image.LANCZOS)


def shape_mask(shape, cx, cy, r, angle, n):
    mask = Image.new("L", (n, n))
    d = ImageDraw.Draw(mask)
    rot = lambda pts: [(cx + x * math.cos(angle) - y * math.sin(angle),  # noqa: E731
                        cy + x * math.sin(angle) + y * math.cos(angle)) for x, y in pts]
    if shape == "वृत्त":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "आयत":
        d.polygon(rot([(-r, -0.6 * r), (r, -0.6 * r), (r, 0.6 * r), (-r, 0.6 * r)]), fill=255)
    elif shape == "षट्भुज":
        d.polygon(rot([(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]), fill=255)
    elif shape == "अर्धचंद्र":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        d.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r], fill=0)
    elif shape == "धन चिह्न":
        w = 0.32 * r
        d.polygon(rot([(-r, -w), (r, -w), (r, w), (-r, w)]), fill=255)
        d.polygon(rot([(-w, -r), (w, -r), (w, r), (-w, r)]), fill=255)
    elif shape == "बूँद":
        d.ellipse([cx - 0.65 * r, cy - 0.3 * r, cx + 0.65 * r, cy + r], fill=255)
        d.polygon(rot([(0, -r), (0.6 * r, 0.2 * r), (-0.6 * r, 0.2 * r)]), fill=255)
    return mask


def make_split(name, out, rng, held_out, n_images=None, n_pairs=None, seen=None):
    """Draw scenes until n_images images (or n_pairs caption rows); no description repeats."""
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    rows, count = [], 0
    while (n_images and count < n_images) or (n_pairs and len(rows) < n_pairs):
        scene = random_scene(rng, held_out)
        if scene in seen:
            continue
        seen.add(scene)
        path = folder / f"{name}_{count:05d}.png"
        draw_scene(scene, rng).save(path)
        options = sorted({unicodedata.normalize("NFC", c) for c in captions(scene, rng)})
        for caption in rng.sample(options, min(len(options), rng.randint(1, 5))):
            rows.append(dict(image=str(path.resolve()), caption=caption))
        count += 1
    return pd.DataFrame(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--train-seed", type=int, default=None, help="override cfg.seed (init, order, augmentation)")
    parser.add_argument("--out", default=None, help="data folder (default: a new temp dir)")
    parser.add_argument("--epochs", type=int, default=None, help="override cfg.epochs")
    parser.add_argument("--train-pairs", type=int, default=2400)
    parser.add_argument("--hard-negatives", type=int, default=None, help="override cfg.hard_negatives")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="other_generator_"))

    rng, seen = random.Random(args.seed), set()
    train_df = make_split("train", out, rng, False, n_pairs=args.train_pairs, seen=seen)
    val_df = make_split("val", out, rng, False, n_images=round(0.1 * train_df["image"].nunique()), seen=seen)
    test_df = make_split("test", out, rng, True, n_images=200, seen=seen)
    assert test_df.groupby("caption")["image"].nunique().max() == 1, "a test caption fits two images"
    for name, df in (("train", train_df), ("val", val_df), ("test", test_df)):
        df.to_csv(out / f"{name}.csv", index=False)
        print(f"{name}: {df['image'].nunique()} images, {len(df)} captions")
    print(f"data in {out}\nsample captions:")
    for caption in pd.concat([train_df.sample(7, random_state=args.seed),
                              test_df.sample(3, random_state=args.seed)])["caption"]:
        print("  ", caption)

    overrides = {"epochs": args.epochs, "seed": args.train_seed, "hard_negatives": args.hard_negatives}
    cfg = cu.Config.quick(out_dir=str(out / "run"), **{k: v for k, v in overrides.items() if v is not None})
    model, tokenizer = cu.build_model(cfg, captions=train_df["caption"])
    t0 = time.time()
    history = cu.fit(model, tokenizer, train_df, val_df, cfg)
    fit_seconds = time.time() - t0
    metrics = cu.retrieval_metrics(model, tokenizer, test_df, cfg)
    print(f"fit_seconds: {fit_seconds:.1f}  epochs run: {len(history)} (cfg.epochs={cfg.epochs}, "
          f"max_minutes={cfg.max_minutes})")
    for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"):
        print(f"{key}: {metrics[key]:.3f}")
    print(f"chance R@1: {1 / test_df['image'].nunique():.3f}")


if __name__ == "__main__":
    main()
