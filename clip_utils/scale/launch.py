"""The command line's engine: its arguments, the process group of a launch (with a long wait for the data and a
short one for training collectives, ended cleanly) and the tables it trains on."""
from __future__ import annotations

import contextlib
import datetime

import pandas as pd

from ..config import Config, _device
from ..datasets import prepare_data
from .shards import write_shards

DATA_WAIT_MINUTES = 60  # the others wait this long for the main process to download and prepare the data


def parse_command_line(argv=None, description: str = ""):
    """(args, cfg) from `python -m clip_utils.train ...` arguments; Config fields by their flags."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clip_utils.train", description=description)
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
                       ("seed", int), ("num_workers", int), ("image_cache", str), ("device", str),
                       ("collective_timeout_minutes", float), ("select_best", str)]:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=f"Config.{name}")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None}
    cfg = Config.from_env(**overrides) if args.mode is None else getattr(Config, args.mode)(**overrides)
    if args.data == "coco35l" and cfg.mode != "full":
        parser.error("--data coco35l is full mode's: add --mode full (quick mode draws synthetic scenes)")
    return args, cfg


@contextlib.contextmanager
def launched(cfg: Config):
    """This process's place in the launch (Accelerate's PartialState), its process group ended on the way out.

    Training collectives fail after cfg.collective_timeout_minutes (a hanging rank ends the launch);
    the wait for the data (see prepared_tables) has its own group with a DATA_WAIT_MINUTES timeout.
    Ending the group before the interpreter exits is what keeps a finished launch from aborting.
    """
    from accelerate import PartialState

    state = PartialState(cpu=_device(cfg).type == "cpu",
                         timeout=datetime.timedelta(minutes=cfg.collective_timeout_minutes))
    try:
        yield state
        state.wait_for_everyone()  # nobody tears the group down while another process still talks in it
    finally:
        state.destroy_process_group()


@contextlib.contextmanager
def _main_process_first(state):
    """The others wait (up to DATA_WAIT_MINUTES, on a gloo group of their own) while the main process goes first."""
    if not state.use_distributed:
        yield
        return
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=DATA_WAIT_MINUTES))
    if not state.is_main_process:
        dist.barrier(group=group)
    yield
    if state.is_main_process:
        dist.barrier(group=group)
    dist.destroy_process_group(group)


def prepared_tables(args, cfg: Config, state):
    """(train, val, test) tables for the run; the main process downloads or draws them, the others find them cached.

    A Flickr8k download and translation take minutes, longer than the training collectives may wait;
    COCO-35L takes hours: run --prepare-only first.
    """
    with _main_process_first(state):
        if args.train_csv:
            train_df, val_df, test_df = pd.read_csv(args.train_csv), pd.read_csv(args.val_csv), None
        elif args.data == "coco35l" and cfg.mode == "full":
            from .coco35l import prepare_coco35l

            train_df, val_df, test_df = prepare_coco35l(args.data_dir or "data/coco35l", args.language)
        else:
            train_df, val_df, test_df = prepare_data(cfg, args.data_dir or f"data/{cfg.mode}", args.captions)
        if args.shards and state.is_main_process:  # kept as they are if written from this table before
            write_shards(train_df, args.shards, cfg, max_side=cfg.image_size * 8 // 7)  # 256 px at 224
    if args.prepare_only:
        shards = f", shards in {args.shards}" if args.shards else ""
        state.print(f"data ready: {len(train_df)} training captions{shards}")
    return train_df, val_df, test_df
