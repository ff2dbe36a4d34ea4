"""Data that outgrows one disk read per caption: a table written as webdataset tar shards, and a streaming
loader that splits them by process and by worker, giving every process the same number of batches."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import Config
from .data import _collate, _resolve, clean_table, image_transforms, load_image

# A shard is a plain tar file: for each caption row, "<key>.jpg" (or the photo's own suffix: .png, .webp)
# holding the image file's bytes, "<key>.txt" the caption and "<key>.json" {"image_id", "image"}, members of
# one key side by side. Any webdataset reader reads them; index.json counts the rows of every shard.
INDEX = "index.json"
SHUFFLE_BUFFER = 1000  # samples (encoded: ~160 MB of COCO photos) each worker shuffles among, after the shard order


def write_shards(df: pd.DataFrame, folder, cfg: Config, rows_per_shard: int = 1000) -> Path:
    """Write a caption table as webdataset tar shards plus index.json; returns the folder.

    Rows are shuffled first (seeded by cfg.seed), so each shard mixes many images and a stream that
    reads whole shards still sees varied batches. image_id counts the table's distinct images: it is
    what keeps several captions of one photo positives of each other in a batch.

    Args:
        df: table with `image` and `caption` (checked with clean_table first).
        folder: where shard-000000.tar, ... and index.json go (the old ones are replaced).
        cfg: image_dir, on_bad_input and seed.
        rows_per_shard: caption rows per tar file; use at least processes x workers shards (see stream_loader).
    """
    if not (isinstance(rows_per_shard, int) and rows_per_shard >= 1):
        raise ValueError(f"rows_per_shard must be an integer >= 1, got {rows_per_shard!r}")
    df = clean_table(df, cfg, name="shard")
    image_ids, images = pd.factorize(df["image"])
    order = np.random.default_rng(cfg.seed).permutation(len(df))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("shard-*.tar"):
        old.unlink()
    shards = []
    for start in range(0, len(order), rows_per_shard):
        name = f"shard-{len(shards):06d}.tar"
        rows = order[start:start + rows_per_shard]
        with tarfile.open(folder / name, "w") as tar:
            for row in rows:
                path = Path(_resolve(df["image"].iat[row], cfg))
                suffix = path.suffix.lower().lstrip(".") or "jpg"
                meta = dict(image_id=int(image_ids[row]), image=str(df["image"].iat[row]))
                for member, data in ((suffix, path.read_bytes()), ("txt", df["caption"].iat[row].encode()),
                                     ("json", json.dumps(meta, ensure_ascii=False).encode())):
                    info = tarfile.TarInfo(f"{row:09d}.{member}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(dict(name=name, rows=len(rows)))
    index = dict(rows=len(df), images=len(images), shards=shards)
    (folder / INDEX).write_text(json.dumps(index, indent=1))
    return folder


def read_index(folder) -> dict:
    """index.json of a shard folder: {"rows", "images", "shards": [{"name", "rows"}, ...]}."""
    path = Path(folder) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {folder} is not a shard folder; write one with write_shards")
    return json.loads(path.read_text())


def _samples(path: Path):
    """(image bytes, caption, image id) of each key in one tar file, in file order."""
    with tarfile.open(path, "r|") as tar:  # "r|": one forward pass, as over a network stream
        key, parts = None, {}
        for member in tar:
            stem, _, suffix = member.name.partition(".")
            if stem != key:
                if parts:
                    yield parts
                key, parts = stem, {}
            parts[suffix] = tar.extractfile(member).read()
        if parts:
            yield parts


class _ShardStream(torch.utils.data.IterableDataset):
    """One process's share of the shards, as batches of its own rows; each worker takes a share of that."""

    def __init__(self, folder, tokenizer, cfg: Config, rank: int, world: int, epoch: int, transform):
        self.folder, self.tokenizer, self.cfg, self.transform = Path(folder), tokenizer, cfg, transform
        self.rank, self.world, self.epoch = rank, world, epoch
        index = read_index(folder)
        self.shards = [s["name"] for s in index["shards"]]
        self.rows = [s["rows"] for s in index["shards"]]
        self.local_batch = cfg.batch_size // world
        self.steps = index["rows"] // cfg.batch_size  # global batches per epoch; the ragged rest is dropped

    def __len__(self):
        return self.steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers  # this reader among all of them
        # The same shard order on every process (seeded by the epoch), so the slots share it out without talking.
        order = np.random.default_rng([self.cfg.seed, self.epoch]).permutation(len(self.shards))
        # Enough shards: each reader takes whole ones. Too few: every reader reads all, keeping every slots-th sample.
        whole = len(self.shards) >= slots
        mine = order[slot::slots] if whole else order
        share = sum(self.rows[k] for k in mine) // (1 if whole else slots)  # about this reader's rows
        buffer_size = max(1, min(SHUFFLE_BUFFER, share))  # never so big that it holds a sample twice
        rng = np.random.default_rng([self.cfg.seed, self.epoch, slot])
        self.transform.set_random_seed(int(rng.integers(2**31)))
        # Readers owe equal shares of the epoch's batches; one whose shards run out first starts them over.
        batches = self.steps // workers + (worker < self.steps % workers)  # the DataLoader takes workers in turn
        buffer, batch = [], []
        for parts in self._forever(mine, None if whole else (slot, slots)):
            if batches == 0:
                return
            buffer.append(parts)
            if len(buffer) < buffer_size:
                continue
            batch.append(self._decode(buffer.pop(int(rng.integers(len(buffer))))))
            if len(batch) == self.local_batch:
                yield _collate(batch, self.tokenizer, self.cfg.max_length)
                batch, batches = [], batches - 1

    def _forever(self, shards, stride):
        if len(shards) == 0:
            return
        while True:  # stops when __iter__ has its batches
            for k in shards:
                for j, parts in enumerate(_samples(self.folder / self.shards[k])):
                    if stride is None or j % stride[1] == stride[0]:
                        yield parts

    def _decode(self, parts: dict):
        suffix = next(s for s in parts if s not in ("txt", "json"))
        try:
            image = load_image(io.BytesIO(parts[suffix]), max_side=self.cfg.image_size)
        except Exception:  # a broken file: dropped, the collate counts only the good rows
            return None
        meta = json.loads(parts["json"])
        return self.transform(image=image)["image"], parts["txt"].decode(), int(meta["image_id"])


def stream_loader(folder, tokenizer, cfg: Config, rank: int = 0, world: int = 1, epoch: int = 1,
                  mean=None, std=None):
    """A DataLoader streaming this process's share of a shard folder: len() batches of batch_size / world rows.

    Each epoch reshuffles the shard order (the same on every process) and each reader's sample
    order. Every process gets exactly the same number of batches, rows // batch_size, so no process
    waits at a collective for one that has finished; a process whose shards hold fewer rows
    repeats some of them. With at least processes x workers shards, readers take whole shards;
    with fewer, all read every shard and keep their share of its samples.

    Args:
        folder: from write_shards.
        tokenizer: Hugging Face tokenizer used per batch.
        cfg: batch_size (the global batch), image_size, num_workers, seed.
        rank, world: this process's index and the number of processes.
        epoch: reseeds shard order, sample order and augmentation.
        mean, std: the image encoder's normalisation (defaults to ImageNet's).
    """
    norm = {k: v for k, v in dict(mean=mean, std=std).items() if v is not None}
    stream = _ShardStream(folder, tokenizer, cfg, rank, world, epoch, image_transforms(cfg, True, **norm))
    if stream.steps == 0:
        raise ValueError(f"{folder} holds {read_index(folder)['rows']} rows, fewer than one batch "
                         f"(batch_size={cfg.batch_size}): write more rows or lower batch_size")
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    # batch_size=None: the stream yields whole batches, each worker its own in turn
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers if cuda else 0,
                                       pin_memory=cuda)
