"""Caption tables: their columns checked, split by image, and the splits cached with their caption source."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .files import atomic_write

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


def _cached_splits(data_dir, make, source: dict):
    """(train, val, test) from data_dir/{train,val,test}.csv, or from make() once, then written there.

    `source` says where the captions come from (a file with its size and hash, a URL or Hub file, a translator,
    a generator and its seed; "what" says it in words). It is kept beside the tables as source.json, and tables
    from another source (or from before sources were kept) are built afresh: naming a new caption file takes
    effect. Image paths are stored relative to the CSV's folder when they lie inside it (absolute otherwise)
    and come back absolute, so the tables work from any working directory and survive moving the folder.
    """
    folder = os.path.abspath(data_dir)
    paths = [Path(folder) / f"{name}.csv" for name in ("train", "val", "test")]
    record = Path(folder) / "source.json"
    source = json.loads(json.dumps(source))  # as it reads back: tuples become lists
    if all(p.exists() for p in paths) and _stored_source(folder) == source:
        return read_splits(folder)
    splits = [df.assign(image=[os.path.abspath(im) for im in df["image"]]) for df in make()]
    record.unlink(missing_ok=True)  # written last: tables half rewritten never pass for the new source
    for part, path in zip(splits, paths):
        inside = [os.path.relpath(im, folder) if im.startswith(folder + os.sep) else im for im in part["image"]]
        with atomic_write(path) as tmp:  # an interrupted run leaves no short table behind
            part.assign(image=inside).to_csv(tmp, index=False)
    with atomic_write(record) as tmp:
        Path(tmp).write_text(json.dumps(source, ensure_ascii=False, indent=1), encoding="utf-8")
    return tuple(splits)


def read_splits(data_dir) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The (train, val, test) tables cached in data_dir as they are, with absolute image paths; never rebuilt."""
    folder = os.path.abspath(data_dir)
    splits = [pd.read_csv(Path(folder) / f"{name}.csv") for name in ("train", "val", "test")]
    return tuple(df.assign(image=[os.path.join(folder, im) for im in df["image"]]) for df in splits)


def _stored_source(data_dir) -> dict | None:
    """The source.json kept beside cached tables (see _cached_splits), or None."""
    record = Path(data_dir) / "source.json"
    return json.loads(record.read_text(encoding="utf-8")) if record.exists() else None


def table_source(data_dir) -> str:
    """Where the cached tables in data_dir took their captions from, in words (the notebooks print it)."""
    source = _stored_source(data_dir)
    return source["what"] if source else f"unknown: no source.json in {data_dir} (tables not built here yet)"


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
