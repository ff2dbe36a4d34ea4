"""COCO-35L: COCO photos with machine-translated captions in 35 languages (Hindi among them) as tables.

The captions (CC BY 4.0) were published beside XM3600; the Karpathy split file maps a COCO id to its photo.
"""
from __future__ import annotations

import bz2
import json
import os
import re
import warnings
from pathlib import Path

import pandas as pd

from ..tables import _cached_splits, split_by_image
from ..text import normalize_caption
from .downloads import _fetch, _mirrored, download

COCO35L_URLS = {
    "train": "https://storage.googleapis.com/crossmodal-3600/coco_mt_train.jsonl.bz2",
    "dev": "https://storage.googleapis.com/crossmodal-3600/coco_mt_dev.jsonl.bz2",
    "karpathy": "http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",
}
COCO35L_LANGUAGES = ("ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he", "hi", "hr", "hu",
                     "id", "it", "ja", "ko", "mi", "nl", "no", "pl", "pt", "ro", "ru", "sv", "sw", "te", "th", "tr",
                     "uk", "vi", "zh")
# The train file holds ~20M lines, one per (caption, language): a regex tells a line's language far faster
# than parsing its JSON, so only the asked language's lines are parsed.
_TRG_LANG = re.compile(r'"trg_lang"\s*:\s*"([^"\\]*)"')


def _caption_lines(path, language: str):
    """(coco_id, caption, english) for each line of `language`, and the set of languages the file holds."""
    rows, languages, seen = [], set(), set()
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            match = _TRG_LANG.search(line)
            if match:
                languages.add(match[1])
                if language != "en" and match[1] != language:
                    continue
            elif not line.strip():
                continue
            try:
                record = json.loads(line)
                languages.add(record["trg_lang"])
                if language != "en" and record["trg_lang"] != language:
                    continue
                key, english = str(record["image_id"]), record["caption_tokenized"].strip()
                text = english if language == "en" else record["translation_tokenized"]
                coco_id = int(key.split("_")[0])
            except (ValueError, KeyError, AttributeError, TypeError) as error:
                raise ValueError(f"{path} line {number} is not a COCO-35L caption line ({error!r}): "
                                 f"{line.strip()[:120]!r}; is it coco_mt_train/dev.jsonl?") from None
            if language == "en":  # every target language repeats the English source: keep each caption once
                if (key, english) in seen:
                    continue
                seen.add((key, english))
            rows.append((coco_id, normalize_caption(text), english))
    return rows, languages


def _karpathy_paths(karpathy_json, image_root) -> dict[int, str]:
    """COCO id -> absolute photo path of the photos on disk, from the Karpathy split file's filepath/filename."""
    try:
        with open(karpathy_json, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as error:  # cut short, or not JSON at all
        raise ValueError(f"{karpathy_json} is not a JSON file ({error}): pass dataset_coco.json from "
                         f"caption_datasets.zip ({COCO35L_URLS['karpathy']})") from None
    images = data.get("images") if isinstance(data, dict) else None
    wanted = ("cocoid", "filepath", "filename")
    if not images or not all(isinstance(im, dict) and all(k in im for k in wanted) for im in images):
        found = sorted(images[0]) if images and isinstance(images[0], dict) else type(data).__name__
        other = " (COCO's own annotations, captions_*.json, have 'file_name' and 'id')" if "file_name" in found else ""
        raise ValueError(f"{karpathy_json} is not the Karpathy split file: its images need {list(wanted)}, found "
                         f"{found}{other}; pass dataset_coco.json from caption_datasets.zip "
                         f"({COCO35L_URLS['karpathy']})")
    root = os.path.abspath(image_root)
    return {int(im["cocoid"]): os.path.join(root, im["filepath"], im["filename"]) for im in images}


def _photos(karpathy_json, image_root) -> tuple[dict[int, str], dict[str, set]]:
    """(COCO id -> photo path, folder -> names on disk): read once, used for every caption file."""
    paths = _karpathy_paths(karpathy_json, image_root)
    # one listing per folder, not one stat per caption: the train split has ~113k photos
    on_disk = {folder: set(os.listdir(folder)) if os.path.isdir(folder) else set()
               for folder in {os.path.dirname(p) for p in paths.values()}}
    return paths, on_disk


def load_coco35l(captions_jsonl, karpathy_json, image_root, language: str = "hi") -> pd.DataFrame:
    """One language's COCO-35L captions as a table (image, caption, english, coco_id), mapped onto the photos.

    The file is read line by line (.jsonl or .jsonl.bz2) and only `language`'s rows are kept; "en" gives each
    image's English source captions once. Captions of COCO ids missing from the Karpathy file, or of photos
    missing on disk, are dropped and counted in one warning.

    Args:
        captions_jsonl: coco_mt_train.jsonl(.bz2) or coco_mt_dev.jsonl(.bz2).
        karpathy_json: dataset_coco.json from the Karpathy split (caption_datasets.zip).
        image_root: the folder holding train2014/ and val2014/.
        language: a code of COCO35L_LANGUAGES, e.g. "hi".
    """
    return _mapped(captions_jsonl, _photos(karpathy_json, image_root), karpathy_json, image_root, language)


def _mapped(captions_jsonl, photos, karpathy_json, image_root, language: str) -> pd.DataFrame:
    """load_coco35l with the photos already listed (prepare_coco35l reads the Karpathy file once for both splits)."""
    rows, languages = _caption_lines(captions_jsonl, language)
    if not rows:
        raise ValueError(f"{captions_jsonl} has no {language!r} captions; its languages are "
                         f"{', '.join(sorted(languages)) or 'none (empty file)'}")
    paths, on_disk = photos
    kept, unknown, missing = [], [], []
    for coco_id, caption, english in rows:
        path = paths.get(coco_id)
        if path is None:
            unknown.append(coco_id)
        elif os.path.basename(path) not in on_disk[os.path.dirname(path)]:
            missing.append(path)
        else:
            kept.append((path, caption, english, coco_id))
    if not kept:
        raise ValueError(f"all {len(rows)} {language!r} captions of {captions_jsonl} were dropped: {len(unknown)} "
                         f"of COCO ids not in {karpathy_json}, {len(missing)} of photos missing (e.g. "
                         f"{missing[:1]}); pass as image_root the folder holding train2014/ and val2014/")
    if unknown or missing:
        warnings.warn(f"dropped {len(unknown)} captions of COCO ids not in {karpathy_json} (e.g. "
                      f"{sorted(set(unknown))[:2]}) and {len(missing)} captions of photos missing under "
                      f"{image_root} (e.g. {missing[:1]})", stacklevel=2)
    return pd.DataFrame(kept, columns=["image", "caption", "english", "coco_id"])


def download_coco35l(data_dir, splits=("train", "dev")) -> dict:
    """Download COCO-35L's caption files, the Karpathy split and the COCO 2014 photos (about 20 GB) into data_dir.

    train2014.zip is 13 GB and val2014.zip 6 GB, both fetched whatever `splits` asks (Karpathy's splits draw on
    both); the caption files stay compressed (.bz2), as load_coco35l reads them. CLIP_HINDI_MIRROR, when set,
    names a folder whose files of the same names are used instead. Finished files are not fetched again.
    Returns {"train"/"dev": caption file, "karpathy": dataset_coco.json, "images": folder of train2014/, val2014/}.
    """
    if not splits or set(splits) - {"train", "dev"}:
        raise ValueError(f"splits={splits!r}: COCO-35L has the caption files 'train' and 'dev'")
    data_dir = Path(data_dir)
    paths = {}
    for split in splits:
        paths[split] = data_dir / "downloads" / Path(COCO35L_URLS[split]).name
        if not paths[split].exists():  # checked first so that a finished download needs no mirror
            download(_mirrored(COCO35L_URLS[split]), paths[split])
    for name in ("karpathy", "train2014", "val2014"):
        _fetch(COCO35L_URLS[name], data_dir)
    # glob("*/name") tests each child folder for the name, without listing the 120k photos
    paths["karpathy"] = next((p for p in (data_dir / "dataset_coco.json", *data_dir.glob("*/dataset_coco.json"))
                              if p.is_file()), None)
    if paths["karpathy"] is None:
        raise FileNotFoundError(f"dataset_coco.json is missing under {data_dir} after unpacking "
                                f"{COCO35L_URLS['karpathy']}")
    for folder in ("train2014", "val2014"):
        if not (data_dir / folder).is_dir():
            raise FileNotFoundError(f"{data_dir / folder} is missing after unpacking {COCO35L_URLS[folder]}")
    paths["images"] = data_dir
    return paths


def prepare_coco35l(data_dir, language: str = "hi", val_frac: float = 0.5, seed: int = 0):
    """COCO-35L in one language as (train, val, test) tables, downloaded and cached as CSVs.

    train is coco_mt_train; coco_mt_dev is split by image into val (val_frac of its images) and test.
    No image is in two splits: train captions of dev images are dropped with a warning. The CSVs go to
    data_dir/coco35l_<language>/, so a second call reads them without downloading.

    Args:
        data_dir: where the downloads (about 20 GB, see download_coco35l) and the CSV folder go.
        language: a code of COCO35L_LANGUAGES, e.g. "hi".
        val_frac: the share of the dev images that goes to val; the rest is test.
        seed: which dev images go to val.
    """
    # checked before a 20 GB download can start
    if language not in COCO35L_LANGUAGES:
        raise ValueError(f"unknown language {language!r}; COCO-35L has {', '.join(COCO35L_LANGUAGES)}")
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac={val_frac!r} must be a fraction with 0 < val_frac < 1 (the rest is test)")

    folder = Path(data_dir) / f"coco35l_{language}"

    def make():
        paths = download_coco35l(data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        photos = _photos(paths["karpathy"], paths["images"])
        train, dev = (_mapped(paths[split], photos, paths["karpathy"], paths["images"], language)
                      for split in ("train", "dev"))
        shared = train["image"].isin(set(dev["image"]))
        if shared.any():
            warnings.warn(f"dropped {shared.sum()} train captions of {train.loc[shared, 'image'].nunique()} "
                          "images that are also in coco_mt_dev", stacklevel=4)  # past _cached_splits to the caller
            train = train[~shared].reset_index(drop=True)
        val, _, test = split_by_image(dev, val_frac=0, test_frac=1 - val_frac, seed=seed)
        return train, val, test

    source = dict(captions="COCO-35L", language=language, val_frac=val_frac, seed=seed,
                  files=[COCO35L_URLS[split] for split in ("train", "dev")],
                  what=f"COCO-35L's {language} captions (coco_mt_train; coco_mt_dev split by image, "
                       f"val_frac {val_frac}, seed {seed})")
    return _cached_splits(folder, make, source)
