"""Data that outgrows one disk read per caption: a table written as webdataset tar shards, and a streaming
loader that splits them by process and by worker, giving every process the same number of batches."""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..data import _collate, _loader_workers, _resolve, clean_table, image_transforms, load_image
from ..files import atomic_write, file_fingerprint

# A shard is a plain tar file: for each caption row, "<key>.jpg" (or the photo's own suffix: .png, .webp)
# holding the image file's bytes, "<key>.txt" the caption and "<key>.json" {"image_id", "image"}, members of
# one key side by side. Any webdataset reader reads them; index.json counts the rows of every shard.
INDEX = "index.json"
SHUFFLE_BUFFER = 1000  # samples (encoded: ~160 MB of COCO photos) each worker shuffles among, after the shard order


def _fingerprint(df: pd.DataFrame, cfg: Config, max_side, rows_per_shard: int) -> str:
    """A hash of what write_shards would write: rows, photo files, shuffling seed, photo and shard sizes."""
    import hashlib

    files = file_fingerprint([_resolve(image, cfg) for image in pd.unique(df["image"])])  # photos replaced in place too
    digest = hashlib.sha256(f"{cfg.seed} {max_side} {cfg.image_dir} {rows_per_shard} {files}".encode())
    for image, caption in zip(df["image"], df["caption"]):
        digest.update(f"{image}\t{caption}\n".encode())
    return digest.hexdigest()


def _photo_bytes(path: Path, max_side) -> tuple[str, bytes]:
    """(suffix, bytes) of a photo: the file itself, or re-encoded as JPEG with its shorter side at most max_side."""
    if not max_side:
        return path.suffix.lower().lstrip(".") or "jpg", path.read_bytes()
    from PIL import Image

    image = Image.fromarray(load_image(path, max_side=max_side))
    scale = max_side / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return "jpg", out.getvalue()


def write_shards(df: pd.DataFrame, folder, cfg: Config, rows_per_shard: int = 1000,
                 max_side: int | None = None) -> Path:
    """Write a caption table as webdataset tar shards plus index.json; returns the folder.

    Rows are shuffled first (seeded by cfg.seed), so each shard mixes many images and a stream that
    reads whole shards still sees varied batches. image_id counts the table's distinct images: it is
    what keeps several captions of one photo positives of each other in a batch. Each caption row
    carries its photo, so a photo with 5 captions is stored 5 times: max_side shrinks them (COCO's
    566k Hindi rows: ~90 GB as the original files, ~20 GB at max_side=256). A folder already written
    from the same table, seed and max_side is kept as it is; index.json is written last, so a
    folder whose writing was interrupted is written again.

    Args:
        df: table with `image` and `caption` (checked with clean_table first).
        folder: where shard-000000.tar, ... and index.json go (older ones are replaced).
        cfg: image_dir, on_bad_input and seed.
        rows_per_shard: caption rows per tar file; use at least processes x workers shards (see stream_loader).
        max_side: re-encode each photo as a JPEG whose shorter side is at most this (None: the file's own bytes).
    """
    if not (isinstance(rows_per_shard, (int, np.integer)) and not isinstance(rows_per_shard, bool)
            and rows_per_shard >= 1):
        raise ValueError(f"rows_per_shard must be an integer >= 1, got {rows_per_shard!r}")
    rows_per_shard = int(rows_per_shard)  # a numpy integer too
    folder = Path(folder)
    fingerprint = _fingerprint(df, cfg, max_side, rows_per_shard)
    if (folder / INDEX).exists() and read_index(folder).get("fingerprint") == fingerprint:
        return folder
    df = clean_table(df, cfg, name="shard")
    image_ids, images = pd.factorize(df["image"])
    order = np.random.default_rng(cfg.seed).permutation(len(df))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)  # no index while the shards are being replaced
    for old in folder.glob("shard-*.tar"):
        old.unlink()
    shards = []
    for start in range(0, len(order), rows_per_shard):
        name = f"shard-{len(shards):06d}.tar"
        rows = order[start:start + rows_per_shard]
        with tarfile.open(folder / name, "w") as tar:
            for row in rows:
                suffix, photo = _photo_bytes(Path(_resolve(df["image"].iat[row], cfg)), max_side)
                meta = dict(image_id=int(image_ids[row]), image=str(df["image"].iat[row]))
                for member, data in ((suffix, photo), ("txt", df["caption"].iat[row].encode()),
                                     ("json", json.dumps(meta, ensure_ascii=False).encode())):
                    info = tarfile.TarInfo(f"{row:09d}.{member}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(dict(name=name, rows=len(rows), bytes=(folder / name).stat().st_size))  # checked on reading
    index = dict(rows=len(df), images=len(images), fingerprint=fingerprint, shards=shards)
    with atomic_write(folder / INDEX) as partial:  # all or nothing: a reader never sees half an index
        partial.write_text(json.dumps(index, indent=1))
    return folder


def read_index(folder) -> dict:
    """index.json of a shard folder: {"rows", "images", "shards": [{"name", "rows"}, ...]}."""
    path = Path(folder) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {folder} is not a shard folder; write one with write_shards")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): write the shards again (write_shards)") from None


def _samples(path: Path):
    """(image bytes, caption, image id) of each key in one tar file, in file order."""
    try:
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
    except (tarfile.TarError, EOFError, OSError) as error:  # cut short or damaged: tarfile names no file
        raise ValueError(f"shard {path} cannot be read to its end ({type(error).__name__}: {error}): it is cut "
                         "short or damaged; write the shards again (write_shards)") from None


def _check_shards(folder: Path, index: dict) -> None:
    """Every shard index.json lists is there, at the size it was written (index.json from before sizes: present)."""
    for shard in index["shards"]:
        path = folder / shard["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} is missing ({folder / INDEX} lists it): write the shards again")
        if "bytes" in shard and path.stat().st_size != shard["bytes"]:
            raise ValueError(f"shard {path} has {path.stat().st_size} bytes but {INDEX} records {shard['bytes']}: "
                             "it was cut short or replaced; write the shards again (write_shards)")


def _reader_shares(rows: list[int], order, slots: int) -> tuple[list, bool]:
    """Each reader's shards (whole shards, dealt by rows) and whether readers take whole shards.

    With at least as many shards as readers, each shard goes to the reader with the fewest rows so
    far, so the shares differ by at most one shard's rows. With fewer, every reader reads every
    shard and keeps every slots-th sample (counted over all shards in order): shares differ by one row.
    """
    if len(order) < slots:
        return [list(order)] * slots, False
    shares, loads = [[] for _ in range(slots)], [0] * slots
    for k in order:
        lightest = min(range(slots), key=lambda s: loads[s])
        shares[lightest].append(k)
        loads[lightest] += rows[k]
    return shares, True


class _ShardStream(torch.utils.data.IterableDataset):
    """One process's share of the shards, as batches of its own rows; each worker takes a share of that."""

    def __init__(self, folder, tokenizer, cfg: Config, rank: int, world: int, epoch: int, transform, workers: int):
        self.folder, self.tokenizer, self.cfg, self.transform = Path(folder), tokenizer, cfg, transform
        self.rank, self.world, self.epoch, self.workers = rank, world, epoch, max(workers, 1)
        index = read_index(folder)
        _check_shards(self.folder, index)
        self.shards = [s["name"] for s in index["shards"]]
        self.rows = [s["rows"] for s in index["shards"]]
        self.local_batch = cfg.batch_size // world
        slots = world * self.workers
        # The same shard order on every process (seeded by the epoch), so the readers share it out without talking.
        self.order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.shards))
        self.shares, self.whole = _reader_shares(self.rows, self.order, slots)
        share_rows = ([sum(self.rows[k] for k in share) for share in self.shares] if self.whole else
                      [sum(self.rows) // slots] * slots)
        # Every reader yields as many batches as the smallest share fills: no process waits for another at a
        # collective, and no row repeats (a few rows of the larger shares wait for the next epoch's order).
        self.batches_per_reader = min(share_rows) // self.local_batch

    def __len__(self):
        return self.batches_per_reader * self.workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        slot, slots = self.rank * self.workers + worker, self.world * self.workers
        rng = np.random.default_rng([self.cfg.seed, self.epoch, slot])
        self.transform.set_random_seed(int(rng.integers(2**31)))
        wanted = self.batches_per_reader * self.local_batch
        samples = self._share(slot, slots)
        buffer, batch, made = [], [], 0
        while made < self.batches_per_reader:
            for parts in samples:  # fill the buffer, then draw from it at random
                buffer.append(parts)
                if len(buffer) >= min(SHUFFLE_BUFFER, wanted):
                    break
            if not buffer:
                return  # cannot happen: every share holds at least `wanted` samples
            batch.append(self._decode(buffer.pop(int(rng.integers(len(buffer))))))
            if len(batch) == self.local_batch:
                yield _collate(batch, self.tokenizer, self.cfg.max_length)
                batch, made = [], made + 1

    def _share(self, slot: int, slots: int):
        """This reader's samples, in its shards' order: whole shards, or every slots-th sample of all of them."""
        counted = 0
        for k in self.shares[slot]:
            found = 0
            for parts in _samples(self.folder / self.shards[k]):
                if self.whole or counted % slots == slot:
                    yield parts
                counted, found = counted + 1, found + 1
            if found != self.rows[k]:  # streaming on would give fewer batches than len() promised
                raise ValueError(f"shard {self.folder / self.shards[k]} holds {found} samples but {INDEX} promises "
                                 f"{self.rows[k]}: write the shards again (write_shards)")

    def _decode(self, parts: dict):
        suffix = next(s for s in parts if s not in ("txt", "json"))
        try:
            image = load_image(io.BytesIO(parts[suffix]), max_side=self.cfg.image_size)
        except Exception as error:  # a broken file: dropped, the batch is one row shorter
            warnings.warn(f"skipping an unreadable image in {self.folder}: {error}")
            return None
        meta = json.loads(parts["json"])
        return self.transform(image=image)["image"], parts["txt"].decode(), int(meta["image_id"])


def _check_world(rank, world, batch_size: int) -> None:
    """Processes that can share the global batch: 0 <= rank < world, and batch_size a multiple of world."""
    integer = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    if not (integer(world) and world >= 1):
        raise ValueError(f"stream_loader: world={world!r} must be the number of processes, an integer >= 1")
    if not (integer(rank) and 0 <= rank < world):
        raise ValueError(f"stream_loader: rank={rank!r} must be this process's index, 0 <= rank < world={world}")
    if batch_size % world:
        nearest = max(world, batch_size // world * world)
        raise ValueError(f"stream_loader: cfg.batch_size={batch_size} is the global batch, shared by world={world} "
                         f"processes: use a multiple of {world}, e.g. batch_size={nearest}")


def stream_loader(folder, tokenizer, cfg: Config, rank: int = 0, world: int = 1, epoch: int = 1,
                  crop_pct=None, interpolation: str = "bilinear"):
    """A DataLoader streaming this process's share of a shard folder: len() batches of batch_size / world rows.

    Each epoch reshuffles the shard order (the same on every process) and each reader's sample
    order (a reader is one worker of one process). Every reader yields the same number of batches,
    as many as the smallest share fills, so no process waits at a collective for one that has
    finished, and no row repeats within an epoch. With at least processes x workers shards, readers
    take whole shards (dealt by rows); with fewer, all read every shard and keep their share of it.

    Args:
        folder: from write_shards.
        tokenizer: Hugging Face tokenizer used per batch.
        cfg: batch_size (the global batch), image_size, num_workers, seed.
        rank, world: this process's index and the number of processes.
        epoch: reseeds shard order, sample order and augmentation.
        crop_pct, interpolation: the image encoder's crop (ImageEncoder.crop), for cfg.image_geometry="crop".
    """
    _check_world(rank, world, cfg.batch_size)
    workers, cuda = _loader_workers(cfg)
    transform = image_transforms(cfg, True, normalize=False, crop_pct=crop_pct,
                                 interpolation=interpolation)  # uint8 pixels: the encoder normalises
    stream = _ShardStream(folder, tokenizer, cfg, rank, world, epoch, transform, workers)
    if len(stream) == 0:
        raise ValueError(f"{folder} holds {read_index(folder)['rows']} rows in {len(stream.shards)} shards: too "
                         f"few to give each of {world} process(es) x {max(workers, 1)} reader(s) one batch of "
                         f"{stream.local_batch}; write more rows or smaller shards, or lower batch_size")
    # batch_size=None: the stream yields whole batches, each worker its own in turn
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=cuda)
