"""Random batches against batches of look-alike images (cfg.hard_negatives), on the quick synthetic set.

Trains Config.quick() on notebook 01's tables once per (group size, seed) and prints, side by side,
test text-to-image recall (every test scene holds a colour-shape pair unseen in training) and the
zero-shot accuracy of notebook 03 on the single-object test scenes: 48 colour-shape classes, and
the shape and colour alone. Each run takes about 2 minutes on 2 CPU cores.

    python benchmarks/hard_negatives.py [--groups 0 4] [--seeds 42 1 2] [--data data/quick]
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
import pandas as pd  # noqa: E402

import clip_utils as cu  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[0, 4], help="cfg.hard_negatives values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="training seeds")
    parser.add_argument("--data", default=str(ROOT / "data" / "quick"), help="quick-mode data folder")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
