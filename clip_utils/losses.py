"""Contrastive losses over a batch of image and text embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_embeds, text_embeds, logit_scale, image_ids=None):
    """Symmetric cross-entropy (InfoNCE) over cosine similarities scaled by exp(logit_scale).

    Several captions of the same image in one batch (equal `image_ids`) are all positives:
    the target spreads evenly over them instead of calling a true match a negative.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)  # (B, D)
    text_embeds = F.normalize(text_embeds, dim=-1)  # (B, D)
    logits = logit_scale.exp() * text_embeds @ image_embeds.T  # (B_text, B_image)
    if image_ids is None:
        targets = torch.arange(len(logits), device=logits.device)  # pair i matches pair i
    else:
        same = (image_ids[:, None] == image_ids[None, :]).float()  # (B, B), symmetric
        targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def soft_target_loss(image_embeds, text_embeds, temperature: float = 1.0):
    """The published Simple-CLIP loss: unnormalised embeddings, soft targets from in-modality similarity.

    Captions of the same image get no special treatment: targets come only from how similar
    the embeddings already are, which is what lets this loss collapse to one point.
    """
    logits = text_embeds @ image_embeds.T / temperature  # (B, B)
    images_similarity = image_embeds @ image_embeds.T  # (B, B)
    texts_similarity = text_embeds @ text_embeds.T  # (B, B)
    targets = F.softmax((images_similarity + texts_similarity) / 2 * temperature, dim=-1)
    texts_loss = F.cross_entropy(logits, targets)
    images_loss = F.cross_entropy(logits.T, targets.T)
    return (images_loss + texts_loss) / 2
