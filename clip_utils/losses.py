"""Contrastive losses over a batch of image and text embeddings; with several processes the batch is
global: embeddings are gathered from every process, with gradients."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums every process's gradient for each process's own rows."""

    @staticmethod
    def forward(ctx, x):  # (n, ...) the same shape on every process -> (world * n, ...)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):  # (world * n, ...): this process's loss with respect to everyone's rows
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over processes (all-reduce works on gloo too, unlike reduce-scatter)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """x from every process in rank order; the backward pass hands each process the summed gradient of its own x."""
    return list(_AllGather.apply(x).chunk(dist.get_world_size()))


def gather_rows(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, slice]:
    """Rows of x from every process, in rank order, and the slice of them that are this process's own.

    With one process (torch.distributed not initialised) x comes back as it is. Processes may hold
    different numbers of rows (a ragged last validation batch): each pads to the longest for the
    collective and the padding is cut off again. With gradients (an autograd all-gather; a plain
    all-gather keeps none), every process's loss reaches the rows that other processes computed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, slice(0, len(x))
    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)  # a few bytes; lets the shares differ in length
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))])  # (max_n, ...)
    if with_grad:
        parts = _all_gather_with_grad(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    start = sum(sizes[:rank])
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), slice(start, start + len(x))


def clip_loss(image_embeds, text_embeds, logit_scale, image_ids=None, gather: bool = True):
    """Symmetric cross-entropy (InfoNCE) over cosine similarities scaled by exp(logit_scale).

    Several captions of the same image in one batch (equal `image_ids`) are all positives:
    the target spreads evenly over them instead of calling a true match a negative.

    With several processes (and gather=True) every process scores its own rows against the
    columns of all processes: global negatives, and positives found through the gathered image
    ids, so two captions of one image on different processes still match. The loss is the mean
    over this process's rows; with equal shares, the mean over processes (which DDP's gradient
    averaging takes) is the loss of the whole batch, gradients included.

    Args:
        image_embeds, text_embeds: (b, D) this process's pairs, unnormalised.
        logit_scale: learnable log inverse temperature (a scalar tensor).
        image_ids: optional (b,) image index of each pair; ids must mean the same image on every process.
        gather: False keeps the loss local even when several processes run.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)  # (b, D)
    text_embeds = F.normalize(text_embeds, dim=-1)  # (b, D)
    all_images, own = gather_rows(image_embeds) if gather else (image_embeds, slice(0, len(image_embeds)))  # (B, D)
    logits = logit_scale.exp() * text_embeds @ all_images.T  # (b_text, B_image)
    if len(all_images) == len(image_embeds):  # one process: the image-to-text logits are the same matrix, read across
        logits_per_image = logits.T  # (B_image, B_text)
    else:
        all_texts, _ = gather_rows(text_embeds)  # (B, D)
        logits_per_image = logit_scale.exp() * image_embeds @ all_texts.T  # (b_image, B_text)
    if image_ids is None:
        targets = torch.arange(len(logits), device=logits.device) + own.start  # pair i matches pair i
    else:
        all_ids = gather_rows(image_ids, with_grad=False)[0] if gather else image_ids  # (B,)
        same = (image_ids[:, None] == all_ids[None, :]).float()  # (b, B); symmetric when b == B
        targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits_per_image, targets)) / 2


def soft_target_loss(image_embeds, text_embeds, temperature: float = 1.0, gather: bool = True):
    """The published Simple-CLIP loss: unnormalised embeddings, soft targets from in-modality similarity.

    Captions of the same image get no special treatment: targets come only from how similar
    the embeddings already are, which is what lets this loss collapse to one point. With several
    processes every process computes the loss of the whole gathered batch (its targets need every
    row); the gradient all-gather then sums it once per process and DDP's averaging divides that back.
    """
    if gather:
        image_embeds, _ = gather_rows(image_embeds)  # (B, D)
        text_embeds, _ = gather_rows(text_embeds)  # (B, D)
    logits = text_embeds @ image_embeds.T / temperature  # (B, B)
    images_similarity = image_embeds @ image_embeds.T  # (B, B)
    texts_similarity = text_embeds @ text_embeds.T  # (B, B)
    targets = F.softmax((images_similarity + texts_similarity) / 2 * temperature, dim=-1)
    texts_loss = F.cross_entropy(logits, targets)
    images_loss = F.cross_entropy(logits.T, targets.T)
    return (images_loss + texts_loss) / 2


def contrastive_loss(image_embeds, text_embeds, logit_scale, image_ids, kind: str = "clip"):
    """cfg.loss by name: "clip" (clip_loss: captions of one image all positives) or "soft_target" (the published)."""
    if kind == "soft_target":
        return soft_target_loss(image_embeds, text_embeds)
    return clip_loss(image_embeds, text_embeds, logit_scale, image_ids)
