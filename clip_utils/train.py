"""Training: the optimiser's parameter groups, mixed precision, one step, hard-negative batches
and the fit loop with checkpoints and resume."""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .checkpoints import _load_weights, save_checkpoint
from .config import Config, _device, _seed_everything
from .data import clean_table, make_loader
from .evaluate import encode_images
from .losses import clip_loss, soft_target_loss
from .model import CLIPModel


def _batch_loss(model: CLIPModel, batch: dict, cfg: Config):
    image_embeds, text_embeds = model(batch)
    if cfg.loss == "soft_target":
        return soft_target_loss(image_embeds.float(), text_embeds.float())
    return clip_loss(image_embeds.float(), text_embeds.float(), model.logit_scale, batch["image_ids"])



def make_optimizer(model: CLIPModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW with three named groups: image encoder, text encoder, heads (with the temperature)."""
    heads = [*model.image_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]
    groups = [
        dict(name="image_encoder", params=list(model.image_encoder.parameters()), lr=cfg.image_encoder_lr),
        dict(name="text_encoder", params=list(model.text_encoder.parameters()), lr=cfg.text_encoder_lr),
        dict(name="heads", params=heads, lr=cfg.head_lr, weight_decay=cfg.weight_decay),
    ]
    # fused: one kernel for all parameters; on a CPU it steps a BERT-base 7x faster than the default
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, weight_decay=0.0, fused=fused)


def _cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 math (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _autocast(device: torch.device, precision: str = "auto"):
    """Mixed precision: bf16 where the hardware has it (GPU or CPU), else fp16 + grad scaler on GPUs, fp32 on CPUs."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"cfg.precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "fp32" or (device.type != "cuda" and precision == "auto" and not _cpu_has_bf16()):
        return torch.autocast(device.type, enabled=False), None
    if device.type != "cuda":
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 only emulates it: slow
    dtype = torch.bfloat16 if native_bf16 or precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # fp16 gradients underflow
    return torch.autocast("cuda", dtype=dtype), scaler


def _to(batch: dict, device: torch.device) -> dict:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)  # as the image tower
    return batch


def train_step(model: CLIPModel, batch: dict, optimizer, cfg: Config, autocast=None, scaler=None) -> float:
    """One optimisation step: forward, loss, backward, update; returns the loss.

    A non-finite loss raises FloatingPointError before the update, so the weights stay good.

    Args:
        model: a CLIPModel in train mode.
        batch: from make_loader, already on the model's device.
        optimizer: from make_optimizer.
        cfg: loss choice and temperature clamp.
        autocast, scaler: mixed-precision context and fp16 grad scaler (None: fp32).
    """
    with autocast or contextlib.nullcontext():
        loss = _batch_loss(model, batch, cfg)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, cfg.max_logit_scale)
    return loss.item()


def similar_batches(image_embeds, image_ids, batch_size: int, group: int, seed: int) -> list[list[int]]:
    """Row batches made of groups of images the model finds most alike: hard in-batch negatives.

    In a random batch of simple scenes, colour and position nearly always tell the images apart,
    so the loss never asks for shape. Grouping each image with its nearest neighbours under the
    current image embeddings puts exactly the images the model confuses into one softmax. Every
    row (caption) is still used once per epoch; the ragged last batch is dropped. A group shrinks
    when its anchor's nearest images have no unused rows left, and groups may straddle batches.

    Args:
        image_embeds: (I, D) embeddings of the table's distinct images.
        image_ids: (N,) index into image_embeds of each row.
        batch_size: rows per batch.
        group: images per group; groups are shuffled, then cut into batches.
        seed: the same seed and embeddings give the same batches.
    """
    rng = np.random.default_rng(seed)
    image_ids = np.asarray(image_ids)
    embeds = F.normalize(image_embeds.float(), dim=-1)  # (I, D)
    similarity = embeds @ embeds.T  # (I, I)
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.topk(min(4 * group, len(embeds) - 1), dim=1).indices.tolist()  # (I, K), nearest first
    rows_of = [[] for _ in range(len(embeds))]  # each image's unused rows, in random order
    for row in rng.permutation(len(image_ids)):
        rows_of[image_ids[row]].append(int(row))
    groups = []
    for image in image_ids[rng.permutation(len(image_ids))]:  # an image anchors as many groups as it has rows
        if not rows_of[image]:
            continue
        members = [rows_of[image].pop()]
        for other in neighbours[image]:
            if len(members) == group:
                break
            if rows_of[other]:
                members.append(rows_of[other].pop())
        groups.append(members)
    rows = [row for k in rng.permutation(len(groups)) for row in groups[k]]
    if len(rows) <= batch_size:  # as with random batches: a table smaller than one batch is one batch
        return [rows]
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


@torch.no_grad()
def _mean_loss(model, loader, cfg, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        if batch:
            with autocast:
                total += _batch_loss(model, _to(batch, device), cfg).item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return total / max(count, 1)


def fit(model: CLIPModel, tokenizer, train_df: pd.DataFrame, val_df: pd.DataFrame, cfg: Config,
        resume: bool = False) -> pd.DataFrame:
    """Train with AdamW + ReduceLROnPlateau on val loss; keep the best checkpoint; return the history.

    One history row per epoch: train and val loss, each group's learning rate, the temperature,
    seconds (and peak GPU memory on CUDA). cfg.out_dir receives "best" (lowest val loss, loaded
    back into `model` at the end), "last" (weights plus optimizer, scheduler and scaler state,
    for resuming) and history.csv. Each epoch reseeds shuffling, augmentation and dropout from
    cfg.seed and the epoch number, so a resumed run repeats an uninterrupted one. With
    cfg.hard_negatives > 1, every epoch after the first takes its batches from similar_batches.

    Args:
        model, tokenizer: from build_model.
        train_df, val_df: caption tables (checked with clean_table here).
        cfg: the run's Config.
        resume: continue from cfg.out_dir/"last" if it exists (a Colab session died mid-run).
    """
    from tqdm.auto import tqdm

    _seed_everything(cfg.seed)
    device = _device(cfg)
    model.to(device)
    model.image_encoder.to(memory_format=torch.channels_last)  # faster convolutions on GPUs and on CPUs
    train_df, val_df = clean_table(train_df, cfg, name="train"), clean_table(val_df, cfg, name="val")
    _check_training_tables(train_df, val_df, cfg)
    norm = dict(mean=model.image_encoder.mean, std=model.image_encoder.std, crop_pct=model.image_encoder.crop_pct,
                interpolation=model.image_encoder.interpolation)
    train_loader = make_loader(train_df, tokenizer, cfg, train=True, **norm)
    val_loader = make_loader(val_df, tokenizer, cfg, train=False, **norm)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor,
                                                           patience=cfg.patience)
    autocast, scaler = _autocast(device, cfg.precision)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history, best, first_epoch = [], math.inf, 1
    if resume and (out_dir / "last" / "training_state.pt").exists():
        history, best = _restore_training(out_dir / "last", model, optimizer, scheduler, scaler)
        first_epoch = len(history) + 1
        print(f"resuming after epoch {len(history)} from {out_dir / 'last'}")
    start = time.time()
    for epoch in range(first_epoch, cfg.epochs + 1):
        epoch_start = time.time()
        if cfg.hard_negatives > 1 and epoch > 1:  # mine look-alikes with the weights the last epoch left
            pairs = train_loader.dataset
            image_embeds = encode_images(model, list(pairs.images), cfg)  # (I, D), indexed by pairs.image_ids
            batches = similar_batches(image_embeds, pairs.image_ids, cfg.batch_size, cfg.hard_negatives,
                                      cfg.seed + epoch)
            train_loader = make_loader(train_df, tokenizer, cfg, train=True, batches=batches, **norm)
        torch.manual_seed(cfg.seed + epoch)  # dropout
        train_loader.generator.manual_seed(cfg.seed + epoch)  # shuffling (random batches) and worker seeds
        train_loader.dataset.transform.set_random_seed(cfg.seed + epoch)  # augmentation
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False)
        for step, batch in enumerate(bar):
            if not batch:
                continue
            batch = _to(batch, device)
            try:
                loss = train_step(model, batch, optimizer, cfg, autocast, scaler)
            except FloatingPointError as error:
                kept = (f"the last good weights are in {out_dir / 'best'} and {out_dir / 'last'}" if history
                        else "no checkpoint was written yet")
                raise FloatingPointError(f"{error} at epoch {epoch}, batch {step}; training stopped, {kept}") from None
            except torch.OutOfMemoryError as error:
                raise torch.OutOfMemoryError(f"out of memory at epoch {epoch}, batch {step} with batch_size="
                                             f"{cfg.batch_size}: try Config(batch_size={max(2, cfg.batch_size // 2)}) "
                                             f"or a smaller image_size. ({error})") from None
            n = len(batch["input_ids"])
            running, seen = running + loss * n, seen + n
            bar.set_postfix(loss=f"{running / seen:.3f}")
            if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
                break
        val_loss = _mean_loss(model, val_loader, cfg, device, autocast)
        scheduler.step(val_loss)
        row = dict(epoch=epoch, train_loss=running / max(seen, 1), val_loss=val_loss,
                   **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                   temperature=1 / model.logit_scale.exp().item(), seconds=time.time() - epoch_start)
        if device.type == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        history.append(row)
        print(f"epoch {epoch}: train {row['train_loss']:.4f}  val {val_loss:.4f}  "
              f"({row['seconds']:.0f}s)" + ("  best" if val_loss < best else ""))
        if val_loss < best:
            best = val_loss
            save_checkpoint(out_dir / "best", model, tokenizer, cfg)
        _save_training(out_dir / "last", model, tokenizer, cfg, optimizer, scheduler, scaler, history, best)
        pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)
        if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
            print(f"stopping: the {cfg.max_minutes}-minute budget (cfg.max_minutes) is spent")
            break
    if math.isfinite(best):
        _load_weights(model, out_dir / "best" / "model.safetensors")
    return pd.DataFrame(history)


def _check_training_tables(train_df: pd.DataFrame, val_df: pd.DataFrame, cfg: Config) -> None:
    """Stop a run that could learn nothing; warn when the training table is smaller than one batch."""
    for name, table in (("train", train_df), ("val", val_df)):
        if table["image"].nunique() < 2:  # one image: every caption is a positive, there is nothing to contrast
            raise ValueError(f"the {name} table has {len(table)} usable rows of only {table['image'].nunique()} "
                             "image; contrastive training needs captions of at least 2 different images")
    if len(train_df) < cfg.batch_size:
        warnings.warn(f"the train table has {len(train_df)} usable rows, fewer than one batch (batch_size="
                      f"{cfg.batch_size}): each epoch is a single step with {len(train_df)} pairs; add rows "
                      f"or lower batch_size", stacklevel=3)


def _save_training(path, model, tokenizer, cfg, optimizer, scheduler, scaler, history, best) -> None:
    """The "last" checkpoint: weights, tokenizer and config, plus everything fit needs to go on."""
    save_checkpoint(path, model, tokenizer, cfg,
                    extra={"training_state.pt": dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                                     scaler=scaler.state_dict() if scaler else None,
                                                     history=history, best=best)})


def _restore_training(path, model, optimizer, scheduler, scaler) -> tuple[list, float]:
    _load_weights(model, path / "model.safetensors")
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return state["history"], state["best"]
