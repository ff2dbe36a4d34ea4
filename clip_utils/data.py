"""Caption tables in, batches out: image decoding, cleaning bad rows,
augmentation, the decode-once cache, the DataLoader and hard-negative batches."""
from __future__ import annotations

import math
import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import Config, _device
from .files import atomic_write, file_fingerprint
from .pixels import _pil_rgb
from .tables import _check_columns
from .text import caption_text, normalize_caption

# A table is a pandas DataFrame with columns `image` (absolute, or relative to
# cfg.image_dir) and `caption`, one row per caption, several rows per image allowed.


def _resolve(path, cfg: Config) -> str:
    path = str(path)
    return path if os.path.isabs(path) or not cfg.image_dir else os.path.join(cfg.image_dir, path)


def load_image(path, max_side: int | None = None) -> np.ndarray:
    """Decode any image file to an RGB uint8 array (H, W, 3); huge images are shrunk while decoding."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        if max_side:
            image.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2, 1/4, 1/8 scale: cheap
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # phone photos store "rotate me" in EXIF, not in pixels
        if max_side and max(image.size) > 2 * max_side:
            image.thumbnail((2 * max_side, 2 * max_side))
        return _pil_rgb(image)


def clean_table(df: pd.DataFrame, cfg: Config, check_images: bool = True, name: str = "caption") -> pd.DataFrame:
    """Validate a caption table: required columns, usable captions, readable images.

    Bad rows raise a ValueError naming the row and file (cfg.on_bad_input="raise") or are
    dropped with one warning that counts them ("skip"). Captions come back normalised.
    A table with no usable row left is a ValueError that counts the causes.

    Args:
        df: table with `image` and `caption` columns.
        cfg: supplies image_dir, image_size and on_bad_input.
        check_images: decode every distinct image once, so no bad file surfaces mid-epoch.
        name: what the errors call the table ("train", "val", "test", ...).
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"the {name} table must be a pandas DataFrame with columns 'image' and 'caption', "
                         f"not {type(df).__name__}")
    _check_columns(df, ("image", "caption"), f"the {name} table")
    if df.empty:
        raise ValueError(f"the {name} table has no rows")
    df = df.copy()
    cells = df["caption"].copy()  # as given: a non-text cell is named in the message
    texts = [caption_text(c) for c in cells]  # None: a number, a list, undecodable bytes
    df["caption"] = [normalize_caption(t) if t is not None else "" for t in texts]
    non_text = pd.Series([t is None for t in texts], index=df.index)
    duplicated = df.duplicated(["image", "caption"]) & df["caption"].ne("")  # empty ones are counted below
    if duplicated.any():  # an exact repeat would count twice as much; dropping it loses nothing
        warnings.warn(f"dropped {duplicated.sum()} duplicate (image, caption) rows, e.g. row "
                      f"{duplicated.idxmax()}", stacklevel=2)
        df, cells, non_text = df[~duplicated], cells[~duplicated], non_text[~duplicated]
    row_names = list(df.index)  # messages name rows by the caller's index, not by position
    df = df.reset_index(drop=True)
    problems = {}  # row index -> (kind, detail)
    for i in np.flatnonzero(df["caption"].eq("").to_numpy()):
        problems[i] = (("non-text caption", f"({type(cells.iat[i]).__name__} {cells.iat[i]!r:.60})")
                       if non_text.iat[i] else ("empty or missing caption", ""))
    for i, image in enumerate(df["image"]):  # None, NaN, pd.NA, or a number where a path belongs
        if not isinstance(image, os.PathLike) and caption_text(image) in ("", None):
            problems[i] = (("missing" if caption_text(image) == "" else "non-text") + " image path", f"({image!r})")
    if check_images:
        bad_files = {}
        for image in pd.unique(df["image"]):
            path = _resolve(image, cfg)
            try:
                load_image(path, max_side=cfg.image_size)
            except Exception as error:  # any decoder failure means the file is unusable
                bad_files[image] = ("unreadable image", f"{path} ({type(error).__name__}: {error})")
        for i, image in enumerate(df["image"]):
            if image in bad_files:
                problems.setdefault(i, bad_files[image])
    if problems and cfg.on_bad_input == "raise":
        first = min(problems)
        raise ValueError(f"{len(problems)} bad rows; first is row {row_names[first]}: "
                         f"{' '.join(problems[first]).strip()} "
                         f"(set on_bad_input='skip' to drop them with a warning)")
    if problems:
        kinds = pd.Series([kind for kind, _ in problems.values()]).value_counts()
        counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        if len(problems) == len(df):
            first = min(problems)
            raise ValueError(f"no usable row left in the {name} table: all {len(df)} rows were dropped ({counts}); "
                             f"first is row {row_names[first]}: {' '.join(problems[first]).strip()}")
        examples = sorted({detail.split(" (")[0] for _, detail in problems.values()} - {""})[:3]
        warnings.warn(f"skipped {len(problems)} of {len(df)} rows: {counts}" +
                      (f"; e.g. {', '.join(examples)}" if examples else ""), stacklevel=2)
        df = df.drop(index=list(problems)).reset_index(drop=True)
    return df


def _crop_side(cfg: Config, crop_pct: float | None) -> int:
    """The shorter side a "crop" view resizes to: image_size / crop_pct (timm's default crop fraction is 0.875)."""
    return math.floor(cfg.image_size / (crop_pct or 0.875))


def _resize_steps(cfg: Config, crop_pct=None, interpolation: str = "bilinear") -> list:
    """The resize every view of a photo starts with, and what the decode-once cache stores.

    "square" stretches the photo to image_size x image_size; "crop" keeps its aspect ratio and resizes
    its shorter side to _crop_side, with the tower's own resampling.
    """
    import albumentations as A
    import cv2

    if cfg.image_geometry not in ("square", "crop"):
        raise ValueError(f"cfg.image_geometry must be 'square' or 'crop', got {cfg.image_geometry!r}")
    if cfg.image_geometry == "square":
        return [A.Resize(cfg.image_size, cfg.image_size)]
    flag = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
            "lanczos": cv2.INTER_LANCZOS4}.get(interpolation, cv2.INTER_LINEAR)
    return [A.SmallestMaxSize(max_size=_crop_side(cfg, crop_pct), interpolation=flag)]


def image_transforms(cfg: Config, train: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     crop_pct: float | None = None, interpolation: str = "bilinear", normalize: bool = True):
    """Albumentations pipeline: one geometry (cfg.image_geometry) for training and evaluation, light augmentation.

    "square" stretches the photo to image_size in both (the published recipe). "crop" keeps the aspect
    ratio in both, as open_clip does: the shorter side goes to image_size / crop_pct, then training takes
    a random image_size square (a resized crop near scale 1: the affine below jitters the scale by 10 %)
    and evaluation the centre one. So an object has the same shape and size at test time as in training.
    No flips and no hue changes: captions say "left", "right" and name colours.

    Args:
        cfg: image_size and image_geometry.
        train: augment (random crop, affine, brightness and contrast).
        mean, std: the normalisation, for a model outside clip_utils (normalize=True).
        crop_pct, interpolation: the tower's own crop fraction and resampling (ImageEncoder.crop).
        normalize: end with Normalize and a (3, H, W) float tensor; False keeps (H, W, 3) uint8 pixels,
            what make_loader and encode_images send: the ImageEncoder normalises them on its device.
    """
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    steps = _resize_steps(cfg, crop_pct, interpolation)
    if cfg.image_geometry == "crop":
        steps.append((A.RandomCrop if train else A.CenterCrop)(cfg.image_size, cfg.image_size))
    if train:
        steps += [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.04, 0.04), rotate=(-5, 5),
                           border_mode=1, p=0.7),  # replicate border: no black wedges
                  A.RandomBrightnessContrast(0.1, 0.1, p=0.5)]
    if normalize:
        steps += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, seed=cfg.seed)


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths, resize, max_side):
        self.paths, self.resize, self.max_side = paths, resize, max_side

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):  # decoded and resized as the training transform resizes
        return i, self.resize(image=load_image(self.paths[i], max_side=self.max_side))["image"]


def cache_images(paths, cfg: Config, crop_pct=None, interpolation: str = "bilinear") -> Path:
    """Decode each image once, resized as training resizes it, into one file under cfg.image_cache; returns its path.

    Later epochs read pixels from it instead of decoding JPEGs (see make_loader). The file holds the
    images' uint8 pixels back to back ("crop" keeps each photo's own aspect ratio, so sizes differ);
    "<name>.index.npy" beside it holds each image's (offset, height, width). The name holds a
    fingerprint of the files (path, size, modification time) and the geometry, so another table,
    size or geometry gets its own file; one written before is reused. Square at 224 px it takes
    images x 150 kB (Flickr8k: 0.9 GB; COCO: 17 GB), "crop" about a third more.

    Args:
        paths: the distinct image files, in the order their rows' image ids count them.
        cfg: image_cache (the folder), image_size, image_geometry, num_workers (decoding processes).
        crop_pct, interpolation: the tower's crop ("crop" geometry; see image_transforms).
    """
    import albumentations as A

    paths = [str(p) for p in paths]
    resize = A.Compose(_resize_steps(cfg, crop_pct, interpolation))
    side = cfg.image_size if cfg.image_geometry == "square" else _crop_side(cfg, crop_pct)
    key = file_fingerprint(paths, cfg.image_geometry, side, interpolation)[:16]
    target = Path(cfg.image_cache) / f"images-{cfg.image_geometry}-{side}px-{key}.u8"
    index = target.with_suffix(".index.npy")
    if target.exists() and index.exists():  # the index is written last: both there means both whole
        return target
    shapes = np.zeros((len(paths), 3), dtype=np.int64)  # (I, 3): byte offset, height, width
    offset = 0
    with atomic_write(target) as partial, open(partial, "wb") as out:  # never a half file of many GB
        decode = torch.utils.data.DataLoader(_DecodeDataset(paths, resize, cfg.image_size), batch_size=None,
                                             num_workers=cfg.num_workers)  # worker processes decode in parallel
        for i, image in decode:
            image = np.ascontiguousarray(image, dtype=np.uint8)  # (h, w, 3)
            shapes[i] = offset, image.shape[0], image.shape[1]
            out.write(image.tobytes())
            offset += image.nbytes
    with atomic_write(index) as partial:
        np.save(partial, shapes)
    return target


def _cached_image(pixels: np.ndarray, shapes: np.ndarray, i: int) -> np.ndarray:
    """Image i of a cache_images file (memory-mapped `pixels`, its index `shapes`) as an (h, w, 3) uint8 copy."""
    offset, height, width = (int(v) for v in shapes[i])
    return np.array(pixels[offset:offset + height * width * 3]).reshape(height, width, 3)


class _PairDataset(torch.utils.data.Dataset):
    """Rows of a clean table as (image tensor, caption, image index); a failed decode yields None.

    With a decode-once cache (cache_images), an image's pixels come from the cache's memory-mapped
    file instead of its JPEG: the same pixels, without the decoding.
    """

    def __init__(self, df: pd.DataFrame, cfg: Config, transform, cache=None):
        self.paths = [_resolve(p, cfg) for p in df["image"]]
        self.captions = list(df["caption"])
        self.image_ids, self.images = pd.factorize(df["image"])  # captions of one image share an id
        self.transform, self.max_side = transform, cfg.image_size
        self.cache, self._pixels, self._shapes = cache, None, None  # opened on first use, in each worker process

    def __len__(self):
        return len(self.captions)

    def __getstate__(self):  # a worker process opens the cache itself instead of receiving a copy of its pixels
        return {**self.__dict__, "_pixels": None, "_shapes": None}

    def __getitem__(self, i):
        if self.cache:
            if self._pixels is None:  # pages of the file load as they are read
                self._pixels = np.memmap(self.cache, dtype=np.uint8, mode="r")
                self._shapes = np.load(Path(self.cache).with_suffix(".index.npy"))  # (I, 3)
            image = _cached_image(self._pixels, self._shapes, self.image_ids[i])
        else:
            try:
                image = load_image(self.paths[i], max_side=self.max_side)
            except Exception as error:  # a file broken since clean_table: skip it, the collate counts it
                warnings.warn(f"skipping unreadable image {self.paths[i]}: {error}")
                return None
        return self.transform(image=image)["image"], self.captions[i], int(self.image_ids[i])


def _seed_worker(worker_id: int) -> None:
    """Each worker process augments with its own stream, derived from the loader's per-epoch seed."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


def _collate(batch, tokenizer, max_length: int) -> dict:
    """Stack images and tokenise captions, padding only to the longest caption in this batch."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return {}
    images, captions, image_ids = zip(*batch)
    tokens = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length,
                       return_tensors="pt")
    # uint8 (H, W, 3) pixels, training and evaluation alike: the image encoder normalises them on its device
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last in memory
    return dict(images=images, input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"], image_ids=torch.tensor(image_ids))


def _loader_workers(cfg: Config) -> tuple[int, bool]:
    """(worker processes, pin memory): workers only on a GPU.

    On a CPU the forward and backward passes already use every core: worker processes would only
    compete with them (measured: 2 workers on 2 cores made full-size training steps 2x slower).
    """
    cuda = _device(cfg).type == "cuda"
    return (cfg.num_workers if cuda else 0), cuda


def make_loader(df: pd.DataFrame, tokenizer, cfg: Config, train: bool, batches=None,
                crop_pct=None, interpolation="bilinear"):
    """A DataLoader over every caption row; training shuffles with a seeded generator unless given batches.

    Args:
        df: a clean table (see clean_table).
        tokenizer: Hugging Face tokenizer used per batch.
        cfg: batch size, workers, image size, seed.
        train: augment and shuffle (and drop a ragged last batch).
        batches: optional list of row-index lists to use instead of shuffling (see similar_batches).
        crop_pct, interpolation: the image encoder's crop (ImageEncoder.crop; see image_transforms).

    Batches carry uint8 pixels; the image encoder normalises them where the model runs. With
    cfg.image_cache set, a training loader reads decoded pixels from cache_images' file.
    """
    if len(df) == 0:
        raise ValueError("make_loader got a table with no rows; clean_table says which rows were dropped and why")
    crop = dict(crop_pct=crop_pct, interpolation=interpolation)
    lengths = np.array([len(ids) for ids in tokenizer(list(df["caption"]))["input_ids"]])
    if (lengths > cfg.max_length).any():
        warnings.warn(f"{(lengths > cfg.max_length).sum()} of {len(lengths)} captions are longer than "
                      f"max_length={cfg.max_length} tokens (longest {lengths.max()}) and will be truncated",
                      stacklevel=2)
    dataset = _PairDataset(df, cfg, image_transforms(cfg, train, normalize=False, **crop))
    if train and cfg.image_cache:  # the cache serves training's many epochs; evaluation tables are small and decode
        dataset.cache = cache_images([_resolve(p, cfg) for p in dataset.images], cfg, **crop)
    workers, cuda = _loader_workers(cfg)
    order = (dict(batch_sampler=batches) if batches is not None else
             dict(batch_size=cfg.batch_size, shuffle=train, drop_last=train and len(dataset) > cfg.batch_size))
    return torch.utils.data.DataLoader(
        dataset, **order, num_workers=workers, pin_memory=cuda, worker_init_fn=_seed_worker,
        collate_fn=partial(_collate, tokenizer=tokenizer, max_length=cfg.max_length),
        generator=torch.Generator().manual_seed(cfg.seed))


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
