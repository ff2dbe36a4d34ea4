"""Where does zero-shot on unseen colour-shape pairs break: the prompts, the text tower or the image tower?

Loads a trained quick-mode checkpoint (notebook 02's runs/quick/best by default) with notebook 01's
tables and compares single-object scenes of seen pairs (training split) with those of unseen pairs
(test split):

1. zero-shot accuracy with notebook 03's prompts, over all 48 colour-shape classes and over the
   6 held-out classes only;
2. zero-shot over the 48 classes with prompts that also name a place, as every single-object
   training caption does: averaged over the 10 places and sizes, the best-matching one of those 10,
   or the one naming the image's true place and size;
3. linear probes for shape and colour, trained on seen pairs and tested on unseen pairs, on the
   image embeddings, the image backbone's features (trained, and untrained as the baseline) and the
   caption embeddings. A probe can learn "red, so not a triangle" from the seen pairs; the caption
   embeddings, probed the same way, show how far that alone goes.

Takes about 15 s on 2 CPU cores, plus about 2 minutes with --train-seed, which first trains the
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
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clip_utils as cu  # noqa: E402

PLACES = {place: words[0] for place, (_, words) in cu._POSITIONS.items()}  # "बाएँ" -> "बाईं ओर"


def place_and_size(caption: str) -> tuple[str, str]:
    """The place and size a single-object caption names (every wording of a place is listed)."""
    place = next(p for p, (_, words) in cu._POSITIONS.items() if any(w in caption for w in words))
    size = "बड़ा" if any(w in caption for w in ("बड़ा", "बड़ी", "बड़े")) else "छोटा"
    return place, size


def place_prompts(model, tokenizer, cfg) -> tuple[list, torch.Tensor]:
    """Keys (colour, shape, size, place) and embeddings (K, D) of prompts like 'बाईं ओर एक बड़ा लाल गोला।'."""
    keys = [(colour, shape, size, place) for colour in cu._COLOURS for shape in cu._SHAPES
            for size in cu._SIZES for place in PLACES]
    texts = [f"{PLACES[place]} एक {cu._inflect(size, cu._SHAPES[shape][0][1], False)} "
             f"{cu._class_name(colour, shape)}।" for colour, shape, size, place in keys]
    return keys, cu.encode_texts(model, tokenizer, texts, cfg).float()


def zero_shot(model, tokenizer, scenes, image_embeds, cfg, prompt_keys, prompt_embeds) -> dict:
    """Accuracy of the colour-shape zero-shot classes, scored five ways (see the module docstring)."""
    classes = cu.synthetic_classes("colour_shape")
    names = list(classes)
    probs = cu.zero_shot_classify(model, tokenizer, None, classes, cfg, image_embeds=image_embeds)  # (N, 48)
    held = [names.index(cu._class_name(c, s)) for c, s in cu.HELD_OUT_PAIRS]
    result = {"notebook 03 prompts, 48 classes": probs.argmax(1).tolist(),
              "notebook 03 prompts, 6 held-out classes": [held[i] for i in probs[:, held].argmax(1).tolist()]}

    similarity = image_embeds.float() @ prompt_embeds.T  # (N, K)
    of_class = torch.tensor([names.index(cu._class_name(c, s)) for c, s, _, _ in prompt_keys])  # (K,)
    per_class = torch.stack([similarity[:, of_class == k] for k in range(len(names))], 1)  # (N, 48, 10)
    averaged = F.normalize(torch.stack([prompt_embeds[of_class == k].mean(0) for k in range(len(names))]), dim=-1)
    result["place prompts, averaged"] = (image_embeds.float() @ averaged.T).argmax(1).tolist()
    result["place prompts, best-matching"] = per_class.max(-1).values.argmax(1).tolist()
    index = {key: i for i, key in enumerate(prompt_keys)}
    true_prompts = []
    for n, caption in enumerate(scenes["caption"]):
        place, size = place_and_size(caption)
        columns = [index[(c, s, size, place)] for c in cu._COLOURS for s in cu._SHAPES]  # class order
        true_prompts.append(similarity[n, columns].argmax().item())
    result["place prompts, true place and size"] = true_prompts
    return {how: (scenes["label"] == [names[i] for i in predicted]).mean() for how, predicted in result.items()}


def probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 300) -> tuple[float, float]:
    """Train and test accuracy of a full-batch logistic regression (notebook 05's probe)."""
    names = sorted(set(train_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_t = torch.tensor([names.index(y) for y in train_y])
    torch.manual_seed(0)
    layer = torch.nn.Linear(train_x.shape[1], len(names))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(layer(train_x), train_t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = [(pd.Series([names[i] for i in layer(x).argmax(1).tolist()]) == list(y)).mean()
                    for x, y in [(train_x, train_y), (test_x, test_y)]]
    return accuracy[0], accuracy[1]


@torch.no_grad()
def backbone_features(model, paths, cfg) -> torch.Tensor:
    """The image tower's features before the projection head (notebook 05's probe input), (N, F)."""
    encoder = model.image_encoder.eval()
    transform = cu.image_transforms(cfg, train=False, mean=encoder.mean, std=encoder.std)
    pixels = torch.stack([transform(image=cu.load_image(p, cfg.image_size))["image"] for p in paths])
    return encoder(pixels.to(next(encoder.parameters()).device)).float().cpu()


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
    captions = {"seen": train[train["n_objects"] == 1], "unseen": test[test["n_objects"] == 1]}
    scenes = {split: rows.drop_duplicates("image").reset_index(drop=True) for split, rows in captions.items()}
    print(f"{args.checkpoint}: single-object scenes, {len(scenes['seen'])} of seen pairs (training split), "
          f"{len(scenes['unseen'])} of unseen pairs (test split)\n")

    prompt_keys, prompt_embeds = place_prompts(model, tokenizer, cfg)
    image_embeds = {split: cu.encode_images(model, list(s["image"]), cfg) for split, s in scenes.items()}
    table = pd.DataFrame({split: zero_shot(model, tokenizer, scenes[split], image_embeds[split], cfg,
                                           prompt_keys, prompt_embeds) for split in scenes})
    table.loc["notebook 03 prompts, 6 held-out classes", "seen"] = float("nan")  # no seen scene has one
    print("zero-shot accuracy (chance: 48 classes 0.021, 6 classes 0.167)")
    print(table.round(3).to_string(), "\n")

    untrained, _ = cu.build_model(cfg, captions=train["caption"])  # same config and seed, no training
    features = {
        "image embeddings": {s: image_embeds[s].float() for s in scenes},
        "image backbone": {s: backbone_features(model, list(scenes[s]["image"]), cfg) for s in scenes},
        "untrained image backbone": {s: backbone_features(untrained, list(scenes[s]["image"]), cfg) for s in scenes},
        "caption embeddings": {s: cu.encode_texts(model, tokenizer, list(captions[s]["caption"]), cfg).float()
                               for s in scenes},
    }
    rows = []
    for name, x in features.items():
        labels = captions if name.startswith("caption") else scenes
        seen, unseen = labels["seen"], labels["unseen"]
        for attribute in ("shape", "colour"):
            train_acc, unseen_acc = probe_accuracy(x["seen"], list(seen[attribute]), x["unseen"], list(unseen[attribute]))
            rows.append({"features": name, "probe": attribute, "seen pairs (trained on)": train_acc,
                         "unseen pairs": unseen_acc})
    print("linear probes trained on seen pairs (chance: shape 0.167, colour 0.125)")
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
