"""The two towers and their projection heads, joined into one CLIP model."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, _seed_everything
from .text import keeps_devanagari, normalize_caption, train_wordpiece_tokenizer


class ImageEncoder(nn.Module):
    """Any timm backbone with its classifier removed: images (B, 3, H, W) -> pooled features (B, F)."""

    def __init__(self, cfg: Config):
        super().__init__()
        import timm

        pool = "" if cfg.image_pool == "flatten" else cfg.image_pool
        self.model = timm.create_model(cfg.image_model, pretrained=cfg.image_pretrained, num_classes=0,
                                       global_pool=pool, **cfg.image_model_kwargs)
        with torch.no_grad():  # feature size depends on pooling and input size: measure it once
            self.out_dim = self.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1]
        self.train()
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])  # the encoder's own
        if cfg.image_pretrained and data_cfg["input_size"][-1] != cfg.image_size:
            warnings.warn(f"{cfg.image_model} was pretrained at {data_cfg['input_size'][-1]} px but "
                          f"cfg.image_size is {cfg.image_size}; set image_size to match its pretraining")

    def forward(self, images):
        return self.model(images).flatten(1)  # (B, F); F = C * h * w when image_pool="flatten"


class TextEncoder(nn.Module):
    """A Hugging Face encoder: token ids (B, T) -> one vector per caption (B, H), CLS or mean pooled."""

    def __init__(self, cfg: Config, model=None):
        super().__init__()
        from transformers import AutoModel

        self.model = model if model is not None else AutoModel.from_pretrained(cfg.text_model)
        if getattr(self.model, "pooler", None) is not None:  # BERT's own pooler is never used: pooling is below,
            self.model.pooler.requires_grad_(False)  # and DDP wants a gradient for every trainable weight
        self.pooling = cfg.pooling
        self.out_dim = self.model.config.hidden_size

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear -> Dropout, plus a residual, then LayerNorm: (B, F) -> (B, D)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, residual: bool = True):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)
        self.residual = residual

    def forward(self, x):
        projected = self.projection(x)  # (B, D)
        x = self.dropout(self.fc(F.gelu(projected)))  # (B, D)
        return self.layer_norm(x + projected if self.residual else x)


class CLIPModel(nn.Module):
    """Two towers and a learnable temperature; forward(batch) -> (image_embeds, text_embeds), unnormalised.

    A frozen tower (cfg.freeze) gets no gradients and stays in eval mode, so its batch-norm
    statistics and dropout do not change while the other tower learns.
    """

    def __init__(self, cfg: Config, image_encoder: ImageEncoder, text_encoder: TextEncoder):
        super().__init__()
        if cfg.freeze not in ("none", "image", "text"):
            raise ValueError(f"cfg.freeze must be 'none', 'image' or 'text', got {cfg.freeze!r}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.freeze = cfg.freeze  # a name, not a module attribute: that would duplicate state-dict keys
        if self.freeze != "none":
            self._frozen_tower().requires_grad_(False)
        self.image_projection = ProjectionHead(image_encoder.out_dim, cfg.projection_dim, cfg.dropout,
                                               cfg.residual_heads)
        self.text_projection = ProjectionHead(text_encoder.out_dim, cfg.projection_dim, cfg.dropout,
                                              cfg.residual_heads)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def _frozen_tower(self):
        return {"image": self.image_encoder, "text": self.text_encoder}.get(self.freeze)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze != "none":
            self._frozen_tower().eval()
        return self

    def encode_image(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze != "image"):
            features = self.image_encoder(images)  # (B, F); no graph kept for a frozen tower
        return self.image_projection(features)  # (B, D)

    def encode_text(self, input_ids, attention_mask):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze != "text"):
            features = self.text_encoder(input_ids, attention_mask)  # (B, H)
        return self.text_projection(features)  # (B, D)

    def forward(self, batch: dict):
        return (self.encode_image(batch["images"]),
                self.encode_text(batch["input_ids"], batch["attention_mask"]))


def build_model(cfg: Config, captions=None):
    """Build (model, tokenizer): pretrained by name in full mode, small and random-init in quick mode.

    With cfg.text_pretrained False, a WordPiece tokenizer is trained on `captions` and a BERT
    is built from cfg.text_config; otherwise both load from cfg.text_model (name or folder).
    """
    _seed_everything(cfg.seed)
    if cfg.text_pretrained:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.text_model)
        text_encoder = TextEncoder(cfg)
    else:
        from transformers import BertConfig, BertModel

        if captions is None:
            raise ValueError("build_model needs captions to train a tokenizer when text_pretrained=False")
        tokenizer = train_wordpiece_tokenizer(captions, cfg.vocab_size)
        bert_config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 **cfg.text_config)
        text_encoder = TextEncoder(cfg, BertModel(bert_config))
    probe = "नमस्ते क्षत्रिय किताबें" if cfg.text_pretrained else normalize_caption(next(iter(captions)))
    if not keeps_devanagari(tokenizer, probe):
        warnings.warn(f"tokenizer of {cfg.text_model!r} loses Devanagari matras or virama "
                      f"(or maps them to {tokenizer.unk_token}): Hindi captions will be mangled")
    return CLIPModel(cfg, ImageEncoder(cfg), text_encoder), tokenizer
