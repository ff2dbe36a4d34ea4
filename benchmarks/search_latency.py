"""Search latency at scale: the exact scan (float32, float16) against the faiss index, side by side.

For each gallery size (10k, 100k, 1M embeddings of dimension 256, held in memory as embed_gallery
returns them) and each kind of gallery, one run reports per method:
  search_ms   median and p95 of the search alone (top_k_scores or search_index), one query at a time;
  call_ms     median and p95 of a whole search_images call (Hindi query through a quick-mode text tower);
  memory_mb   what the method holds (the embeddings, or the index); build_s  time to build the index;
  recall@10   share of the exact float32 top-10 that the method returns, on the same queries.
The query encoding alone is timed separately and printed first.

Galleries: "clustered" (default bar) draws unit vectors around 2,000 random directions, so photos of the
same kind of thing are neighbours (cosine about 0.5 within a cluster, about 0 across), as real embeddings
are; "random" draws uniform unit vectors, the worst case for any approximate index: in 256 dimensions
every point is almost equally far from every other, so "the nearest 10" barely differ from the rest.
The search queries are new draws from the same distribution as their gallery.

    python benchmarks/search_latency.py [--sizes 10000 100000 1000000] [--queries 100] [--galleries clustered random]
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import clip_utils as cu  # noqa: E402
from clip_utils.scale.index import exact_top_k  # noqa: E402

QUERIES = ["घास पर कुत्ता", "पानी में खेलते बच्चे", "एक बड़ा लाल त्रिभुज", "सड़क पर साइकिल चलाता आदमी",
           "बर्फ़ से ढके पहाड़", "समुद्र किनारे दौड़ती लड़की"]
N_CLUSTERS = 2_000


def unit_vectors(rng, n, dim, kind, centers=None, chunk=1 << 17):
    """(n, dim) float32 unit vectors: uniform ("random") or around `centers` ("clustered")."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        if kind == "clustered":  # noise as long as the centre: same-cluster cosine about 0.5
            rows = centers[rng.integers(0, len(centers), len(rows))] + rows / np.sqrt(dim)
        out[start:start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def median_p95(seconds):
    return np.median(seconds) * 1000, np.percentile(seconds, 95) * 1000


def time_each(fn, items):
    """Seconds per call and the calls' results, after one warm-up call."""
    fn(items[0])
    seconds, results = [], []
    for item in items:
        start = time.perf_counter()
        results.append(fn(item))
        seconds.append(time.perf_counter() - start)
    return seconds, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--galleries", nargs="+", default=["clustered", "random"], choices=["clustered", "random"])
    args = parser.parse_args()

    cfg = cu.Config.quick(projection_dim=args.dim)
    model, tokenizer = cu.build_model(cfg, captions=QUERIES)
    model.eval()
    texts = [QUERIES[i % len(QUERIES)] for i in range(args.queries)]
    with torch.inference_mode():
        encode_s, _ = time_each(lambda q: cu.encode_texts(model, tokenizer, [q], cfg), texts)
    print(f"{torch.get_num_threads()} torch threads, {faiss.omp_get_max_threads()} faiss threads "
          f"(one per query while searching); {args.queries} queries; dimension {args.dim}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes slow every number)")
    print("query encoding alone (quick-mode text tower): median {:.2f} ms, p95 {:.2f} ms\n".format(
        *median_p95(encode_s)))
    rows = []
    for gallery_kind in args.galleries:
        rng = np.random.default_rng(0)
        centers = unit_vectors(rng, N_CLUSTERS, args.dim, "random")
        for size in args.sizes:
            embeds = unit_vectors(rng, size, args.dim, gallery_kind, centers)  # (N, D)
            queries = torch.from_numpy(unit_vectors(rng, args.queries, args.dim, gallery_kind, centers))  # (Q, D)
            truth = exact_top_k(embeds, queries, 10).tolist()  # (Q, 10) exact float32 top-10
            images = [f"photo_{i:07d}.jpg" for i in range(size)]
            methods = {}
            for dtype in (torch.float32, torch.float16):
                gallery = torch.from_numpy(embeds).to(dtype)
                methods[f"exact {str(dtype)[6:]}"] = dict(
                    search=lambda q, g=gallery: cu.top_k_scores(g, q, 10)[1],
                    call=lambda t, g=gallery: cu.search_images(t, model, tokenizer, images, cfg, k=10, image_embeds=g),
                    memory=gallery.nbytes, build=0.0)
            auto = cu.index_kind(size)
            for kind in (["exact", "ivf"] if auto == "exact" else ["ivf"]):
                start = time.perf_counter()
                index = cu.build_index(embeds, kind=kind)
                build = time.perf_counter() - start
                methods[f"faiss {kind}" + (" (auto)" if kind == auto else "")] = dict(
                    search=lambda q, ix=index: cu.search_index(ix, q, 10)[1],
                    call=lambda t, ix=index: cu.search_images(t, model, tokenizer, images, cfg, k=10, index=ix),
                    memory=len(faiss.serialize_index(index)), build=build)
            for name, method in methods.items():
                with torch.inference_mode():
                    search_s, found = time_each(method["search"], list(queries))
                    call_s, _ = time_each(method["call"], texts)
                recall = np.mean([len(set(f.tolist()) & set(t)) / 10 for f, t in zip(found, truth)])
                (s_med, s_p95), (c_med, c_p95) = median_p95(search_s), median_p95(call_s)
                rows.append(dict(gallery=gallery_kind, size=size, method=name, search_median_ms=s_med,
                                 search_p95_ms=s_p95, call_median_ms=c_med, call_p95_ms=c_p95,
                                 memory_mb=method["memory"] / 2**20, build_s=method["build"], recall_at_10=recall))
                print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
            del methods, embeds
    table = pd.DataFrame(rows)
    print("\nsummary (ms per query; call = whole search_images, query encoding included):")
    print(table.round(3).to_string(index=False))
    print("\nbars:")
    for gallery_kind in args.galleries:
        index_rows = table[(table["gallery"] == gallery_kind) & table["method"].str.endswith("(auto)")]
        for size, met in [(1_000_000, "search median < 5 ms and recall@10 >= 0.95"), (100_000, "call median < 5 ms")]:
            row = index_rows[index_rows["size"] == size]
            if len(row):
                row = row.iloc[0]
                ok = (row.search_median_ms < 5 and row.recall_at_10 >= 0.95) if size == 1_000_000 \
                    else row.call_median_ms < 5
                print(f"  {gallery_kind} {size:>9,} {row.method}: {met}: {'met' if ok else 'NOT met'} "
                      f"(search {row.search_median_ms:.2f} ms, call {row.call_median_ms:.2f} ms, "
                      f"recall@10 {row.recall_at_10:.3f})")


if __name__ == "__main__":
    main()
