"""Training a CLIP: the optimiser's parameter groups, fit's task for the shared loop (batches, the contrastive
loss with accumulation that enlarges the negatives, validation) and fit itself."""
from __future__ import annotations

import datetime
import os
import warnings

import pandas as pd
import torch

from .config import Config, _device, _seed_everything
from .data import clean_table, make_loader, similar_batches
from .evaluate import encode_images, recall_at_k
from .loop import accumulated_losses, any_process, precision_context, train_loop
from .losses import contrastive_loss, gather_rows
from .model import CLIPModel, _check_image_size
from .scale.shards import read_index, stream_loader


def make_optimizer(model: CLIPModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW with three named groups: image encoder, text encoder, heads (with the temperature).

    Weight decay (cfg.weight_decay) reaches the heads' matrices only: not their biases and LayerNorm
    gains (1-D) nor the temperature, open_clip's rule (the heads are two groups of one name, one lr).
    Only parameters that train (requires_grad) join: a frozen tower's group stays empty.
    """
    heads = [*model.image_projection.parameters(), *model.text_projection.parameters()]
    groups = [
        dict(name="image_encoder", params=list(model.image_encoder.parameters()), lr=cfg.image_encoder_lr),
        dict(name="text_encoder", params=list(model.text_encoder.parameters()), lr=cfg.text_encoder_lr),
        dict(name="heads", params=[p for p in heads if p.ndim > 1], lr=cfg.head_lr, weight_decay=cfg.weight_decay),
        dict(name="heads", params=[p for p in heads if p.ndim <= 1] + [model.logit_scale], lr=cfg.head_lr),
    ]
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    # fused: one kernel for all parameters; on a CPU it steps a BERT-base 7x faster than the default
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, weight_decay=0.0, fused=fused)


def _accelerator(cfg: Config):
    """The run's one Accelerator: one process, or those that `accelerate launch` / notebook_launcher started.

    It places the model and batches on this process's device, wraps the model in DDP when there are
    several processes and runs their collectives, which fail after cfg.collective_timeout_minutes
    (a hanging rank) when this call starts the process group.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = _device(cfg).type == "cpu"  # several CPU processes then talk over gloo
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=cfg.collective_timeout_minutes))
    # mixed_precision="no": the precision is the run's own (loop.precision_context), not the process's
    return Accelerator(cpu=cpu, mixed_precision="no", kwargs_handlers=[timeout])


def _to(batch: dict, device: torch.device) -> dict:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)  # as the image tower
    return batch


class _Contrastive:
    """The CLIP side of the loop's seam: forward pass, loss over a group's rows, temperature clamp and report."""

    tokenizer = None

    def __init__(self, cfg: Config, accelerator):
        self.cfg, self.accelerator = cfg, accelerator

    def embed(self, model, batch: dict) -> tuple:
        return model(batch)  # (b, D) image and text embeddings

    def loss(self, model, features, group: list, shared: bool = True):
        """The loss of every row of the group; shared=False: the temperature takes no gradient from it."""
        image_embeds, text_embeds = features  # (k * b, D) each
        logit_scale = self.accelerator.unwrap_model(model).logit_scale
        image_ids = torch.cat([batch["image_ids"] for batch in group])
        return contrastive_loss(image_embeds.float(), text_embeds.float(),
                                logit_scale if shared else logit_scale.detach(), image_ids, self.cfg.loss)

    def rows(self, group: list) -> int:
        return sum(len(batch["input_ids"]) for batch in group)

    def after_step(self, model) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, self.cfg.max_logit_scale)

    def report(self, model) -> dict:
        return dict(temperature=1 / model.logit_scale.exp().item())


def train_step(model, batch: dict, optimizer, cfg: Config, accelerator=None) -> float:
    """One optimisation step on one batch: forward, loss, backward, update; returns the loss of the whole batch.

    A non-finite loss raises FloatingPointError before the update, so the weights stay good.
    With several processes, each holds a share of the batch, the loss scores it against every
    process's embeddings, and the returned loss is the same on every process.

    Args:
        model: a CLIPModel in train mode (or the model accelerator.prepare returned).
        batch: from make_loader, already on the model's device.
        optimizer: from make_optimizer (prepared by the same accelerator, if any).
        cfg: loss choice, temperature clamp and precision (fp16 steps here without loss scaling; fit scales).
        accelerator: DDP and the collectives (None: this process's own, from cfg).
    """
    accelerator = accelerator or _accelerator(cfg)
    objective = _Contrastive(cfg, accelerator)
    for loss in accumulated_losses(objective, model, [batch], cfg, accelerator):
        accelerator.backward(loss)
    whole = accelerator.reduce(loss.detach(), "mean")  # the batch's loss, the same on every process
    if not torch.isfinite(whole):
        raise FloatingPointError(f"loss is {whole.item()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.after_step(accelerator.unwrap_model(model))
    return whole.item()


class _ClipTask(_Contrastive):
    """fit's task for train_loop: each epoch's batches (a table or shards, random or look-alike), validation."""

    def __init__(self, model, tokenizer, train_df, val_df: pd.DataFrame, cfg: Config, accelerator):
        super().__init__(cfg, accelerator)
        self.model, self.tokenizer, self.train_df = model, tokenizer, train_df
        self.streaming = isinstance(train_df, (str, os.PathLike))
        self.crop = model.image_encoder.crop  # the tower's own crop; it normalises the loaders' uint8 pixels itself
        if not self.streaming:
            with accelerator.local_main_process_first():  # one process per machine fills cfg.image_cache
                self.train_loader = make_loader(train_df, tokenizer, cfg, train=True, **self.crop)
        # Validation batches are drawn as training batches are (shuffled, once: the same every epoch); in table
        # order a batch would hold all captions of a few images, an easier task with a floor of ln(captions per image)
        val_df = val_df.sample(frac=1, random_state=cfg.seed).reset_index(drop=True)
        self.val_loader = _process_shares(make_loader(val_df, tokenizer, cfg, train=False, **self.crop),
                                          accelerator, False, cfg.seed)

    def batches(self, epoch: int):
        """This epoch's updates, each a list of cfg.gradient_accumulation_steps batches on this process's device."""
        loader = self._epoch_loader(epoch)
        k = self.cfg.gradient_accumulation_steps
        usable = len(loader) // k * k  # whole groups of k batches: an update never spans two epochs
        if usable == 0:
            raise ValueError(f"an epoch has {len(loader)} batches, fewer than gradient_accumulation_steps={k}: "
                             "lower it or batch_size")
        from tqdm.auto import tqdm

        quiet = {} if self.accelerator.is_local_main_process else dict(disable=True)  # one progress bar per machine
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", total=usable, leave=False, **quiet)
        return _groups(bar, usable, k, self.accelerator)

    def _epoch_loader(self, epoch: int):
        """Seeded from cfg.seed and the epoch (so a resumed run repeats an uninterrupted one); look-alike batches
        mined with the last epoch's weights when cfg.hard_negatives > 1."""
        cfg, accelerator = self.cfg, self.accelerator
        if cfg.hard_negatives > 1 and epoch > 1:
            self.train_loader = _look_alike_loader(self.model, self.train_loader, self.train_df, self.tokenizer,
                                                   cfg, accelerator, epoch, self.crop)
        own_seed = cfg.seed + epoch + 7919 * accelerator.process_index  # process 0 seeds as a single process does
        torch.manual_seed(own_seed)  # dropout
        if self.streaming:
            return stream_loader(self.train_df, self.tokenizer, cfg, accelerator.process_index,
                                 accelerator.num_processes, epoch, **self.crop)
        self.train_loader.generator.manual_seed(cfg.seed + epoch)  # shuffling (random batches) and worker seeds
        self.train_loader.dataset.transform.set_random_seed(own_seed)  # augmentation
        return _process_shares(self.train_loader, accelerator, True, own_seed)

    def evaluate(self, model) -> dict:
        return _validate(model, self.val_loader, self.cfg, self.accelerator)


def _groups(loader, usable: int, k: int, accelerator):
    """Lists of k batches moved to the device; a batch whose images were all unreadable is skipped everywhere."""
    group = []
    for step, batch in enumerate(loader):
        if step == usable:
            break
        if any_process(accelerator, not batch):
            continue
        group.append(_to(batch, accelerator.device))
        if len(group) == k:
            yield group
            group = []


def _look_alike_loader(model, loader, train_df, tokenizer, cfg: Config, accelerator, epoch: int, crop: dict):
    """A loader whose batches group images the current weights find alike (similar_batches)."""
    pairs = loader.dataset
    image_embeds = encode_images(model, list(pairs.images), cfg)  # (I, D), indexed by pairs.image_ids
    if accelerator.num_processes > 1:  # every process must cut the same batches: take the main process's embeddings
        from accelerate.utils import broadcast

        image_embeds = broadcast(image_embeds.to(accelerator.device)).cpu()
    batches = similar_batches(image_embeds, pairs.image_ids, cfg.batch_size, cfg.hard_negatives, cfg.seed + epoch)
    return make_loader(train_df, tokenizer, cfg, train=True, batches=batches, **crop)


@torch.no_grad()
def _validate(model, loader, cfg: Config, accelerator) -> dict:
    """Mean validation loss per caption and text-to-image R@1 over the validation images, from one pass.

    With several processes, summed and gathered over all of them (the same numbers everywhere).
    """
    model.eval()
    total, count, images, texts, ids = 0.0, 0, [], [], []
    for batch in loader:
        if not batch:
            continue
        batch = _to(batch, accelerator.device)
        with precision_context(cfg, accelerator.device):
            image_embeds, text_embeds = model(batch)
            loss = contrastive_loss(image_embeds.float(), text_embeds.float(),
                                    accelerator.unwrap_model(model).logit_scale, batch["image_ids"], cfg.loss)
        total += loss.item() * len(batch["input_ids"])
        count += len(batch["input_ids"])
        for kept, rows in ((images, image_embeds), (texts, text_embeds), (ids, batch["image_ids"])):
            kept.append(gather_rows(rows.float(), with_grad=False)[0].cpu())  # (B, ...) all processes' rows
    if accelerator.num_processes > 1:  # every process then steps its scheduler on the same number
        sums = torch.tensor([total, count], dtype=torch.float64, device=accelerator.device)
        total, count = accelerator.reduce(sums, "sum").tolist()
    return dict(val_loss=total / max(count, 1), val_t2i_r1=_text_to_image_r1(images, texts, ids))


def _text_to_image_r1(images: list, texts: list, ids: list) -> float:
    """R@1 of each caption against every distinct validation image (each image embedded once per caption row)."""
    ids = torch.cat(ids)  # (M,)
    distinct, caption_to_image = torch.unique(ids, return_inverse=True)  # (N,), (M,)
    first = torch.zeros(len(distinct), dtype=torch.long).scatter_reduce(
        0, caption_to_image, torch.arange(len(ids)), "amin", include_self=False)  # a row of each image
    image_embeds = torch.nn.functional.normalize(torch.cat(images)[first], dim=-1)  # (N, D)
    text_embeds = torch.nn.functional.normalize(torch.cat(texts), dim=-1)  # (M, D)
    return recall_at_k(text_embeds @ image_embeds.T, caption_to_image, ks=(1,))["t2i_R@1"]


def _process_shares(loader, accelerator, train: bool, seed: int):
    """A loader over this process's contiguous share of each of `loader`'s global batches (itself with one process).

    Accelerate's split_between_processes cuts each batch in rank order, so the gathered batch is the one
    a single process would see and `batch_size` keeps its meaning. Every process gets the same number of
    batches: training batches are cut to a multiple of the process count (at most world - 1 rows dropped,
    and only from a table smaller than one batch: full batches divide evenly); a last validation batch
    shorter than the process count joins the one before it.

    Args:
        loader: from make_loader; its global batches are drawn here, from its seeded generator.
        accelerator: the run's; its process index and count.
        train: cut to equal shares (DDP's averaging then gives the whole batch's gradient).
        seed: worker seeds of this process, so processes augment with different random streams.
    """
    world = accelerator.num_processes
    if world == 1:
        return loader
    batches = [list(b) for b in loader.batch_sampler]  # the same on every process: the generator is seeded alike
    if train:
        batches = [b[:len(b) - len(b) % world] for b in batches]
    elif len(batches) > 1 and len(batches[-1]) < world:
        batches[-2:] = [batches[-2] + batches[-1]]
    shares = []
    for batch in (b for b in batches if len(b) >= world):
        with accelerator.split_between_processes(batch) as share:
            shares.append(share)
    return torch.utils.data.DataLoader(
        loader.dataset, batch_sampler=shares, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, collate_fn=loader.collate_fn,
        generator=torch.Generator().manual_seed(seed))


def fit(model: CLIPModel, tokenizer, train_df, val_df: pd.DataFrame, cfg: Config,
        resume: bool = False) -> pd.DataFrame:
    """Train with AdamW + ReduceLROnPlateau on val loss; keep the best checkpoint; return the history.

    This is train_loop plus validation (loss and text-to-image R@1), the plateau schedule, best/ and
    last/ checkpoints, resume, mixed precision and several GPUs. One history row per epoch: train and
    val loss, each group's learning rate, the temperature, val R@1, seconds (and peak GPU memory on
    CUDA). cfg.out_dir receives "best" (cfg.select_best, loaded back into `model` at the end), "last"
    (for resuming) and history.csv. Each epoch reseeds shuffling, augmentation and dropout from
    cfg.seed and the epoch number, so a resumed run repeats an uninterrupted one. With
    cfg.hard_negatives > 1, every epoch after the first takes its batches from similar_batches.

    The same code runs on one CPU or GPU and under `accelerate launch` or notebook_launcher on
    several GPUs or machines (see main). With N processes, cfg.batch_size is the global batch:
    each process takes batch_size / N rows of every batch, and the loss scores them against the
    embeddings of all processes. With cfg.gradient_accumulation_steps = k, one update scores
    k * batch_size rows against each other (accumulated_losses); each epoch uses a multiple of k
    batches. Batch-norm statistics stay per process, as in plain DDP. Only the main process writes
    to cfg.out_dir; with several machines it must be a shared folder.

    Args:
        model, tokenizer: from build_model (the same seed on every process).
        train_df, val_df: caption tables (checked with clean_table here); train_df may also be a folder
            of webdataset shards (write_shards), streamed by stream_loader.
        cfg: the run's Config.
        resume: continue from cfg.out_dir/"last" if it exists (a Colab session died mid-run).
    """
    accelerator = _accelerator(cfg)
    _check_batch_size(cfg, accelerator.num_processes)
    _check_image_size(model, cfg)  # a tower built for another size fails deep inside, or learns the wrong input
    _seed_everything(cfg.seed)
    model.to(accelerator.device)
    model.image_encoder.to(memory_format=torch.channels_last)  # faster convolutions on GPUs and on CPUs
    train_df, val_df = _clean_tables(train_df, val_df, cfg, accelerator.num_processes)
    task = _ClipTask(model, tokenizer, train_df, val_df, cfg, accelerator)
    optimizer = make_optimizer(model, cfg)
    learns_temperature = model.logit_scale.requires_grad
    if cfg.loss == "soft_target":  # its targets come from the embeddings: no temperature (DDP wants every
        model.logit_scale.requires_grad_(False)  # parameter it trains to get a gradient); restored at the end
    try:
        return train_loop(task, model, optimizer, cfg, accelerator, resume=resume)
    finally:
        model.logit_scale.requires_grad_(learns_temperature)


def _check_batch_size(cfg: Config, world: int) -> None:
    if cfg.batch_size % world:
        nearest = max(world, cfg.batch_size // world * world)
        raise ValueError(f"cfg.batch_size={cfg.batch_size} is the global batch, shared by {world} processes: "
                         f"make it a multiple of {world}, e.g. batch_size={nearest}")


def _clean_tables(train_df, val_df, cfg: Config, world: int):
    """The tables checked (clean_table, then _check_training_tables); a shard folder is checked by its index."""
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
    return train_df, val_df


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
    from .evaluate import retrieval_metrics
    from .model import build_model
    from .scale.launch import launched, parse_command_line, prepared_tables

    args, cfg = parse_command_line(argv, main.__doc__)
    with launched(cfg) as state:  # the process group, ended cleanly however the run ends
        train_df, val_df, test_df = prepared_tables(args, cfg, state)
        if args.prepare_only:
            return
        state.print(f"{cfg.mode} mode, {state.num_processes} process(es) on {state.device}, "
                    f"global batch {cfg.batch_size}")
        model, tokenizer = build_model(cfg, captions=train_df["caption"])
        fit(model, tokenizer, args.shards or train_df, val_df, cfg, resume=args.resume)
        if state.is_main_process and test_df is not None:
            print({k: round(v, 4) for k, v in retrieval_metrics(model, tokenizer, test_df, cfg).items()})


if __name__ == "__main__":
    main()
