"""Search latency over large cached galleries: search_images on 10k, 100k and 1M random unit embeddings.

For each gallery size the embeddings (dimension 256) are held in memory, as embed_gallery returns
them and a long-running search service would keep them. Each query goes through search_images
with a quick-mode text tower, so the time includes tokenising and encoding the Hindi query.
Reported: median and p95 per query, the part spent scanning the gallery (top_k_scores alone),
and the gallery's memory. float16 (the cache default) and float32 side by side.

    python benchmarks/search_latency.py [--sizes 10000 100000 1000000] [--queries 50]
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import clip_utils as cu  # noqa: E402

QUERIES = ["घास पर कुत्ता", "पानी में खेलते बच्चे", "एक बड़ा लाल त्रिभुज", "सड़क पर साइकिल चलाता आदमी",
           "बर्फ़ से ढके पहाड़", "समुद्र किनारे दौड़ती लड़की"]


def median_p95(seconds):
    return np.median(seconds) * 1000, np.percentile(seconds, 95) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()

    cfg = cu.Config.quick(projection_dim=args.dim)
    model, tokenizer = cu.build_model(cfg, captions=QUERIES)
    model.eval()
    query = cu.encode_texts(model, tokenizer, [QUERIES[0]], cfg)[0]
    rng = np.random.default_rng(0)
    rows = []
    print(f"{torch.get_num_threads()} threads; {args.queries} queries per gallery; dimension {args.dim}")
    for size in args.sizes:
        embeds = rng.standard_normal((size, args.dim), dtype=np.float32)
        embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
        images = [f"photo_{i:07d}.jpg" for i in range(size)]
        for dtype in (np.float16, np.float32):
            gallery = torch.from_numpy(embeds.astype(dtype))
            cu.search_images(QUERIES[0], model, tokenizer, images, cfg, k=10, image_embeds=gallery)  # warm-up
            total, scan = [], []
            for i in range(args.queries):
                start = time.perf_counter()
                cu.search_images(QUERIES[i % len(QUERIES)], model, tokenizer, images, cfg, k=10, image_embeds=gallery)
                total.append(time.perf_counter() - start)
            for i in range(args.queries):
                start = time.perf_counter()
                cu.top_k_scores(gallery, query, 10)
                scan.append(time.perf_counter() - start)
            (med, p95), (scan_med, scan_p95) = median_p95(total), median_p95(scan)
            rows.append(dict(gallery=size, dtype=np.dtype(dtype).name, median_ms=med, p95_ms=p95,
                             scan_median_ms=scan_med, scan_p95_ms=scan_p95,
                             memory_mb=gallery.element_size() * gallery.nelement() / 2**20))
            print(pd.DataFrame(rows[-1:]).round(2).to_string(index=False, header=len(rows) == 1))
    print("\nsummary (ms per query, including query encoding):")
    print(pd.DataFrame(rows).round(2).to_string(index=False))


if __name__ == "__main__":
    main()
