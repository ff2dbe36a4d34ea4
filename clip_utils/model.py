"""The two towers and their projection heads, joined into one CLIP model."""
from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, _seed_everything
from .text import keeps_devanagari, normalize_caption, train_wordpiece_tokenizer


def _is_transformers_clip(name: str) -> bool:
    """"openai/clip-vit-base-patch32" or a local folder names a transformers CLIP; timm names have no "/"."""
    return "/" in name and not name.startswith(("hf-hub:", "hf_hub:"))


def normalization_table(mean, std) -> torch.Tensor:
    """(3, 256) float32: what albumentations' Normalize turns each uint8 level of each channel into.

    Applied on the model's device (ImageEncoder), it gives exactly the numbers per-image
    normalisation in the loader would, while the loader ships 4x fewer bytes and skips that work.
    """
    import albumentations as A

    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3)
    return torch.from_numpy(A.Normalize(mean=mean, std=std)(image=levels)["image"][:, 0, :].T.copy())  # (3, 256)


class ImageEncoder(nn.Module):
    """Any timm backbone with its classifier removed, or a transformers CLIP vision tower:
    images (B, 3, H, W), uint8 pixels (normalised here) or normalised floats -> pooled features (B, F).

    The tower owns its preprocessing: its mean and std (applied here, on its device, to the uint8
    pixels that training and evaluation loaders both send) and its evaluation crop (crop_pct and
    interpolation, which data.image_transforms reads through `crop`).
    """

    def __init__(self, cfg: Config, model=None):
        super().__init__()
        self.image_size = cfg.image_size  # the input size it is built for: encode_images refuses another
        self.from_transformers = model is not None or _is_transformers_clip(cfg.image_model)
        if self.from_transformers:
            self._init_transformers_clip(cfg, model)
            self.register_buffer("pixel_table", normalization_table(self.mean, self.std), persistent=False)
            return
        import timm

        # "model": the head its owners built (a CLIP ResNet's attention pool, a CLIP ViT's class token and norm)
        pool = "" if cfg.image_pool == "flatten" else cfg.image_pool
        pool = {} if pool == "model" else dict(global_pool=pool)
        try:
            self.model = timm.create_model(cfg.image_model, pretrained=cfg.image_pretrained, num_classes=0,
                                           **pool, **cfg.image_model_kwargs)
        except TypeError as error:  # "unexpected keyword argument 'chanels'" from deep inside timm
            raise ValueError(f"image_model_kwargs={cfg.image_model_kwargs!r} do not fit timm's {cfg.image_model!r} "
                             f"({error}): use only arguments its model class takes") from None
        with torch.no_grad():  # feature size depends on pooling and input size: measure it once
            try:
                self.out_dim = self.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1]
            except (AssertionError, RuntimeError) as error:  # a ViT's patch grid fits one input size
                native = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
                native = native[-1] if isinstance(native, (tuple, list)) else native  # (224, 224) -> 224
                takes = f"takes {native} px images but" if native else "cannot take images of"
                raise ValueError(f"{cfg.image_model} {takes} cfg.image_size={cfg.image_size} ({error}): set image_size "
                                 f"to match, or build it for {cfg.image_size} px with image_model_kwargs="
                                 f"dict(img_size={cfg.image_size})") from None
        self.train()
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])  # the encoder's own
        self.crop_pct, self.interpolation = data_cfg["crop_pct"], data_cfg["interpolation"]  # its eval crop
        # uint8 level -> normalised value per channel, (3, 256); not saved: it follows from mean and std
        self.register_buffer("pixel_table", normalization_table(self.mean, self.std), persistent=False)
        if cfg.image_pretrained and data_cfg["input_size"][-1] != cfg.image_size:
            warnings.warn(f"{cfg.image_model} was pretrained at {data_cfg['input_size'][-1]} px but "
                          f"cfg.image_size is {cfg.image_size}; set image_size to match its pretraining")

    def _init_transformers_clip(self, cfg: Config, model) -> None:
        """CLIP's vision transformer: pooled, layer-normed class token (B, hidden); CLIP's own mean and std."""
        from transformers import AutoConfig, CLIPVisionModel
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        if model is None:
            model = (CLIPVisionModel.from_pretrained(cfg.image_model) if cfg.image_pretrained else
                     CLIPVisionModel(AutoConfig.from_pretrained(cfg.image_model).vision_config))
        self.model, self.out_dim = model, model.config.hidden_size
        self.mean, self.std = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
        self.crop_pct, self.interpolation = 1.0, "bicubic"  # CLIP's own: shorter side to the input size, centre crop
        if model.config.image_size != cfg.image_size:  # its position embeddings fit one input size only
            raise ValueError(f"{cfg.image_model} takes {model.config.image_size} px images but cfg.image_size is "
                             f"{cfg.image_size}: set image_size={model.config.image_size}")

    @property
    def crop(self) -> dict:
        """The tower's crop fraction and resampling, as image_transforms and make_loader take them."""
        return dict(crop_pct=self.crop_pct, interpolation=self.interpolation)

    def forward(self, images):
        if images.dtype == torch.uint8:  # raw pixels from a loader or encode_images: normalise here, on the device
            channel = torch.arange(3, device=images.device).view(1, 3, 1, 1)
            images = self.pixel_table[channel, images.long()].contiguous(memory_format=torch.channels_last)
        if self.from_transformers:
            return self.model(pixel_values=images).pooler_output  # (B, hidden)
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
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":  # CLIP: the end-of-text token after the final LayerNorm
            return output.pooler_output  # (B, H)
        hidden = output.last_hidden_state  # (B, T, H)
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
        if cfg.heads not in ("mlp", "linear"):
            raise ValueError(f"cfg.heads must be 'mlp' or 'linear', got {cfg.heads!r}")
        head = (partial(ProjectionHead, dropout=cfg.dropout, residual=cfg.residual_heads) if cfg.heads == "mlp"
                else partial(nn.Linear, bias=False))  # "linear": what OpenAI CLIP's projections are
        self.image_projection = head(image_encoder.out_dim, cfg.projection_dim)
        self.text_projection = head(text_encoder.out_dim, cfg.projection_dim)
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
        """(image_embeds, text_embeds); a batch of captions alone (distillation) gives (None, text_embeds)."""
        images = self.encode_image(batch["images"]) if "images" in batch else None
        return images, self.encode_text(batch["input_ids"], batch["attention_mask"])


def _check_image_size(model: CLIPModel, cfg: Config) -> None:
    """The Config's image_size must be the one the image tower was built for (encode_images and fit check it)."""
    built = getattr(model.image_encoder, "image_size", cfg.image_size)
    if built != cfg.image_size:
        raise ValueError(f"cfg.image_size={cfg.image_size} but the model's image tower was built for {built} px "
                         f"images: use the model's own Config (load_checkpoint returns it) or image_size={built}")


def build_model(cfg: Config, captions=None):
    """Build (model, tokenizer): pretrained by name in full mode, small and random-init in quick mode.

    With cfg.text_pretrained False, a WordPiece tokenizer is trained on `captions` and a BERT
    is built from cfg.text_config; otherwise both load from cfg.text_model (name or folder).
    """
    _seed_everything(cfg.seed)
    text_encoder, tokenizer = build_text_tower(cfg, captions)
    return CLIPModel(cfg, ImageEncoder(cfg), text_encoder), tokenizer


def build_text_tower(cfg: Config, captions=None):
    """(TextEncoder, tokenizer) alone, as build_model makes them: by name, or random-init BERT + WordPiece."""
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
    return text_encoder, tokenizer
