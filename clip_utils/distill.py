"""Beyond the published recipe: a Hindi text tower distilled from an English CLIP on parallel captions
(no images), and LiT (a frozen CLIP-pretrained image tower)."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pandas as pd
import torch
import torch.nn.functional as F

from .config import Config, _seed_everything
from .evaluate import encode_texts
from .loop import precision_context, train_loop
from .model import CLIPModel, ImageEncoder, TextEncoder, _is_transformers_clip, build_text_tower
from .text import normalize_caption
from .train import _accelerator, make_optimizer

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


def _tokens(tokenizer, captions, cfg: Config, device) -> dict:
    return tokenizer(captions, padding="longest", truncation=True, max_length=cfg.max_length,
                     return_tensors="pt").to(device)


def _encode_batch(model, tokenizer, captions, cfg, device):
    tokens = _tokens(tokenizer, captions, cfg, device)
    return model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float()  # (B, D)


@torch.no_grad()
def _mean_distill_loss(model, tokenizer, captions, targets, cfg, device, autocast) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(captions), 256):
        with autocast:
            embeds = _encode_batch(model, tokenizer, captions[start:start + 256], cfg, device)
        total += _distill_loss(embeds, targets[start:start + 256].to(device)).item() * len(embeds)
    return total / max(len(captions), 1)


class _DistillTask:
    """Distillation's side of train_loop: batches of Hindi captions with their teacher targets; the loss to them."""

    def __init__(self, tokenizer, captions: dict, targets: dict, cfg: Config, accelerator):
        self.tokenizer, self.captions, self.targets = tokenizer, captions, targets
        self.cfg, self.accelerator = cfg, accelerator

    def batches(self, epoch: int) -> list:
        """Shuffled global batches of batch_size rows (each process takes its share), in groups of k."""
        cfg, accelerator = self.cfg, self.accelerator
        torch.manual_seed(cfg.seed + epoch)  # shuffling (the same on every process) and dropout, as fit reseeds them
        n, world, k = len(self.captions["train"]), accelerator.num_processes, cfg.gradient_accumulation_steps
        order = torch.randperm(n).tolist()
        if accelerator.process_index:
            torch.manual_seed(cfg.seed + epoch + 7919 * accelerator.process_index)  # its own dropout
        size = min(cfg.batch_size, n) // world * world
        if size == 0 or n // size < k:  # fit stops on the same cases (an epoch without a single update)
            raise ValueError(f"distillation has {n} training pairs for {world} process(es), batch_size="
                             f"{cfg.batch_size} and gradient_accumulation_steps={k}: not one update per epoch; "
                             "add pairs or lower them")
        batches = []
        for start in range(0, n - size + 1, size):
            with accelerator.split_between_processes(order[start:start + size]) as rows:
                batches.append(dict(**_tokens(self.tokenizer, [self.captions["train"][i] for i in rows], cfg,
                                              accelerator.device),
                                    targets=self.targets["train"][rows].to(accelerator.device)))
        return [batches[i:i + k] for i in range(0, len(batches) // k * k, k)]

    def embed(self, model, batch: dict) -> tuple:
        return (model(dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))[1],)  # (b, D)

    def loss(self, model, features, group: list, shared: bool = True):
        return _distill_loss(features[0].float(), torch.cat([batch["targets"] for batch in group]))

    def rows(self, group: list) -> int:
        return sum(len(batch["targets"]) for batch in group)

    def after_step(self, model) -> None:
        pass

    def report(self, model) -> dict:
        return {}

    def evaluate(self, model) -> dict:
        """The validation loss over every pair, computed alike on every process; its mean cosine."""
        device = self.accelerator.device
        val_loss = _mean_distill_loss(self.accelerator.unwrap_model(model), self.tokenizer, self.captions["val"],
                                      self.targets["val"], self.cfg, device, precision_context(self.cfg, device))
        return dict(val_loss=val_loss, val_cosine=1 - val_loss / 2)


def distill_text_tower(model: CLIPModel, tokenizer, teacher: CLIPModel, teacher_tokenizer,
                       train_pairs: pd.DataFrame, val_pairs: pd.DataFrame, cfg: Config,
                       resume: bool = False) -> pd.DataFrame:
    """Teach the model's text tower to put each Hindi caption where the teacher puts its English source.

    Reads no image: the loss is the squared distance between the student's and the teacher's unit-length
    caption embeddings (2 - 2 cos). The teacher encodes every English caption once, before the first
    epoch, and is never updated; only model.text_encoder and model.text_projection train. The loop is
    fit's (train_loop): AdamW with cfg.text_encoder_lr and cfg.head_lr, ReduceLROnPlateau on the
    validation loss, mixed precision, several processes, best/ (lowest val loss, loaded back at the
    end), last/ (resume=True goes on from it) and history.csv in cfg.out_dir. One history row per epoch
    (train and val loss, learning rates, val cosine, seconds).

    Args:
        model, tokenizer: the Hindi CLIP from student_clip.
        teacher, teacher_tokenizer: the English CLIP whose text embeddings are the targets.
        train_pairs, val_pairs: tables with `english` and `caption` (Hindi) columns, one pair a row.
        cfg: the student's Config (epochs, batch_size, learning rates, max_minutes, seed, out_dir).
        resume: continue from cfg.out_dir/"last" if it exists.
    """
    accelerator = _accelerator(cfg)
    _seed_everything(cfg.seed)
    train_pairs, val_pairs = _clean_pairs(train_pairs, "train_pairs", cfg), _clean_pairs(val_pairs, "val_pairs", cfg)
    teacher.to(accelerator.device)
    # The teacher reads at most its own context (CLIP: 77 tokens), whatever the student's max_length.
    context = getattr(teacher.text_encoder.model.config, "max_position_embeddings", cfg.max_length)
    teacher_cfg = dataclasses.replace(cfg, max_length=min(cfg.max_length, context))
    targets = {split: encode_texts(teacher, teacher_tokenizer, list(pairs["english"]), teacher_cfg)  # (N, D), unit
               for split, pairs in (("train", train_pairs), ("val", val_pairs))}
    captions = {"train": list(train_pairs["caption"]), "val": list(val_pairs["caption"])}
    model.to(accelerator.device)
    image_side = [*model.image_encoder.parameters(), *model.image_projection.parameters(), model.logit_scale]
    trains = [p.requires_grad for p in image_side]
    for p in image_side:  # the image side is the teacher's: it never trains here (and DDP sees only what does)
        p.requires_grad_(False)
    try:
        task = _DistillTask(tokenizer, captions, targets, cfg, accelerator)
        return train_loop(task, model, make_optimizer(model, cfg), cfg, accelerator, resume=resume)
    finally:
        for p, flag in zip(image_side, trains):
            p.requires_grad_(flag)


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
    # image_pool="model": the tower keeps the head its weights were trained with (an attention pool for
    # resnet50_clip.openai, the class token and its `norm` for a CLIP ViT), so every pretrained key loads
    return dataclasses.replace(cfg, image_model=image_model, image_pretrained=True, image_model_kwargs={},
                               image_pool="model", image_size=size, freeze="image")
