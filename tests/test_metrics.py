import pytest
import torch

import clip_utils as cu


def test_perfect_and_reversed_rankings():
    sim = torch.eye(4)
    m = cu.recall_at_k(sim, [0, 1, 2, 3], ks=(1, 2))
    assert m["t2i_R@1"] == m["i2t_R@1"] == 1.0
    assert m["t2i_median_rank"] == 1
    worst = cu.recall_at_k(-torch.eye(4), [0, 1, 2, 3], ks=(1, 3, 4))
    assert worst["t2i_R@1"] == 0.0 and worst["t2i_R@3"] == 0.0 and worst["t2i_R@4"] == 1.0
    assert worst["t2i_median_rank"] == 4


def test_several_captions_per_image():
    # 3 images, 5 captions; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
    sim = torch.tensor([
        [0.9, 0.1, 0.0],  # right at rank 1
        [0.2, 0.8, 0.1],  # wrong: image 0 is rank 2
        [0.1, 0.7, 0.3],  # right
        [0.6, 0.5, 0.4],  # image 1 at rank 2
        [0.3, 0.2, 0.1],  # image 2 at rank 3
    ])
    m = cu.recall_at_k(sim, [0, 0, 1, 1, 2], ks=(1, 2, 3))
    assert m["t2i_R@1"] == pytest.approx(2 / 5)
    assert m["t2i_R@2"] == pytest.approx(4 / 5)
    assert m["t2i_R@3"] == 1.0
    # Image-to-text: image 0's best caption (0, score .9) ranks first -> hit.
    # Image 1: captions 2 (.7) and 3 (.5); caption 1 scores .8 > .7 -> best correct at rank 2.
    # Image 2: caption 4 scores .1; captions 2 (.3), 3 (.4), 1 (.1 ties, not above) -> rank 3.
    assert m["i2t_R@1"] == pytest.approx(1 / 3)
    assert m["i2t_R@2"] == pytest.approx(2 / 3)
    assert m["i2t_R@3"] == 1.0
    assert m["i2t_median_rank"] == 2


def test_chunked_top_k_matches_a_full_sort():
    gallery = torch.nn.functional.normalize(torch.randn(1000, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    query = gallery[123] + 0.01
    scores, indices = cu.top_k_scores(gallery, query, k=7, chunk_size=64)  # 16 chunks
    expected = (gallery @ query).topk(7)
    assert indices.tolist() == expected.indices.tolist()
    assert torch.allclose(scores, expected.values)
    _, np_indices = cu.top_k_scores(gallery.numpy(), query, k=7, chunk_size=100)  # e.g. a memory map
    assert np_indices.tolist() == expected.indices.tolist()


def test_empty_gallery_finds_nothing():
    scores, indices = cu.top_k_scores(torch.empty(0, 16), torch.ones(16) / 4, k=5)
    assert len(scores) == len(indices) == 0
