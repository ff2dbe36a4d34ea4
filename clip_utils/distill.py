"""Beyond the published recipe: a Hindi text tower distilled from an English CLIP on parallel captions
(no images), and LiT (a frozen CLIP-pretrained image tower)."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from .checkpoints import _load_weights, save_checkpoint
from .config import Config, _device, _seed_everything
from .evaluate import encode_texts
from .model import CLIPModel, ImageEncoder, TextEncoder, _is_transformers_clip, build_text_tower
from .text import normalize_caption
from .train import _mixed_precision

# The fields that shape the image side and the shared space: a student takes them from its teacher.
_IMAGE_SIDE = ("image_model", "image_pretrained", "image_model_kwargs", "image_pool", "image_size",
               "projection_dim", "heads", "residual_heads", "dropout", "init_logit_scale", "max_logit_scale")


def clip_from_transformers(name: str = "openai/clip-vit-base-patch32", cfg: Config | None = None):
    """An English CLIP loaded by name through transformers, as a package CLIPModel with the same embeddings.

    Returns (model, tokenizer, cfg): the vision tower and its projection, the text tower (pooled at
    its end token) and its projection and the learned temperature, all CLIP's own; cfg (built from
    `cfg`, default Config.full()) gets CLIP's input size, embedding size and bias-free linear heads.
    Every package function then takes it (English captions): retrieval_metrics, search, save.
    """
    from transformers import AutoTokenizer
    from transformers import CLIPModel as HFCLIPModel

    clip = HFCLIPModel.from_pretrained(name)
    cfg = cfg or Config.full()
    cfg = dataclasses.replace(cfg, image_model=name, image_pretrained=True, text_model=name,
                              text_pretrained=True, pooling="pooler", heads="linear",
                              image_size=clip.config.vision_config.image_size,
                              projection_dim=clip.config.projection_dim,
                              init_logit_scale=clip.logit_scale.item(),
                              max_length=min(cfg.max_length, clip.config.text_config.max_position_embeddings))
    # clip.vision_model and clip.text_model are a CLIPVisionModel and a CLIPTextModel: the loaded towers themselves
    model = CLIPModel(cfg, ImageEncoder(cfg, clip.vision_model), TextEncoder(cfg, clip.text_model))
    model.image_projection.load_state_dict(clip.visual_projection.state_dict())
    model.text_projection.load_state_dict(clip.text_projection.state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(clip.logit_scale)
    return model.eval(), AutoTokenizer.from_pretrained(name), cfg


def student_clip(teacher: CLIPModel, teacher_cfg: Config, cfg: Config, captions=None):
    """A Hindi CLIP to distil: a copy of the teacher's image side and a new Hindi text tower into its space.

    Returns (model, tokenizer, cfg). The image tower, its head and the temperature are copied from the
    teacher (so the result is an ordinary CLIPModel that every package function takes); the text tower
    is built from cfg as build_model builds it (by name, or a random-init BERT with a WordPiece tokenizer
    trained on `captions`), and its head projects into the teacher's embedding size.

    Args:
        teacher, teacher_cfg: an English CLIP (clip_from_transformers, or trained with fit) and its Config.
        cfg: the student's text side and training knobs; the image-side fields come from teacher_cfg.
        captions: Hindi training captions, needed when cfg.text_pretrained is False.
    """
    cfg = dataclasses.replace(cfg, **{name: getattr(teacher_cfg, name) for name in _IMAGE_SIDE})
    _seed_everything(cfg.seed)
    text_encoder, tokenizer = build_text_tower(cfg, captions)
    model = CLIPModel(cfg, copy.deepcopy(teacher.image_encoder), text_encoder)
    model.image_projection.load_state_dict(teacher.image_projection.state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(teacher.logit_scale)
    return model, tokenizer, cfg


def _clean_pairs(pairs: pd.DataFrame, name: str, cfg: Config) -> pd.DataFrame:
    """Normalised (english, caption) rows; empty ones raise or are dropped with a count (cfg.on_bad_input)."""
    missing = {"english", "caption"} - set(pairs.columns)
    if missing:
        raise ValueError(f"{name} needs columns 'english' (the source caption) and 'caption' (its Hindi "
                         f"translation); missing {sorted(missing)} (has {list(pairs.columns)}). Quick-mode "
                         "tables cached before English captions existed are redrawn by prepare_quick_data.")
    pairs = pd.DataFrame(dict(english=[normalize_caption(t) for t in pairs["english"]],
                              caption=[normalize_caption(t) for t in pairs["caption"]]), index=pairs.index)
    empty = pairs["english"].eq("") | pairs["caption"].eq("")
    if empty.any():
        message = f"{name}: {empty.sum()} of {len(pairs)} pairs have an empty side, e.g. row {empty.idxmax()}"
        if cfg.on_bad_input == "raise":
            raise ValueError(message + " (set on_bad_input='skip' to drop them with a warning)")
        warnings.warn(message + "; dropped", stacklevel=3)
    return pairs[~empty].reset_index(drop=True)


def _distill_loss(student_embeds, teacher_embeds):
    """Squared distance between unit vectors, 2 - 2 cos, averaged: (B, D), (B, D) -> ()."""
    return (F.normalize(student_embeds, dim=-1) - teacher_embeds).pow(2).sum(-1).mean()


def _encode_batch(model, tokenizer, captions, cfg, device):
    tokens = tokenizer(captions, padding="longest", truncation=True, max_length=cfg.max_length,
                       return_tensors="pt").to(device)
    return model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float()  # (B, D)


def _autocast(device: torch.device, cfg: Config):
    """(autocast context, grad scaler or None) for this plain loop, with the precision fit picks for cfg."""
    precision = _mixed_precision(cfg)  # "bf16", "fp16" (GPUs without native bf16) or "no"
    if precision == "no":
        return torch.autocast(device.type, enabled=False), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


@torch.no_grad()
def _mean_distill_loss(model, tokenizer, captions, targets, cfg, device, autocast) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(captions), 256):
        with autocast:
            embeds = _encode_batch(model, tokenizer, captions[start:start + 256], cfg, device)
        total += _distill_loss(embeds, targets[start:start + 256].to(device)).item() * len(embeds)
    return total / max(len(captions), 1)


def distill_text_tower(model: CLIPModel, tokenizer, teacher: CLIPModel, teacher_tokenizer,
                       train_pairs: pd.DataFrame, val_pairs: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Teach the model's text tower to put each Hindi caption where the teacher puts its English source.

    Reads no image: the loss is the squared distance between the student's and the teacher's unit-length
    caption embeddings (2 - 2 cos). The teacher encodes every English caption once, before the first
    epoch, and is never updated; only model.text_encoder and model.text_projection train (AdamW with
    cfg.text_encoder_lr and cfg.head_lr, ReduceLROnPlateau on the validation loss, as fit does). One
    history row per epoch (train and val loss, val cosine, learning rates, seconds); the epoch with the
    lowest val loss is saved to cfg.out_dir/"best" and loaded back at the end, with history.csv beside it.

    Args:
        model, tokenizer: the Hindi CLIP from student_clip.
        teacher, teacher_tokenizer: the English CLIP whose text embeddings are the targets.
        train_pairs, val_pairs: tables with `english` and `caption` (Hindi) columns, one pair a row.
        cfg: the student's Config (epochs, batch_size, learning rates, max_minutes, seed, out_dir).
    """
    from tqdm.auto import tqdm

    _seed_everything(cfg.seed)
    device = _device(cfg)
    train_pairs, val_pairs = _clean_pairs(train_pairs, "train_pairs", cfg), _clean_pairs(val_pairs, "val_pairs", cfg)
    teacher.to(device)
    # The teacher reads at most its own context (CLIP: 77 tokens), whatever the student's max_length.
    context = getattr(teacher.text_encoder.model.config, "max_position_embeddings", cfg.max_length)
    teacher_cfg = dataclasses.replace(cfg, max_length=min(cfg.max_length, context))
    targets = {split: encode_texts(teacher, teacher_tokenizer, list(pairs["english"]), teacher_cfg)  # (N, D), unit
               for split, pairs in (("train", train_pairs), ("val", val_pairs))}
    captions = {"train": list(train_pairs["caption"]), "val": list(val_pairs["caption"])}
    model.to(device)
    groups = [dict(name="text_encoder", params=list(model.text_encoder.parameters()), lr=cfg.text_encoder_lr),
              dict(name="heads", params=list(model.text_projection.parameters()), lr=cfg.head_lr,
                   weight_decay=cfg.weight_decay)]  # the image side is the teacher's: it never trains here
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor,
                                                           patience=cfg.patience)
    autocast, scaler = _autocast(device, cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history, best, start = [], math.inf, time.time()
    n, batch_size = len(captions["train"]), min(cfg.batch_size, len(captions["train"]))
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.time()
        torch.manual_seed(cfg.seed + epoch)  # shuffling and dropout, as fit reseeds them
        order = torch.randperm(n).tolist()
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(range(0, n - batch_size + 1, batch_size), desc=f"distil {epoch}/{cfg.epochs}", leave=False)
        for step in bar:
            rows = order[step:step + batch_size]
            with autocast:
                embeds = _encode_batch(model, tokenizer, [captions["train"][i] for i in rows], cfg, device)
                loss = _distill_loss(embeds, targets["train"][rows].to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distillation loss is {loss.item()} at epoch {epoch}, row {step}")
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            running, seen = running + loss.item() * len(rows), seen + len(rows)
            bar.set_postfix(loss=f"{running / seen:.4f}")
            if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
                break
        val_loss = _mean_distill_loss(model, tokenizer, captions["val"], targets["val"], cfg, device, autocast)
        scheduler.step(val_loss)
        history.append(dict(epoch=epoch, train_loss=running / max(seen, 1), val_loss=val_loss,
                            val_cosine=1 - val_loss / 2, **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                            seconds=time.time() - epoch_start))
        print(f"distil epoch {epoch}: train {history[-1]['train_loss']:.4f}  val {val_loss:.4f}  (val cosine "
              f"{1 - val_loss / 2:.3f}, {history[-1]['seconds']:.0f}s)" + ("  best" if val_loss < best else ""))
        if val_loss < best:
            best = val_loss
            save_checkpoint(out_dir / "best", model, tokenizer, cfg)
        pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)
        if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
            print(f"stopping: the {cfg.max_minutes}-minute budget (cfg.max_minutes) is spent")
            break
    if math.isfinite(best):
        _load_weights(model, out_dir / "best" / "model.safetensors")
    return pd.DataFrame(history)


def lit_config(cfg: Config, image_model: str = "resnet50_clip.openai") -> Config:
    """cfg for LiT: a CLIP-pretrained image tower by name, frozen, at its own input size (and its own mean/std).

    `image_model` is a timm name (resnet50_clip.openai, vit_base_patch16_clip_224.openai) or a
    transformers CLIP ("openai/clip-vit-base-patch32"); build_model and fit then train only the
    text tower and the two heads against it. The size is read from the model's config, not its weights.
    """
    if _is_transformers_clip(image_model):
        from transformers import AutoConfig

        size = AutoConfig.from_pretrained(image_model).vision_config.image_size
    else:
        import timm

        size = timm.get_pretrained_cfg(image_model).input_size[-1]
    return dataclasses.replace(cfg, image_model=image_model, image_pretrained=True, image_model_kwargs={},
                               image_pool="avg", image_size=size, freeze="image")
