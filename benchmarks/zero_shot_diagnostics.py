"""Why zero-shot fails on the quick synthetic scenes: the diagnostics behind docs/zero_shot_on_synthetic_scenes.md.

Three subcommands, each printing one table of that document:

    python benchmarks/zero_shot_diagnostics.py attribute-transfer [--checkpoint runs/quick/best | --train-seed S]
    python benchmarks/zero_shot_diagnostics.py shape-probe [--epochs 25] [--n-images 2400] [--seeds 0 1 2]
    python benchmarks/zero_shot_diagnostics.py hard-negatives [--groups 0 4] [--seeds 42 1 2]

attribute-transfer (about 10 s on notebook 02's checkpoint; 2 minutes more with --train-seed): zero-shot
accuracy of single-object scenes in three groups (seen pairs trained on, seen pairs in new scenes, unseen
pairs) as the prompts get more and more help: notebook 03's prompts; prompts naming a place, averaged, best
or true; the shape alone given the true colour, place and size.
shape-probe (about 30 s per run): trains the quick image backbone with a linear shape head on single-object
training scenes and tests it on scenes whose colour-shape pairs never occur in training (colour and grayscale).
hard-negatives (about 2 minutes per run): random batches against batches of look-alike images
(cfg.hard_negatives), test recall and notebook 03's zero-shot accuracy side by side.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clip_utils as cu  # noqa: E402

# -- attribute-transfer ------------------------------------------------------------

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


def attribute_transfer(args):
    """Zero-shot accuracy by group and by how much the prompts are told."""
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


# -- shape-probe -------------------------------------------------------------------

SHAPES = list(cu.synthetic_classes("shape"))



def single_objects(df):
    return df[df["n_objects"] == 1].drop_duplicates("image").reset_index(drop=True)


def pixels(arrays, transform, gray):
    """(N, 3, H, W) tensors of decoded images through `transform`; channels averaged if `gray`."""
    images = torch.stack([transform(image=a)["image"] for a in arrays])
    return images.mean(1, keepdim=True).expand_as(images).contiguous() if gray else images


def accuracy(model, images, labels):
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def probe(train, test, cfg, gray, epochs, seed):
    """Train a shape classifier; returns (train accuracy, held-out accuracy averaged over the last 5 epochs)."""
    torch.manual_seed(seed)
    model = timm.create_model(cfg.image_model, pretrained=False, num_classes=len(SHAPES), **cfg.image_model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.image_encoder_lr)
    train_arrays = [cu.load_image(p, cfg.image_size) for p in train["image"]]  # decoded once
    test_arrays = [cu.load_image(p, cfg.image_size) for p in test["image"]]
    labels = torch.tensor([SHAPES.index(s) for s in train["shape"]])
    evaluate = cu.image_transforms(cfg, train=False)
    test_images = pixels(test_arrays, evaluate, gray)
    test_labels = torch.tensor([SHAPES.index(s) for s in test["shape"]])
    augment = cu.image_transforms(cfg, train=True)
    held_out = []
    for epoch in range(epochs):
        augment.set_random_seed(cfg.seed + epoch)  # a fresh augmentation every epoch, as in fit
        images = pixels(train_arrays, augment, gray)
        model.train()
        for batch in torch.randperm(len(images)).split(cfg.batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        held_out.append(accuracy(model, test_images, test_labels))
    return accuracy(model, pixels(train_arrays, evaluate, gray), labels), sum(held_out[-5:]) / len(held_out[-5:])


def shape_probe(args):
    """Held-out shape accuracy of a supervised probe, colour and grayscale input."""

    cfg = cu.Config.quick()
    with tempfile.TemporaryDirectory() as folder:
        train, _, test = (single_objects(df) for df in cu.prepare_quick_data(folder, n_images=args.n_images))
        print(f"{len(train)} single-object training scenes; {len(test)} test scenes, all with a held-out pair "
              f"(chance {1 / len(SHAPES):.2f})")
        rows = []
        for gray in (False, True):
            for seed in args.seeds:
                start = time.time()
                train_acc, held_out_acc = probe(train, test, cfg, gray, args.epochs, seed)
                rows.append(dict(input="grayscale" if gray else "colour", seed=seed, train_accuracy=train_acc,
                                 held_out_accuracy=held_out_acc, seconds=time.time() - start))
                print(f"{rows[-1]['input']:9s} seed {seed}: train {train_acc:.3f}  held-out {held_out_acc:.3f}  "
                      f"({rows[-1]['seconds']:.0f} s)")
    table = pd.DataFrame(rows)
    print("\nmean over seeds (held-out accuracy: mean of the last 5 epochs):")
    print(table.groupby("input", sort=False)[["train_accuracy", "held_out_accuracy"]].mean().round(3).to_string())


# -- hard-negatives ----------------------------------------------------------------

def zero_shot_accuracy(model, tokenizer, single, cfg) -> dict:
    """Notebook 03's measure: each kind of class, the share of images whose top class is right.

    Args:
        model, tokenizer, cfg: a trained quick-mode run.
        single: the single-object test scenes, one row per image, with label/shape/colour columns.
    """
    image_embeds = cu.encode_images(model, list(single["image"]), cfg)
    accuracy = {}
    for kind, column in [("colour_shape", "label"), ("shape", "shape"), ("colour", "colour")]:
        classes = cu.synthetic_classes(kind)
        probs = cu.zero_shot_classify(model, tokenizer, None, classes, cfg, image_embeds=image_embeds)
        predicted = [list(classes)[i] for i in probs.argmax(1).tolist()]
        accuracy[f"zs_{kind}"] = (single[column] == predicted).mean()
    return accuracy


def hard_negatives(args):
    """Test recall and zero-shot accuracy for random against look-alike batches."""
    train, val, test = cu.prepare_quick_data(args.data)
    single = test[test["n_objects"] == 1].drop_duplicates("image").reset_index(drop=True)
    rows = []
    for seed in args.seeds:
        for group in args.groups:
            cfg = cu.Config.quick(hard_negatives=group, seed=seed, out_dir=tempfile.mkdtemp(prefix="hard_negatives_"))
            model, tokenizer = cu.build_model(cfg, captions=train["caption"])
            start = time.time()
            history = cu.fit(model, tokenizer, train, val, cfg)
            fit_seconds = time.time() - start
            metrics = cu.retrieval_metrics(model, tokenizer, test, cfg)
            rows.append(dict(hard_negatives=group, seed=seed, fit_s=round(fit_seconds),
                             epochs=len(history), **{k: metrics[k] for k in ("t2i_R@1", "t2i_R@5")},
                             **zero_shot_accuracy(model, tokenizer, single, cfg)))
            print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{test['image'].nunique()} test images, {len(single)} single-object ones for zero-shot")
    print(table.round(3).to_string(index=False))
    print("\nmean over seeds:")
    print(table.drop(columns="seed").groupby("hard_negatives").mean().round(3).to_string())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("attribute-transfer", help="zero-shot on seen vs unseen pairs, prompts told more")
    command.add_argument("--checkpoint", default=str(ROOT / "runs" / "quick" / "best"), help="a quick-mode run")
    command.add_argument("--data", default=str(ROOT / "data" / "quick"), help="notebook 01's tables")
    command.add_argument("--train-seed", type=int, help="train Config.quick(seed=S) first (about 2 minutes)")
    command.set_defaults(run=attribute_transfer)
    command = commands.add_parser("shape-probe", help="a supervised shape probe of the quick image tower")
    command.add_argument("--epochs", type=int, default=25)
    command.add_argument("--n-images", type=int, default=2400, help="scenes to draw; about 40 %% have one object")
    command.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    command.set_defaults(run=shape_probe)
    command = commands.add_parser("hard-negatives", help="random batches against batches of look-alikes")
    command.add_argument("--groups", type=int, nargs="+", default=[0, 4], help="cfg.hard_negatives values")
    command.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="training seeds")
    command.add_argument("--data", default=str(ROOT / "data" / "quick"), help="quick-mode data folder")
    command.set_defaults(run=hard_negatives)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
