"""clip_loss against the published soft_target_loss: same data, same model, same time budget.

    python benchmarks/compare_losses.py [--minutes 1.5] [--n-images 1200]

Prints one row per loss: recall on the held-out test split (unseen colour-shape pairs),
and how spread out the image embeddings are (a collapsed model maps every image to one point).
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import clip_utils as cu  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.5, help="training budget per loss")
    parser.add_argument("--n-images", type=int, default=1200)
    parser.add_argument("--data", default="data/quick")
    args = parser.parse_args()

    train, val, test = cu.prepare_quick_data(args.data, n_images=args.n_images)
    rows = []
    for loss in ("clip", "soft_target"):
        cfg = cu.Config.quick(loss=loss, max_minutes=args.minutes, epochs=100, out_dir=f"runs/compare_{loss}")
        model, tokenizer = cu.build_model(cfg, captions=train["caption"])
        start = time.time()
        history = cu.fit(model, tokenizer, train, val, cfg)
        seconds = time.time() - start
        metrics = cu.retrieval_metrics(model, tokenizer, test, cfg)
        image_embeds = cu.encode_images(model, list(test["image"].unique()), cfg)
        off_diagonal = (image_embeds @ image_embeds.T).fill_diagonal_(float("nan"))
        rows.append(dict(loss=loss, epochs=len(history), seconds=round(seconds),
                         **{k: round(metrics[k], 3) for k in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5")},
                         mean_image_cosine=round(off_diagonal.nanmean().item(), 3)))
    import pandas as pd

    print(pd.DataFrame(rows).to_string(index=False))
    print(f"(test split: {test['image'].nunique()} images, chance R@1 = {1 / test['image'].nunique():.3f})")


if __name__ == "__main__":
    main()
