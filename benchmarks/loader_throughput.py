"""Loader-only throughput: the decode-once cache (cfg.image_cache) against decoding every JPEG every epoch.

Both loaders are clip_utils.make_loader(train=True) over the same table of COCO-sized photos
(640x480 JPEGs, quality 90, ~100 KB each, 5 captions per photo), at the same image size, with the
same augmentation, tokenisation and collation; only where the pixels come from differs. Each is timed
over whole epochs, alternating uncached and cached so that background load hits both alike; the
cache is built once before (its cost is printed apart: it is paid once per table and size).

    python benchmarks/loader_throughput.py                    # 224 px, 300 photos, 3 rounds: ~2 min on 2 cores
    python benchmarks/loader_throughput.py --workers 2              # as fit loads on a GPU
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

import clip_utils as cu  # noqa: E402


def photo(rng, height=480, width=640) -> np.ndarray:
    """A photo-like image: soft coloured blobs (smooth regions and edges) plus sensor-like noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(30, 200)
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 255, 3)
    image = image / image.max() * 255 + rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def epoch(loader) -> tuple[float, int]:
    start, rows = time.perf_counter(), 0
    for batch in loader:
        rows += len(batch["input_ids"])
    return time.perf_counter() - start, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each loader, alternating")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (fit uses cfg.num_workers=2 "
                        "on a GPU, none on a CPU)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.photos):
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(photo(rng)).save(path, quality=90)
        paths.append(str(path))
    words = "एक कुत्ता घास पर दौड़ रहा है लाल गेंद के साथ बच्चा खेल रही पानी में".split()
    table = pd.DataFrame(dict(image=[p for p in paths for _ in range(5)],
                              caption=[" ".join(rng.choice(words, 10)) for _ in range(5 * len(paths))]))
    size_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    plain_cfg = cu.Config.quick(image_size=args.image_size, batch_size=32, device="cpu")
    cached_cfg = cu.Config.quick(image_size=args.image_size, batch_size=32, device="cpu",
                                 image_cache=str(folder / "cache"))
    _, tokenizer = cu.build_model(plain_cfg, captions=table["caption"])
    start = time.perf_counter()
    cached = cu.make_loader(table, tokenizer, cached_cfg, train=True)
    build = time.perf_counter() - start
    plain = cu.make_loader(table, tokenizer, plain_cfg, train=True)
    if args.workers:  # the same loaders, with the worker processes fit gives them on a GPU
        import torch

        plain, cached = (torch.utils.data.DataLoader(
            loader.dataset, batch_sampler=loader.batch_sampler, num_workers=args.workers,
            worker_init_fn=loader.worker_init_fn, collate_fn=loader.collate_fn) for loader in (plain, cached))
    times = {"decode every epoch": [], "decode-once cache": []}
    for _ in range(args.rounds):
        for name, loader in (("decode every epoch", plain), ("decode-once cache", cached)):
            seconds, rows = epoch(loader)
            times[name].append(rows / seconds)
    print(f"{args.photos} photos 640x480 (~{size_kb:.0f} KB JPEG), {len(table)} captions, {args.image_size} px, "
          f"batch 32, {args.workers or 'no'} worker processes, {os.cpu_count()} cores; "
          f"cache built once in {build:.1f} s "
          f"({os.path.getsize(cached.dataset.cache) / 2**20:.0f} MB)")
    print("| loader | images/s (median of rounds) | rounds |")
    print("|---|---|---|")
    for name, rates in times.items():
        print(f"| {name} | {np.median(rates):.0f} | {', '.join(f'{r:.0f}' for r in rates)} |")
    ratio = np.median(times["decode-once cache"]) / np.median(times["decode every epoch"])
    print(f"speed-up: {ratio:.1f}x")


if __name__ == "__main__":
    main()
