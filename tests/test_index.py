"""The search index: exact where it must be, recall measured, rebuilt for new embeddings, saved and reloaded."""
import os
import shutil

import numpy as np
import pytest
import torch

import clip_utils as cu

pytest.importorskip("faiss")


def _unit(x):
    return torch.nn.functional.normalize(x, dim=1)


def _clustered(n, dim=32, n_clusters=50, seed=0):
    """Unit vectors around a few random directions, like embeddings of photos of a few kinds of things."""
    g = torch.Generator().manual_seed(seed)
    centers = _unit(torch.randn(n_clusters, dim, generator=g))
    return _unit(centers[torch.randint(n_clusters, (n,), generator=g)] + torch.randn(n, dim, generator=g) / dim**0.5)


def test_small_galleries_get_the_exact_top_k():
    gallery = _clustered(500)
    queries = _clustered(20, seed=1)
    exact = cu.build_index(gallery)  # 500 images: "auto" chooses the exact index
    assert exact.ntotal == 500 and "Flat" in type(exact).__name__
    # An IVF that scans all its clusters must find exactly what the scan finds, float16 storage or not.
    full_ivf = cu.build_index(gallery, kind="ivf", nprobe=10_000)
    for query in queries:
        want_scores, want = cu.top_k_scores(gallery, query, k=7)
        for index in (exact, full_ivf):
            scores, got = cu.search_index(index, query, k=7)
            assert got.tolist() == want.tolist()
            assert torch.allclose(scores, want_scores, atol=1e-3)
    scores, got = cu.search_index(exact, queries[0], k=900)  # more than the gallery holds: all of it, ranked
    assert len(got) == 500 and torch.all(scores[:-1] >= scores[1:])
    with pytest.raises(ValueError, match="index kind must be one of"):
        cu.build_index(gallery, kind="hnsw")


def test_one_exact_scan_for_one_query_or_many_in_chunks():
    gallery, queries = _clustered(1_000).half(), _clustered(5, seed=1)  # float16, as embed_gallery stores it
    truth = queries @ gallery.float().T  # (5, 1000)
    want = truth.topk(9, dim=1)
    scores, indices = cu.scale.index.exact_top_k(gallery.numpy(), queries, 9, chunk_size=128)  # a memory map's type
    assert torch.equal(indices, want.indices) and torch.allclose(scores, want.values, atol=1e-6)
    one_scores, one = cu.top_k_scores(gallery, queries[2], k=9, chunk_size=100)  # the lesson's name, one query
    assert torch.equal(one, want.indices[2]) and torch.allclose(one_scores, want.values[2], atol=1e-6)
    empty_scores, empty = cu.top_k_scores(gallery[:0], queries[0], k=3)
    assert empty_scores.shape == empty.shape == (0,)


def test_recall_is_measured_not_assumed():
    gallery, queries = _clustered(20_000), _clustered(100, seed=1)
    assert cu.index_recall(cu.build_index(gallery, kind="exact"), gallery, queries) == 1.0
    ivf = cu.build_index(gallery, kind="ivf")  # 141 clusters, 32 scanned per query
    recall = cu.index_recall(ivf, gallery, queries, k=10)
    assert recall >= 0.95
    ivf.nprobe = 1  # one cluster per query: true neighbours in the next cluster are missed, and it shows
    assert cu.index_recall(ivf, gallery, queries, k=10) < recall
    scrambled = cu.build_index(gallery[torch.randperm(len(gallery), generator=torch.Generator().manual_seed(0))],
                               kind="exact")  # same vectors, other order: its row numbers name other images
    assert cu.index_recall(scrambled, gallery, queries) < 0.05
    with pytest.raises(ValueError, match="measure it against the embeddings it was built from"):
        cu.index_recall(ivf, gallery[:100], queries)


def test_save_and_load_round_trip(tmp_path):
    gallery, queries = _clustered(5_000).half(), _clustered(10, seed=1)  # float16, as embed_gallery stores it
    index = cu.build_index(gallery, kind="ivf", nprobe=7)
    path = cu.save_index(index, tmp_path / "sub" / "gallery.faiss")
    again = cu.load_index(path, n_images=5_000, dim=32)
    assert again.nprobe == 7 and again.ntotal == 5_000
    for a, b in zip(cu.search_index(index, queries, 10), cu.search_index(again, queries, 10)):
        assert torch.equal(a, b)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["gallery.faiss"]  # no temporary file left
    with pytest.raises(ValueError, match="not 4000 of 32"):
        cu.load_index(path, n_images=4_000, dim=32)


def test_an_index_for_other_embeddings_is_rebuilt_not_reused(tmp_path, synthetic, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    images = [shutil.copy(p, tmp_path) for p in synthetic[1]["image"].unique()[:6]]
    cache = tmp_path / "cache"
    first, index = cu.embed_gallery(model, images, tiny_cfg, cache_dir=cache, index="auto")
    [saved] = cache.glob("gallery-*-exact.faiss")  # 6 images: the exact index, named like the cache
    assert saved.name.startswith(next(cache.glob("gallery-*.npy")).stem)
    _, reused = cu.embed_gallery(model, images, tiny_cfg, cache_dir=cache, index="auto")
    assert reused.ntotal == 6 and len(list(cache.glob("*.faiss"))) == 1
    with torch.no_grad():
        model.image_projection.layer_norm.bias.add_(0.5)  # "retrained": other embeddings
    try:
        changed, rebuilt = cu.embed_gallery(model, images, tiny_cfg, cache_dir=cache, index="auto")
    finally:
        with torch.no_grad():
            model.image_projection.layer_norm.bias.sub_(0.5)
    assert len(list(cache.glob("*.faiss"))) == 2 and not torch.equal(changed, first)
    query = _unit(torch.randn(1, changed.shape[1]))[0]
    assert cu.search_index(rebuilt, query, 6)[1].tolist() == cu.top_k_scores(changed, query, 6)[1].tolist()
    # Embeddings rewritten after their index (a deleted cache recomputed): the old index is stale, so rebuilt.
    npy = next(p for p in cache.glob("*.npy") if saved.name.startswith(p.stem))
    stale = npy.stat().st_mtime_ns - 10**9
    os.utime(saved, ns=(stale, stale))
    cu.embed_gallery(model, images, tiny_cfg, cache_dir=cache, index="auto")
    assert saved.stat().st_mtime_ns >= npy.stat().st_mtime_ns > stale
    # search_images refuses an index over a different gallery instead of returning the wrong images.
    with pytest.raises(ValueError, match="the index holds 6 images but the gallery has 5"):
        cu.search_images("एक लाल गोला", model, tokenizer, images[:5], tiny_cfg, index=index)
    hits = cu.search_images("एक लाल गोला", model, tokenizer, images, tiny_cfg, k=3, index=index)
    scanned = cu.search_images("एक लाल गोला", model, tokenizer, images, tiny_cfg, k=3, image_embeds=first)
    assert hits["image"].tolist() == scanned["image"].tolist()
    assert np.allclose(hits["score"], scanned["score"], atol=1e-3)
