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
    # Image 2: caption 4 scores .1; captions 2 (.3) and 3 (.4) score higher and caption 1 ties at .1:
    # a tie counts against the query -> rank 4 (R@3 misses it).
    assert m["i2t_R@1"] == pytest.approx(1 / 3)
    assert m["i2t_R@2"] == pytest.approx(2 / 3)
    assert m["i2t_R@3"] == pytest.approx(2 / 3)
    assert m["i2t_median_rank"] == 2


def test_ties_count_against_the_query_but_an_image_s_own_captions_do_not():
    sim = torch.tensor([[0.5, 0.5],    # caption 0 (image 0) ties with image 1: a miss at R@1
                        [0.5, 0.9],    # caption 1 (image 1)
                        [0.5, 0.2]])   # caption 2 (image 0) ties with caption 0 for image 0: both are its own
    m = cu.recall_at_k(sim, [0, 1, 0], ks=(1, 2))
    assert m["t2i_R@1"] == pytest.approx(2 / 3) and m["t2i_R@2"] == 1.0  # caption 2: 0.5 > 0.2, a hit
    # Image 0: its captions 0 and 2 score 0.5, but so does caption 1 (image 1's): the tie counts against.
    # Image 1: caption 1 scores 0.9 -> first.
    assert m["i2t_R@1"] == 0.5 and m["i2t_R@2"] == 1.0
    assert m["t2i_median_rank"] == 1


def test_a_collapsed_similarity_matrix_scores_at_or_below_chance():
    image_of = torch.arange(60) % 20  # 20 images, 3 captions each
    for collapsed in (torch.zeros(60, 20), torch.full((60, 20), 0.7, dtype=torch.float16)):
        m = cu.recall_at_k(collapsed, image_of, ks=(1, 5, 10, 20))
        for k in (1, 5, 10):
            assert m[f"t2i_R@{k}"] <= k / 20 and m[f"i2t_R@{k}"] <= k * 3 / 60  # chance: K / gallery size
        assert m["t2i_R@20"] == 1.0  # the whole gallery still holds the answer
        assert m["t2i_median_rank"] == 20 and m["i2t_median_rank"] == 58  # last among the wrong ones


@pytest.mark.parametrize("bad, cause", [(float("nan"), "NaN"), (float("inf"), "infinite"),
                                        (-float("inf"), "infinite")])
def test_nan_or_infinite_scores_raise_naming_the_cause(bad, cause):
    sim = torch.eye(4)
    sim[2, 1] = bad
    with pytest.raises(ValueError, match=rf"1 of the 16 scores are {cause} \(e.g. caption 2 against image 1"):
        cu.recall_at_k(sim, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        cu.recall_at_k(torch.full((4, 4), float("nan")), [0, 1, 2, 3])  # a model with NaN weights


def test_tying_half_the_gallery_at_the_top_never_raises_recall():
    generator = torch.Generator().manual_seed(0)
    image_of = torch.arange(200) % 100  # 100 images, 2 captions each
    sim = torch.randn(200, 100, generator=generator)
    untied = cu.recall_at_k(sim, image_of)
    tied = sim.clone()
    top_half = torch.randperm(100, generator=generator)[:50]
    tied[:, top_half] = sim.max() + 1  # half the gallery ties at the top for every caption
    m = cu.recall_at_k(tied, image_of)
    for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"):
        assert m[key] <= untied[key], key
    assert untied["t2i_R@1"] < 0.1  # counting ties for the query gave 0.5: every caption of a tied image "won"


def test_recall_equals_clip_benchmark_on_tie_free_matrices():
    # The code behind open_clip's multilingual table (CLIP_benchmark), on random matrices with 1-5 captions per
    # image in shuffled order: text->image and image->text (any of the image's captions counts) at K = 1, 5, 10.
    try:
        from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as peer_recall
    except ImportError:
        pytest.fail("the peer check needs clip-benchmark: pip install --no-deps clip-benchmark==1.6.2 (.ci/run does)")
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        n_images = 30 + 10 * seed
        per_image = torch.randint(1, 6, (n_images,), generator=generator)
        image_of = torch.repeat_interleave(torch.arange(n_images), per_image)
        image_of = image_of[torch.randperm(len(image_of), generator=generator)]
        sim = torch.randn(len(image_of), n_images, generator=generator, dtype=torch.float64)
        sim[torch.arange(len(image_of)), image_of] += 1.5  # a model that is right some of the time
        assert len(torch.unique(sim)) == sim.numel()  # tie-free
        ours = cu.recall_at_k(sim, image_of, ks=(1, 5, 10))
        positive = torch.zeros_like(sim, dtype=torch.bool)
        positive[torch.arange(len(image_of)), image_of] = True
        for k in (1, 5, 10):
            t2i = (peer_recall(sim, positive, k) > 0).float().mean().item()
            i2t = (peer_recall(sim.T, positive.T, k) > 0).float().mean().item()
            assert ours[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-6), (seed, k)
            assert ours[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-6), (seed, k)
            assert 0 < t2i < 1 and 0 < i2t < 1  # neither trivial nor perfect: the comparison can fail


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


def test_choose_on_validation_scores_every_variant_on_the_table_it_is_given(monkeypatch):
    seen = []

    def scored(model, tokenizer, df, cfg, name):
        seen.append((df, name))
        return {"t2i_R@1": model, "i2t_R@1": 1 - model}  # the "model" here is its own score

    monkeypatch.setattr(cu.evaluate, "retrieval_metrics", scored)
    val = object()
    chosen, table = cu.choose_on_validation({"with residual": (0.2, None, None), "without": (0.5, None, None)}, val)
    assert chosen == "without" and table.loc["with residual", "t2i_R@1"] == 0.2
    assert seen == [(val, "validation")] * 2
    assert cu.choose_on_validation({"a": (0.3, None, None), "b": (0.3, None, None)}, val)[0] == "a"  # a tie: the first
    assert cu.choose_on_validation({"a": (0.3, None, None), "b": (0.2, None, None)}, val, metric="i2t_R@1")[0] == "b"
    with pytest.raises(ValueError, match="metric 't2i_R@100' is not one of"):
        cu.choose_on_validation({"a": (0.3, None, None)}, val, metric="t2i_R@100")
