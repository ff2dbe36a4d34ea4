"""Does the quick image tower recognise a shape in a colour it never saw it in? A supervised probe.

Zero-shot on held-out colour-shape pairs fails mostly on shape (README, "What quick mode learns").
This script asks whether the image tower could learn colour-independent shapes at all, without
the contrastive loss in the way: it trains Config.quick()'s image backbone (random init, fit's
augmentation, reseeded each epoch as fit does) with a linear 6-way shape head on average-pooled
features, on the single-object training scenes, and tests
it on the single-object test scenes, whose colour-shape pairs never occur in training. The same
run on grayscale copies of the images (colour removed) is printed for comparison.

    python benchmarks/shape_probe.py [--epochs 25] [--n-images 2400] [--seeds 0 1 2]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clip_utils as cu  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--n-images", type=int, default=2400, help="scenes to draw; about 40 %% have one object")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
