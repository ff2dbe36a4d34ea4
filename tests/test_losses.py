import math

import torch

import clip_utils as cu


def _pairs(n=16, d=32, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g)
    return image, image + noise * torch.randn(n, d, generator=g)


def test_matched_pairs_score_lower_than_shuffled():
    image, text = _pairs()
    scale = torch.tensor(math.log(1 / 0.07))
    matched = cu.clip_loss(image, text, scale)
    shuffled = cu.clip_loss(image, text[torch.randperm(len(text), generator=torch.Generator().manual_seed(1))], scale)
    assert matched < 0.1 < shuffled


def test_clip_loss_is_symmetric():
    image, text = _pairs(noise=1.0)
    scale = torch.tensor(2.0)
    assert torch.allclose(cu.clip_loss(image, text, scale), cu.clip_loss(text, image, scale))


def test_gradient_reaches_the_temperature():
    image, text = _pairs(noise=1.0)
    scale = torch.tensor(1.0, requires_grad=True)
    cu.clip_loss(image, text, scale).backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_captions_of_one_image_are_positives():
    # Rows 0 and 1 are two captions of the same image (two augmented copies, embeddings e0 and e1).
    image = torch.eye(4)
    ids = torch.tensor([0, 0, 1, 2])
    scale = torch.tensor(math.log(100))
    to_twin = torch.eye(4)[[1, 1, 2, 3]]  # caption 0 lands on the other copy of its own image
    to_stranger = torch.eye(4)[[2, 1, 2, 3]]  # caption 0 lands on a different image
    with_ids = [cu.clip_loss(image, text, scale, image_ids=ids) for text in (to_twin, to_stranger)]
    without = [cu.clip_loss(image, text, scale) for text in (to_twin, to_stranger)]
    assert with_ids[0] + 1.0 < with_ids[1]  # matching the twin is right, matching a stranger is wrong
    assert abs(without[0] - without[1]) < 0.01  # without ids, both count as equally wrong


def test_soft_target_loss_runs_and_prefers_matches():
    image, text = _pairs(d=8, noise=0.05)
    matched = cu.soft_target_loss(image, text)
    shuffled = cu.soft_target_loss(image, text.flip(0))
    assert torch.isfinite(matched) and matched < shuffled
