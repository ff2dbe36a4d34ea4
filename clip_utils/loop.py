"""The one training loop, shared by fit (the CLIP loss) and distillation (a loss against a teacher): the shape of
Accelerate's examples (prepare; for each batch: forward, loss, backward, step; evaluate; schedule; checkpoint),
with what differs between the two behind a small seam, the task."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import pandas as pd
import torch

from .checkpoints import _load_weights, restore_training_state, save_checkpoint, save_training_state
from .config import Config, _device
from .files import atomic_write


def train_loop(task, model, optimizer, cfg: Config, accelerator, resume: bool = False) -> pd.DataFrame:
    """Train `model` on `task` for cfg.epochs; returns the history, one row per epoch.

    The task supplies the data and the loss: task.batches(epoch) returns the epoch's updates, each a
    list of micro-batches, task.embed(model, batch) is the forward pass, task.loss(model, features, group,
    shared) the loss of a group's rows from their features, task.evaluate(model) the validation
    numbers ({"val_loss": ...}). ReduceLROnPlateau steps on the validation loss; cfg.out_dir gets
    "best" (cfg.select_best, loaded back at the end), "last" (with the optimizer's, scheduler's and
    scaler's state: resume=True goes on from it) and history.csv. A cfg.max_minutes stop inside an
    epoch records nothing of it: a resumed run repeats that epoch, as an uninterrupted run would.
    """
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.factor, patience=cfg.patience)
    scaler = torch.amp.GradScaler(enabled=mixed_precision(cfg) == "fp16")  # only fp16 needs its loss scaled
    run = _Run(cfg, accelerator, task.tokenizer)
    if resume:
        run.restore(model, optimizer, scheduler, scaler)
    trained, optimizer = accelerator.prepare(model, optimizer)  # on this process's device; DDP with several
    for epoch in run.epochs():
        start = time.time()
        batches = task.batches(epoch)  # updates of k micro-batches each (look-alike mining runs here, in eval mode)
        trained.train()
        total, rows = 0.0, 0
        for step, group in enumerate(batches):  # one update over all the rows of the group's micro-batches
            with _explained(epoch, step, cfg):
                for loss in accumulated_losses(task, trained, group, cfg, accelerator):  # forward and loss
                    accelerator.backward(scaler.scale(loss))  # DDP averages the gradients over processes
                group_loss = run.finite(loss, epoch, step)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            task.after_step(model)
            n = task.rows(group) * accelerator.num_processes
            total, rows = total + group_loss * n, rows + n
            if run.out_of_time():
                break
        if run.stopped:  # mid-epoch: the epoch is not recorded (resume repeats it)
            break
        metrics = task.evaluate(trained)  # the same numbers on every process
        scheduler.step(metrics["val_loss"])
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups if g["params"]}  # groups that train
        row = dict(epoch=epoch, train_loss=total / max(rows, 1), val_loss=metrics.pop("val_loss"), **lrs,
                   **task.report(model), **metrics, seconds=time.time() - start)
        run.record(row, model, optimizer, scheduler, scaler)
    return run.finish(model)


def accumulated_losses(task, model, group: list, cfg: Config, accelerator):
    """The loss of all of `group`'s rows, once per micro-batch, each time with gradients through that one alone.

    open_clip's --accum-freq method: a first pass embeds every micro-batch without gradients; then
    each micro-batch is embedded again with gradients and its features replace the cached ones, so
    every row meets the negatives of all k micro-batches and the gradients, summed over the k
    backward passes, are those of one batch of all the rows. Parameters outside the features (the
    temperature) take their gradient in the last pass only. One micro-batch: a plain forward pass.
    """
    autocast = precision_context(cfg, accelerator.device)
    cached = None
    if len(group) > 1:
        with torch.no_grad(), autocast:
            cached = [task.embed(model, batch) for batch in group]  # k tuples of (b, D) features
    for j, batch in enumerate(group):
        last = j == len(group) - 1
        # DDP reduces the gradients once, in the last backward pass; the others only add them up locally
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with autocast:
                features = task.embed(model, batch)
                if cached is not None:  # this micro-batch's features, with gradients, among the others' cached ones
                    features = [torch.cat([*(c[i] for c in cached[:j]), own, *(c[i] for c in cached[j + 1:])])
                                for i, own in enumerate(features)]  # (k * b, D) each
                loss = task.loss(model, features, group, shared=last)
            yield loss


def mixed_precision(cfg: Config) -> str:
    """cfg.precision for this machine: "bf16" where the hardware has it, else "fp16" on GPUs, "no" on CPUs."""
    cuda = _device(cfg).type == "cuda"
    if cfg.precision != "auto":
        return "no" if cfg.precision == "fp32" else "bf16"
    if not cuda:
        return "bf16" if _cpu_has_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"  # a T4 only emulates bf16


def precision_context(cfg: Config, device: torch.device):
    """torch's autocast for this run's precision (off for fp32).

    The run's own, not Accelerate's: Accelerate fixes mixed precision once per process, and a
    notebook may fit in fp32 and then in bf16.
    """
    precision = mixed_precision(cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "no")


def _cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 math (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def any_process(accelerator, flag: bool) -> bool:
    """True on every process as soon as it is true on one (so that all of them take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max"))


def _budget_spent(start: float, cfg: Config, accelerator) -> bool:
    """cfg.max_minutes has passed since `start`, on any process."""
    return bool(cfg.max_minutes) and any_process(accelerator, time.time() - start > cfg.max_minutes * 60)


@contextlib.contextmanager
def _explained(epoch: int, step: int, cfg: Config):
    """Out of memory names the batch and suggests a smaller one."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise torch.OutOfMemoryError(f"out of memory at epoch {epoch}, batch {step} with batch_size={cfg.batch_size}: "
                                     f"try Config(batch_size={max(2, cfg.batch_size // 2)}) or a smaller "
                                     f"image_size. ({error})") from None


class _Run:
    """The loop's bookkeeping: history, the best score, the time budget and the checkpoints in cfg.out_dir."""

    def __init__(self, cfg: Config, accelerator, tokenizer):
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.out_dir = Path(cfg.out_dir)
        self.history, self.best, self.first_epoch = [], math.inf, 1
        self.start, self.stopped = time.time(), False
        if accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def restore(self, model, optimizer, scheduler, scaler) -> None:
        """Go on from out_dir/"last" if it exists (every process reads the same state)."""
        last = self.out_dir / "last"
        if (last / "training_state.pt").exists():
            self.history, self.best = restore_training_state(last, model, optimizer, scheduler, scaler)
            self.first_epoch = len(self.history) + 1
            self.accelerator.print(f"resuming after epoch {len(self.history)} from {last}")

    def finite(self, loss: torch.Tensor, epoch: int, step: int) -> float:
        """The whole batch's loss; a non-finite one raises before the update, so the weights stay good."""
        whole = self.accelerator.reduce(loss.detach(), "mean")  # decided alike on every process
        if not torch.isfinite(whole):
            kept = (f"the last good weights are in {self.out_dir / 'best'} and {self.out_dir / 'last'}"
                    if self.history else "no checkpoint was written yet")
            raise FloatingPointError(f"loss is {whole.item()} at epoch {epoch}, batch {step}; training stopped, {kept}")
        return whole.item()

    def epochs(self):
        """The epochs still to train, until the time budget is spent."""
        for epoch in range(self.first_epoch, self.cfg.epochs + 1):
            if self.stopped:
                return
            yield epoch

    def out_of_time(self) -> bool:
        """The budget ran out inside an epoch: that epoch is dropped."""
        self.stopped = _budget_spent(self.start, self.cfg, self.accelerator)
        if self.stopped:
            self.accelerator.print(f"stopping: the {self.cfg.max_minutes}-minute budget (cfg.max_minutes) is spent; "
                                   f"epoch {len(self.history) + 1} is not recorded (resume=True repeats it)")
        return self.stopped

    def _score(self, row: dict) -> float:
        """Lower is better: the validation loss, or minus validation R@1 (cfg.select_best)."""
        key = self.cfg.select_best if self.cfg.select_best in row else "val_loss"
        return -row[key] if key != "val_loss" else row[key]

    def record(self, row: dict, model, optimizer, scheduler, scaler) -> None:
        """Append the epoch; the main process writes best/ (if it is), last/ and history.csv."""
        if self.accelerator.device.type == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.history.append(row)
        score = self._score(row)
        self.accelerator.print(f"epoch {row['epoch']}: train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                               f"({row['seconds']:.0f}s)" + ("  best" if score < self.best else ""))
        if self.accelerator.is_main_process:  # the others hold the same weights
            if score < self.best:
                save_checkpoint(self.out_dir / "best", model, self.tokenizer, self.cfg)
            save_training_state(self.out_dir / "last", model, self.tokenizer, self.cfg, optimizer, scheduler,
                                scaler, self.history, min(self.best, score))
            with atomic_write(self.out_dir / "history.csv") as tmp:  # a crash never leaves a short history
                pd.DataFrame(self.history).to_csv(tmp, index=False)
        self.best = min(self.best, score)
        self.accelerator.wait_for_everyone()  # nobody reads or resumes a half-written checkpoint
        self.stopped = _budget_spent(self.start, self.cfg, self.accelerator)
        if self.stopped:
            self.accelerator.print(f"stopping: the {self.cfg.max_minutes}-minute budget (cfg.max_minutes) is spent")

    def finish(self, model) -> pd.DataFrame:
        """Load the best epoch's weights back into `model`; the history as a table."""
        if math.isfinite(self.best):
            _load_weights(model, self.out_dir / "best" / "model.safetensors")
        return pd.DataFrame(self.history)
