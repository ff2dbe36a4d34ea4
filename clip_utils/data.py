"""Caption tables in, batches out: splitting by image, image decoding, cleaning bad rows,
augmentation, the decode-once cache, the DataLoader and hard-negative batches."""
from __future__ import annotations

import math
import os
import uuid
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import Config, _device
from .pixels import _pil_rgb
from .text import caption_text, normalize_caption

# A table is a pandas DataFrame with columns `image` (absolute, or relative to
# cfg.image_dir) and `caption`, one row per caption, several rows per image allowed.


def split_by_image(df: pd.DataFrame, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
                   force_test=None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split a table into train/val/test so that no image appears in two splits.

    Args:
        df: table with an `image` column.
        val_frac, test_frac: fractions of the images (not rows) for validation and test.
        seed: shuffling seed.
        force_test: optional boolean row mask; images of those rows go to test (e.g. unseen combinations).
    """
    if "image" not in df.columns:
        raise ValueError(f"split_by_image needs an 'image' column; the table has {list(df.columns)}")
    _check_columns(df, ("image",), "split_by_image's table")
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 <= frac < 1:
            raise ValueError(f"split_by_image: {name}={frac!r} must be a fraction with 0 <= {name} < 1")
    if val_frac + test_frac >= 1:
        raise ValueError(f"split_by_image: val_frac + test_frac = {val_frac + test_frac:g} leaves no training "
                         "images; their sum must be below 1")
    forced = set(df.loc[force_test, "image"]) if force_test is not None else set()
    images = [im for im in pd.unique(df["image"]) if im not in forced]
    np.random.default_rng(seed).shuffle(images)
    n_val, n_test = round(len(images) * val_frac), round(len(images) * test_frac)
    val = set(images[:n_val])
    test = set(images[n_val:n_val + n_test]) | forced
    parts = (~df["image"].isin(val | test), df["image"].isin(val), df["image"].isin(test))
    splits = tuple(df[mask].reset_index(drop=True) for mask in parts)
    # A fraction of 0 asks for an empty split; any other empty split is a surprise worth stopping for.
    for split, name, frac in zip(splits, ("train", "val", "test"), (None, val_frac, test_frac)):
        if split.empty and frac != 0:
            raise ValueError(f"split_by_image leaves the {name} split empty: {len(images)} images with "
                             f"val_frac={val_frac}, test_frac={test_frac}" +
                             (f" and {len(forced)} forced into test" if forced else "") +
                             "; use more images or other fractions")
    return splits


def _cached_splits(data_dir, make):
    """(train, val, test) from data_dir/{train,val,test}.csv, or from make() once, then written there.

    Image paths are stored relative to the CSV's folder when they lie inside it (absolute otherwise) and
    come back absolute, so the tables work from any working directory and survive moving the folder.
    """
    folder = os.path.abspath(data_dir)
    paths = [Path(folder) / f"{name}.csv" for name in ("train", "val", "test")]
    if all(p.exists() for p in paths):
        splits = [pd.read_csv(p) for p in paths]
        return tuple(df.assign(image=[os.path.join(folder, im) for im in df["image"]]) for df in splits)
    splits = [df.assign(image=[os.path.abspath(im) for im in df["image"]]) for df in make()]
    for part, path in zip(splits, paths):
        inside = [os.path.relpath(im, folder) if im.startswith(folder + os.sep) else im for im in part["image"]]
        part.assign(image=inside).to_csv(path, index=False)
    return tuple(splits)


def _check_columns(df: pd.DataFrame, needed, what: str) -> None:
    """Each needed column there exactly once; `what` names the table in the error."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {' and '.join(map(repr, needed))}; missing {missing} "
                         f"(has {list(df.columns)})")
    repeated = [c for c in needed if (df.columns == c).sum() > 1]  # e.g. a column renamed onto an existing one
    if repeated:
        raise ValueError(f"{what} has {(df.columns == repeated[0]).sum()} columns named {repeated[0]!r} "
                         f"(columns {list(df.columns)}): drop or rename all but one")


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


def image_transforms(cfg: Config, train: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     crop_pct: float | None = None, interpolation: str = "bilinear", normalize: bool = True):
    """Albumentations pipeline: light, caption-safe augmentation for training; resize + normalise for eval.

    No flips and no hue changes: captions say "left", "right" and name colours. Evaluation with
    cfg.eval_resize="crop" keeps a photo's aspect ratio as timm evaluates its pretrained towers: the
    shorter side is resized to image_size / crop_pct and the centre cropped; "square" stretches to size.

    Args:
        cfg: image_size and eval_resize.
        train: augment (always the square resize the towers were trained on here).
        mean, std: the image encoder's normalisation.
        crop_pct, interpolation: the tower's own crop fraction and resampling (timm's pretrained config).
        normalize: end with Normalize and a (3, H, W) float tensor; False keeps (H, W, 3) uint8 pixels,
            which the image encoder normalises on its device (normalization_table: the same numbers).
    """
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    if cfg.eval_resize not in ("crop", "square"):
        raise ValueError(f"cfg.eval_resize must be 'crop' or 'square', got {cfg.eval_resize!r}")
    if train or cfg.eval_resize == "square":
        steps = [A.Resize(cfg.image_size, cfg.image_size)]
    else:
        flag = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                "lanczos": cv2.INTER_LANCZOS4}.get(interpolation, cv2.INTER_LINEAR)
        side = math.floor(cfg.image_size / (crop_pct or 0.875))  # timm's default crop fraction is 0.875
        steps = [A.SmallestMaxSize(max_size=side, interpolation=flag), A.CenterCrop(cfg.image_size, cfg.image_size)]
    if train:
        steps += [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.04, 0.04), rotate=(-5, 5),
                           border_mode=1, p=0.7),  # replicate border: no black wedges
                  A.RandomBrightnessContrast(0.1, 0.1, p=0.5)]
    if normalize:
        steps += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, seed=cfg.seed)


def normalization_table(mean, std) -> torch.Tensor:
    """(3, 256) float32: what albumentations' Normalize turns each uint8 level of each channel into.

    Applied on the model's device (ImageEncoder), it gives exactly the numbers per-image
    normalisation in the loader would, while the loader ships 4x fewer bytes and skips that work.
    """
    import albumentations as A

    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3)
    return torch.from_numpy(A.Normalize(mean=mean, std=std)(image=levels)["image"][:, 0, :].T.copy())  # (3, 256)


def _training_pixels(path, size: int) -> np.ndarray:
    """The (size, size, 3) uint8 image that training augments: decoded, then resized as the train transform does."""
    import albumentations as A

    return A.Resize(size, size)(image=load_image(path, max_side=size))["image"]


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return i, _training_pixels(self.paths[i], self.size)


def cache_images(paths, cfg: Config) -> Path:
    """Decode each image once at training size into one .npy file under cfg.image_cache; returns its path.

    Later epochs read pixels from it instead of decoding JPEGs (see make_loader). The file name holds
    a hash of the paths and the size, so another table or image_size gets its own file; one written
    before is reused. It takes images x image_size^2 x 3 bytes (Flickr8k at 224 px: 0.9 GB; COCO: 17 GB).

    Args:
        paths: the distinct image files, in the order their rows' image ids count them.
        cfg: image_cache (the folder), image_size, num_workers (decoding processes).
    """
    import hashlib

    paths = [str(p) for p in paths]
    # Each file's size and modification time too: photos replaced under the same names get a new cache.
    stats = [f"{p}\t{stat.st_size}\t{stat.st_mtime_ns}" for p, stat in zip(paths, map(os.stat, paths))]
    key = hashlib.sha256("\n".join([str(cfg.image_size), *stats]).encode()).hexdigest()[:16]
    target = Path(cfg.image_cache) / f"images-{cfg.image_size}px-{key}.npy"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial_file = target.with_name(f"{target.stem}.{uuid.uuid4().hex}.part.npy")  # renamed when whole: never half-read
    try:
        pixels = np.lib.format.open_memmap(partial_file, mode="w+", dtype=np.uint8,
                                           shape=(len(paths), cfg.image_size, cfg.image_size, 3))  # (I, S, S, 3)
        decode = torch.utils.data.DataLoader(_DecodeDataset(paths, cfg.image_size), batch_size=None,
                                             num_workers=cfg.num_workers)  # worker processes decode in parallel
        for i, image in decode:
            pixels[i] = np.asarray(image)
        pixels.flush()
        del pixels
        os.replace(partial_file, target)
    finally:
        partial_file.unlink(missing_ok=True)  # an interrupted cache leaves no half file of many GB
    return target


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
        self.cache, self._pixels = cache, None  # opened on first use, in each worker process

    def __len__(self):
        return len(self.captions)

    def __getstate__(self):  # a worker process opens the cache itself instead of receiving a copy of its pixels
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, i):
        if self.cache:
            if self._pixels is None:
                self._pixels = np.load(self.cache, mmap_mode="r")  # (I, S, S, 3): pages load as they are read
            image = np.array(self._pixels[self.image_ids[i]])
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
    if isinstance(images[0], np.ndarray):  # training: uint8 (H, W, 3), normalised by the image encoder
        images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last in memory
    else:
        images = torch.stack(images)  # (B, 3, H, W) float, normalised here
    return dict(images=images, input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"], image_ids=torch.tensor(image_ids))


def _loader_workers(cfg: Config) -> tuple[int, bool]:
    """(worker processes, pin memory): workers only on a GPU.

    On a CPU the forward and backward passes already use every core: worker processes would only
    compete with them (measured: 2 workers on 2 cores made full-size training steps 2x slower).
    """
    cuda = _device(cfg).type == "cuda"
    return (cfg.num_workers if cuda else 0), cuda


def make_loader(df: pd.DataFrame, tokenizer, cfg: Config, train: bool, mean=None, std=None, batches=None,
                crop_pct=None, interpolation="bilinear"):
    """A DataLoader over every caption row; training shuffles with a seeded generator unless given batches.

    Args:
        df: a clean table (see clean_table).
        tokenizer: Hugging Face tokenizer used per batch.
        cfg: batch size, workers, image size, seed.
        train: augment and shuffle (and drop a ragged last batch).
        mean, std: the image encoder's normalisation (defaults to ImageNet's).
        batches: optional list of row-index lists to use instead of shuffling (see similar_batches).
        crop_pct, interpolation: the image encoder's evaluation crop (see image_transforms).

    With cfg.image_cache set, a training loader reads decoded pixels from cache_images' file.
    """
    if len(df) == 0:
        raise ValueError("make_loader got a table with no rows; clean_table says which rows were dropped and why")
    norm = {k: v for k, v in dict(mean=mean, std=std).items() if v is not None}
    norm.update(crop_pct=crop_pct, interpolation=interpolation)
    lengths = np.array([len(ids) for ids in tokenizer(list(df["caption"]))["input_ids"]])
    if (lengths > cfg.max_length).any():
        warnings.warn(f"{(lengths > cfg.max_length).sum()} of {len(lengths)} captions are longer than "
                      f"max_length={cfg.max_length} tokens (longest {lengths.max()}) and will be truncated",
                      stacklevel=2)
    # Training batches carry uint8 pixels: the encoder normalises them where the model runs.
    dataset = _PairDataset(df, cfg, image_transforms(cfg, train, normalize=not train, **norm))
    if train and cfg.image_cache:  # evaluation keeps decoding: its crop needs the photo's own aspect ratio
        dataset.cache = cache_images([_resolve(p, cfg) for p in dataset.images], cfg)
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
