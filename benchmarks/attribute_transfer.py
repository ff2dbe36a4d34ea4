"""Why does zero-shot fail on unseen colour-shape pairs: the prompts, the shapes, or the unseen pairs?

Loads a trained quick-mode checkpoint (notebook 02's runs/quick/best by default) with notebook 01's
tables and scores zero-shot classification of single-object scenes in three groups: seen pairs the
model trained on (training split), seen pairs in new scenes (validation split) and unseen pairs
(test split). The prompts get more and more help:

1. notebook 03's prompts, which name no place, over all 48 colour-shape classes, and over only the
   6 held-out classes;
2. prompts that name a place, as every single-object training caption does: each class averaged
   over its 10 places and sizes (zero_shot_classify), or the best-matching of the 10, or the one
   naming the scene's true place and size;
3. the shape alone: 6 prompts naming the scene's true colour, place and size, one per shape.

Takes about 10 s on 2 CPU cores, plus about 2 minutes with --train-seed, which first trains the
default quick recipe with that seed instead of loading the checkpoint.

    python benchmarks/attribute_transfer.py [--checkpoint runs/quick/best | --train-seed S] [--data data/quick]
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import clip_utils as cu  # noqa: E402

PAIRS = [(colour, shape) for colour in cu.synthetic._COLOURS for shape in cu.synthetic._SHAPES]  # the 48 classes
SIZES = list(cu.synthetic._SIZES)
PLACES = list(cu.synthetic._POSITIONS)


def place_prompt(colour: str, shape: str, size: str, place: str) -> str:
    """A single-object training caption's simplest wording, e.g. 'बाईं ओर एक बड़ी नीली पतंग।'."""
    size_word = cu.synthetic._inflect(size, cu.synthetic._SHAPES[shape][0][1], False)
    return f"{cu.synthetic._POSITIONS[place][1][0]} एक {size_word} {cu.synthetic._class_name(colour, shape)}।"


def size_and_place(caption: str) -> tuple[int, int]:
    """Indices into SIZES and PLACES of what a single-object caption says (any of its wordings)."""
    big_words = {cu.synthetic._inflect("बड़ा", gender, plural) for gender in "mf" for plural in (False, True)}
    size = SIZES.index("बड़ा" if any(word in big_words for word in caption.split()) else "छोटा")
    place = next(i for i, p in enumerate(PLACES) if any(w in caption for w in cu.synthetic._POSITIONS[p][1]))
    return size, place


def zero_shot_hits(model, tokenizer, scenes: pd.DataFrame, cfg) -> pd.DataFrame:
    """One row per single-object scene, one column per way of prompting: True where the top class is right."""
    names = [cu.synthetic._class_name(colour, shape) for colour, shape in PAIRS]
    image_embeds = cu.encode_images(model, list(scenes["image"]), cfg).float()  # (N, D)
    predicted = {}

    classes = cu.synthetic_classes("colour_shape")
    probs = cu.zero_shot_classify(model, tokenizer, None, {n: classes[n] for n in names}, cfg,
                                  image_embeds=image_embeds)  # (N, 48)
    predicted["notebook 03 prompts, 48 classes"] = probs.argmax(1).numpy()
    held_out = np.array([names.index(cu.synthetic._class_name(c, s)) for c, s in cu.HELD_OUT_PAIRS])
    predicted["notebook 03 prompts, only the 6 held-out classes"] = held_out[probs[:, held_out].argmax(1).numpy()]

    # class by class, then size, then place: the order of the .view below
    prompts = {name: [place_prompt(c, s, size, place) for size in SIZES for place in PLACES]
               for name, (c, s) in zip(names, PAIRS)}
    probs = cu.zero_shot_classify(model, tokenizer, None, prompts, cfg, image_embeds=image_embeds)
    predicted["place prompts, averaged over places and sizes"] = probs.argmax(1).numpy()
    prompt_embeds = cu.encode_texts(model, tokenizer, sum(prompts.values(), []), cfg).float()
    similarity = (image_embeds @ prompt_embeds.T).view(len(scenes), len(PAIRS), len(SIZES), len(PLACES))
    predicted["place prompts, best-matching place and size"] = similarity.flatten(2).amax(-1).argmax(1).numpy()

    true_size, true_place = torch.tensor([size_and_place(caption) for caption in scenes["caption"]]).T  # (N,)
    at_true_size_and_place = similarity[torch.arange(len(scenes)), :, true_size, true_place]  # (N, 48)
    predicted["place prompts, the true place and size"] = at_true_size_and_place.argmax(1).numpy()
    same_colour = torch.tensor([[c == colour for c, _ in PAIRS] for colour in scenes["colour"]])  # (N, 48)
    other_colours_out = at_true_size_and_place.masked_fill(~same_colour, -2.0)  # cosines are >= -1
    predicted["shape only: true colour, place and size"] = other_colours_out.argmax(1).numpy()

    truth = np.array([names.index(label) for label in scenes["label"]])
    return pd.DataFrame({how: predicted_classes == truth for how, predicted_classes in predicted.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "quick" / "best"), help="a quick-mode run")
    parser.add_argument("--data", default=str(ROOT / "data" / "quick"), help="notebook 01's tables")
    parser.add_argument("--train-seed", type=int, help="train Config.quick(seed=S) first (about 2 minutes)")
    args = parser.parse_args()
    train, val, test = cu.prepare_quick_data(args.data)
    if args.train_seed is not None:
        cfg = cu.Config.quick(seed=args.train_seed, out_dir=tempfile.mkdtemp(prefix="attribute_transfer_"))
        model, tokenizer = cu.build_model(cfg, captions=train["caption"])
        cu.fit(model, tokenizer, train, val, cfg)
        args.checkpoint = str(Path(cfg.out_dir) / "best")
    if not (Path(args.checkpoint) / "model.safetensors").exists():
        sys.exit(f"No checkpoint in {args.checkpoint}: run notebook 02 (or bash run_all.sh) first")
    model, tokenizer, cfg = cu.load_checkpoint(args.checkpoint)

    # All three groups in one table, so images and the 480 prompts are encoded once.
    groups = {"seen pairs, trained on": train, "seen pairs, new scenes": val, "unseen pairs": test}
    scenes = pd.concat([split.assign(group=group) for group, split in groups.items()])
    scenes = scenes[scenes["n_objects"] == 1].drop_duplicates("image").reset_index(drop=True)
    counts = scenes["group"].value_counts()
    group_names = scenes["group"].map(lambda group: f"{group} ({counts[group]})")
    table = zero_shot_hits(model, tokenizer, scenes, cfg).groupby(group_names, sort=False).mean().T
    table.columns.name = None
    only_held_out = "notebook 03 prompts, only the 6 held-out classes"
    table.loc[only_held_out, table.columns[:2]] = np.nan  # a seen pair is never one of them: always wrong
    print(f"{args.checkpoint}: zero-shot accuracy on single-object scenes (number of scenes in brackets)")
    print("chance: 48 classes 0.021; 6 classes (held-out pairs, or shapes) 0.167\n")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
