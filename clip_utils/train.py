"""Training: the optimiser's parameter groups, mixed precision, one step, hard-negative batches
and the fit loop with checkpoints and resume."""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoints import _load_weights, restore_training_state, save_checkpoint, save_training_state
from .config import Config, _device, _seed_everything
from .data import clean_table, make_loader, similar_batches
from .evaluate import encode_images
from .losses import clip_loss, soft_target_loss
from .model import CLIPModel
from .scale.shards import read_index, stream_loader, write_shards


def _batch_loss(model, batch: dict, cfg: Config):
    image_embeds, text_embeds = model(batch)
    if cfg.loss == "soft_target":
        return soft_target_loss(image_embeds.float(), text_embeds.float())
    logit_scale = getattr(model, "module", model).logit_scale  # DDP keeps the CLIPModel in .module
    return clip_loss(image_embeds.float(), text_embeds.float(), logit_scale, batch["image_ids"])


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


def _mixed_precision(cfg: Config) -> str:
    """cfg.precision as Accelerate names it: bf16 where the hardware has it, else fp16 (+ grad scaler) on GPUs,
    fp32 ("no") on CPUs."""
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"cfg.precision must be 'auto', 'bf16' or 'fp32', got {cfg.precision!r}")
    cuda = _device(cfg).type == "cuda"
    if cfg.precision != "auto":
        return "no" if cfg.precision == "fp32" else "bf16"
    if not cuda:
        return "bf16" if _cpu_has_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"  # a T4 only emulates bf16


def _accelerator(cfg: Config):
    """The Accelerator for this run: one process or those that `accelerate launch` / notebook_launcher started.

    It places the model and batches on this process's device, wraps the model in DDP when there
    are several processes, runs the forward pass in mixed precision and accumulates gradients.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"cfg.device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}; to pick GPUs, set "
                         f"CUDA_VISIBLE_DEVICES (each process of a launch takes its own GPU)")
    precision = _mixed_precision(cfg)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision and shared.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()  # one process (a notebook fitting fp32, then bf16): nothing else to undo
    cpu = _device(cfg).type == "cpu"  # several CPU processes then talk over gloo
    return Accelerator(mixed_precision=precision, cpu=cpu, gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def _to(batch: dict, device: torch.device) -> dict:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)  # as the image tower
    return batch


def train_step(model, batch: dict, optimizer, cfg: Config, accelerator=None) -> float:
    """One optimisation step: forward, loss, backward, update; returns the loss of the whole batch.

    A non-finite loss raises FloatingPointError before the update, so the weights stay good.
    With several processes, each holds a share of the batch, the loss scores it against every
    process's embeddings, and the returned loss is the same on every process.

    Args:
        model: a CLIPModel in train mode (or the model accelerator.prepare returned).
        batch: from make_loader, already on the model's device.
        optimizer: from make_optimizer (prepared by the same accelerator, if any).
        cfg: loss choice and temperature clamp.
        accelerator: mixed precision, fp16 grad scaling, DDP and gradient accumulation (None: plain fp32 step).
    """
    accumulate = accelerator.accumulate(model) if accelerator else contextlib.nullcontext()
    with accumulate:  # with gradient_accumulation_steps > 1, only every k-th call updates the weights
        with accelerator.autocast() if accelerator else contextlib.nullcontext():  # the loss too, in bf16/fp16
            loss = _batch_loss(model, batch, cfg)  # this process's rows against the whole batch
        whole = accelerator.reduce(loss.detach(), "mean") if accelerator else loss.detach()  # the batch's loss
        if not torch.isfinite(whole):  # decided on the batch's loss, so every process stops at the same step
            raise FloatingPointError(f"loss is {whole.item()}")
        if accelerator:
            accelerator.backward(loss)  # scales fp16 losses; DDP averages the gradients over processes
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        getattr(model, "module", model).logit_scale.clamp_(0, cfg.max_logit_scale)  # DDP keeps the model in .module
    return whole.item()


@torch.no_grad()
def _mean_loss(model, loader, cfg, accelerator) -> float:
    """Mean loss per caption over a loader; with several processes, summed over all of them (the same everywhere)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        if batch:
            with accelerator.autocast():
                total += _batch_loss(model, _to(batch, accelerator.device), cfg).item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
    if accelerator.num_processes > 1:  # every process then steps its scheduler on the same number
        sums = torch.tensor([total, count], dtype=torch.float64, device=accelerator.device)
        total, count = accelerator.reduce(sums, "sum").tolist()
    return total / max(count, 1)


def _share(loader, rank: int, world: int, train: bool, seed: int):
    """A loader over this process's contiguous share of each of `loader`'s global batches (itself with one process).

    In rank order the shares make up the batch, so the gathered batch is the one a single process
    would see and `batch_size` keeps its meaning. Every process gets the same number of batches:
    training batches are cut to a multiple of `world` rows (at most world - 1 rows dropped, and only
    from a table smaller than one batch: full batches divide evenly); a last validation batch
    shorter than `world` rows joins the one before it.

    Args:
        loader: from make_loader; its global batches are drawn here, from its seeded generator.
        rank, world: this process's index and the number of processes.
        train: cut to equal shares (DDP's averaging then gives the whole batch's gradient).
        seed: worker seeds of this process, so processes augment with different random streams.
    """
    if world == 1:
        return loader
    batches = [list(b) for b in loader.batch_sampler]  # the same on every process: the generator is seeded alike
    if train:
        batches = [b[:len(b) - len(b) % world] for b in batches]
    elif len(batches) > 1 and len(batches[-1]) < world:
        batches[-2:] = [batches[-2] + batches[-1]]
    shares = [np.array_split(b, world)[rank].tolist() for b in batches if len(b) >= world]
    return torch.utils.data.DataLoader(
        loader.dataset, batch_sampler=shares, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, collate_fn=loader.collate_fn,
        generator=torch.Generator().manual_seed(seed))


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process as soon as it is true on one (a time budget must stop all of them at one step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max"))


def fit(model: CLIPModel, tokenizer, train_df, val_df: pd.DataFrame, cfg: Config,
        resume: bool = False) -> pd.DataFrame:
    """Train with AdamW + ReduceLROnPlateau on val loss; keep the best checkpoint; return the history.

    One history row per epoch: train and val loss, each group's learning rate, the temperature,
    seconds (and peak GPU memory on CUDA). cfg.out_dir receives "best" (lowest val loss, loaded
    back into `model` at the end), "last" (weights plus optimizer, scheduler and scaler state,
    for resuming) and history.csv. Each epoch reseeds shuffling, augmentation and dropout from
    cfg.seed and the epoch number, so a resumed run repeats an uninterrupted one. With
    cfg.hard_negatives > 1, every epoch after the first takes its batches from similar_batches.

    The same code runs on one CPU or GPU and under `accelerate launch` or notebook_launcher on
    several GPUs or machines (see main). With N processes, cfg.batch_size is the global batch:
    each process takes batch_size / N rows of every batch, and the loss scores them against the
    embeddings of all processes. Batch-norm statistics stay per process, as in plain DDP. Only the
    main process writes to cfg.out_dir; with several machines it must be a shared folder.

    train_df may also be a folder of webdataset shards (write_shards), streamed by stream_loader:
    data larger than memory, each row at most once per epoch. With cfg.gradient_accumulation_steps = k, each
    epoch uses a multiple of k batches (the rest is dropped), so no update mixes two epochs.

    Args:
        model, tokenizer: from build_model (the same seed on every process).
        train_df, val_df: caption tables (checked with clean_table here); train_df or a shard folder.
        cfg: the run's Config.
        resume: continue from cfg.out_dir/"last" if it exists (a Colab session died mid-run).
    """
    from tqdm.auto import tqdm

    accelerator = _accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        nearest = max(world, cfg.batch_size // world * world)
        raise ValueError(f"cfg.batch_size={cfg.batch_size} is the global batch, shared by {world} processes: "
                         f"make it a multiple of {world}, e.g. batch_size={nearest}")
    _seed_everything(cfg.seed)
    device = accelerator.device
    model.to(device)
    model.image_encoder.to(memory_format=torch.channels_last)  # faster convolutions on GPUs and on CPUs
    streaming = isinstance(train_df, (str, os.PathLike))
    if streaming and cfg.hard_negatives > 1:
        raise ValueError("cfg.hard_negatives needs a table it can regroup every epoch; a shard folder streams in "
                         "its own order: pass the table instead, or set hard_negatives=0")
    if not streaming:
        train_df = clean_table(train_df, cfg, name="train")
    val_df = clean_table(val_df, cfg, name="val")
    _check_training_tables(train_df, val_df, cfg)
    if len(val_df) < world:
        raise ValueError(f"val_df has {len(val_df)} rows, fewer than the {world} processes: give it more rows")
    norm = model.image_encoder.crop  # the tower's own crop; it normalises the loaders' uint8 pixels itself
    if not streaming:
        with accelerator.local_main_process_first():  # one process per machine fills cfg.image_cache
            train_loader = make_loader(train_df, tokenizer, cfg, train=True, **norm)
    val_loader = _share(make_loader(val_df, tokenizer, cfg, train=False, **norm), rank, world, False, cfg.seed)
    optimizer = make_optimizer(model, cfg)
    # Not given to accelerator.prepare, which would step it once per process: every process steps
    # it itself, on the same all-reduced validation loss, so the learning rates never drift apart.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor,
                                                           patience=cfg.patience)
    out_dir = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    history, best, first_epoch = [], math.inf, 1
    if resume and (out_dir / "last" / "training_state.pt").exists():  # every process reads the same state
        history, best = restore_training_state(out_dir / "last", model, optimizer, scheduler, accelerator.scaler)
        first_epoch = len(history) + 1
        accelerator.print(f"resuming after epoch {len(history)} from {out_dir / 'last'}")
    learns_temperature = model.logit_scale.requires_grad
    if cfg.loss == "soft_target":  # its targets come from the embeddings: no temperature (DDP wants every
        model.logit_scale.requires_grad_(False)  # parameter it trains to get a gradient); restored at the end
    trained, optimizer = accelerator.prepare(model, optimizer)  # DDP-wrapped with several processes
    quiet = {} if accelerator.is_local_main_process else dict(disable=True)  # one progress bar per machine
    start = time.time()
    for epoch in range(first_epoch, cfg.epochs + 1):
        epoch_start = time.time()
        if cfg.hard_negatives > 1 and epoch > 1:  # mine look-alikes with the weights the last epoch left
            pairs = train_loader.dataset
            image_embeds = encode_images(model, list(pairs.images), cfg)  # (I, D), indexed by pairs.image_ids
            if world > 1:  # every process must cut the same batches: take the main process's embeddings
                from accelerate.utils import broadcast

                image_embeds = broadcast(image_embeds.to(device)).cpu()
            batches = similar_batches(image_embeds, pairs.image_ids, cfg.batch_size, cfg.hard_negatives,
                                      cfg.seed + epoch)
            train_loader = make_loader(train_df, tokenizer, cfg, train=True, batches=batches, **norm)
        own_seed = cfg.seed + epoch + 7919 * rank  # process 0 seeds as a single process does
        torch.manual_seed(own_seed)  # dropout
        if streaming:
            epoch_loader = stream_loader(train_df, tokenizer, cfg, rank, world, epoch, **norm)
        else:
            train_loader.generator.manual_seed(cfg.seed + epoch)  # shuffling (random batches) and worker seeds
            train_loader.dataset.transform.set_random_seed(own_seed)  # augmentation
            epoch_loader = _share(train_loader, rank, world, True, own_seed)
        k = cfg.gradient_accumulation_steps
        usable = len(epoch_loader) // k * k  # whole groups of k batches: an update never spans two epochs
        if usable == 0:
            raise ValueError(f"an epoch has {len(epoch_loader)} batches, fewer than gradient_accumulation_steps={k}: "
                             "lower it or batch_size")
        accelerator.step = 0  # Accelerate's count of batches towards the next update (a resumed run starts at 0 too)
        optimizer.zero_grad(set_to_none=True)  # nothing left over from an epoch cut short
        trained.train()
        running, seen = 0.0, 0
        bar = tqdm(epoch_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, **quiet)
        for step, batch in enumerate(bar):
            if step == usable:
                break
            if _any_process(accelerator, not batch):  # all images of a batch unreadable: every process skips it
                continue
            batch = _to(batch, device)
            try:
                loss = train_step(trained, batch, optimizer, cfg, accelerator)
            except FloatingPointError as error:
                kept = (f"the last good weights are in {out_dir / 'best'} and {out_dir / 'last'}" if history
                        else "no checkpoint was written yet")
                raise FloatingPointError(f"{error} at epoch {epoch}, batch {step}; training stopped, {kept}") from None
            except torch.OutOfMemoryError as error:
                raise torch.OutOfMemoryError(f"out of memory at epoch {epoch}, batch {step} with batch_size="
                                             f"{cfg.batch_size}: try Config(batch_size={max(2, cfg.batch_size // 2)}) "
                                             f"or a smaller image_size. ({error})") from None
            n = len(batch["input_ids"]) * world
            running, seen = running + loss * n, seen + n
            bar.set_postfix(loss=f"{running / seen:.3f}")
            if cfg.max_minutes and _any_process(accelerator, time.time() - start > cfg.max_minutes * 60):
                break
        val_loss = _mean_loss(trained, val_loader, cfg, accelerator)
        scheduler.step(val_loss)
        row = dict(epoch=epoch, train_loss=running / max(seen, 1), val_loss=val_loss,
                   **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                   temperature=1 / model.logit_scale.exp().item(), seconds=time.time() - epoch_start)
        if device.type == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        history.append(row)
        accelerator.print(f"epoch {epoch}: train {row['train_loss']:.4f}  val {val_loss:.4f}  "
                          f"({row['seconds']:.0f}s)" + ("  best" if val_loss < best else ""))
        if accelerator.is_main_process:  # the others hold the same weights
            if val_loss < best:
                save_checkpoint(out_dir / "best", model, tokenizer, cfg)
            save_training_state(out_dir / "last", model, tokenizer, cfg, optimizer, scheduler, accelerator.scaler,
                           history, min(best, val_loss))
            pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)
        best = min(best, val_loss)
        accelerator.wait_for_everyone()  # nobody reads or resumes a half-written checkpoint
        if cfg.max_minutes and _any_process(accelerator, time.time() - start > cfg.max_minutes * 60):
            accelerator.print(f"stopping: the {cfg.max_minutes}-minute budget (cfg.max_minutes) is spent")
            break
    accelerator.unwrap_model(trained, keep_fp32_wrapper=False)  # gives `model` back its own forward
    model.logit_scale.requires_grad_(learns_temperature)
    if math.isfinite(best):
        _load_weights(model, out_dir / "best" / "model.safetensors")
    return pd.DataFrame(history)


def _check_training_tables(train_df, val_df: pd.DataFrame, cfg: Config) -> None:
    """Stop a run that could learn nothing; warn when the training table is smaller than one batch."""
    for name, table in (("train", train_df), ("val", val_df)):
        index = read_index(table) if isinstance(table, (str, os.PathLike)) else None  # a shard folder
        rows, images = (index["rows"], index["images"]) if index else (len(table), table["image"].nunique())
        if images < 2:  # one image: every caption is a positive, there is nothing to contrast
            raise ValueError(f"the {name} table has {rows} usable rows of only {images} "
                             "image; contrastive training needs captions of at least 2 different images")
    if not isinstance(train_df, (str, os.PathLike)) and len(train_df) < cfg.batch_size:
        warnings.warn(f"the train table has {len(train_df)} usable rows, fewer than one batch (batch_size="
                      f"{cfg.batch_size}): each epoch is a single step with {len(train_df)} pairs; add rows "
                      f"or lower batch_size", stacklevel=3)


def main(argv=None) -> None:
    """Command line for fit: `python -m clip_utils.train --mode quick`, the same under `accelerate launch`."""
    import argparse

    from .datasets import prepare_data
    from .evaluate import retrieval_metrics
    from .model import build_model

    parser = argparse.ArgumentParser(prog="python -m clip_utils.train", description=main.__doc__)
    parser.add_argument("--mode", choices=["quick", "full"], default=None, help="default: CLIP_HINDI_MODE, else "
                        "full on a GPU and quick on a CPU")
    parser.add_argument("--data-dir", default=None, help="where prepare_data writes (default data/<mode>)")
    parser.add_argument("--captions", default=None, help="full mode: the Hindi caption file for Flickr8k")
    parser.add_argument("--data", choices=["flickr8k", "coco35l"], default="flickr8k", help="full mode's photos: "
                        "Flickr8k, or COCO-35L (113k COCO photos, machine-translated captions; 20 GB download)")
    parser.add_argument("--language", default="hi", help="COCO-35L's caption language")
    parser.add_argument("--shards", default=None, help="write the training table as webdataset shards in this "
                        "folder once, then stream them")
    parser.add_argument("--train-csv", default=None, help="your own table (columns image, caption) instead")
    parser.add_argument("--val-csv", default=None, help="its validation table (needed with --train-csv)")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/last")
    parser.add_argument("--prepare-only", action="store_true", help="download and prepare the data (and shards) "
                        "in this one process, then stop: run it before a launch whose first run downloads a lot")
    for name, kind in [("out_dir", str), ("image_dir", str), ("epochs", int), ("batch_size", int),
                       ("gradient_accumulation_steps", int), ("precision", str), ("max_minutes", float),
                       ("seed", int), ("num_workers", int), ("image_cache", str), ("device", str)]:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=f"Config.{name}")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None}
    cfg = Config.from_env(**overrides) if args.mode is None else getattr(Config, args.mode)(**overrides)
    if args.data == "coco35l" and cfg.mode != "full":
        parser.error("--data coco35l is full mode's: add --mode full (quick mode draws synthetic scenes)")
    from accelerate import PartialState

    # The other processes wait at a barrier while the main one prepares the data: a Flickr8k download and
    # translation take minutes, longer than NCCL's default 10-minute timeout (COCO-35L: use --prepare-only first).
    state = PartialState(cpu=_device(cfg).type == "cpu",
                         timeout=datetime.timedelta(minutes=60))
    with state.main_process_first():  # the main process downloads or draws the data; the others find it cached
        if args.train_csv:
            train_df, val_df, test_df = pd.read_csv(args.train_csv), pd.read_csv(args.val_csv), None
        elif args.data == "coco35l" and cfg.mode == "full":
            from .scale.coco35l import prepare_coco35l

            train_df, val_df, test_df = prepare_coco35l(args.data_dir or "data/coco35l", args.language)
        else:
            train_df, val_df, test_df = prepare_data(cfg, args.data_dir or f"data/{cfg.mode}", args.captions)
        if args.shards and state.is_main_process:  # kept as they are if written from this table before
            write_shards(train_df, args.shards, cfg, max_side=cfg.image_size * 8 // 7)  # 256 px at 224
    if args.prepare_only:
        shards = f", shards in {args.shards}" if args.shards else ""
        state.print(f"data ready: {len(train_df)} training captions{shards}")
        return
    state.print(f"{cfg.mode} mode, {state.num_processes} process(es) on {state.device}, global batch {cfg.batch_size}")
    model, tokenizer = build_model(cfg, captions=train_df["caption"])
    fit(model, tokenizer, args.shards or train_df, val_df, cfg, resume=args.resume)
    if state.is_main_process and test_df is not None:
        print({k: round(v, 4) for k, v in retrieval_metrics(model, tokenizer, test_df, cfg).items()})


if __name__ == "__main__":
    main()
