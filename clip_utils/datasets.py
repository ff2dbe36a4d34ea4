"""Real data for full mode: downloads that resume and verify, safe archive extraction,
Flickr8k and XM3600."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pandas as pd

from .config import Config
from .data import _cached_splits
from .synthetic import prepare_quick_data
from .text import normalize_caption

# -- Real data: download, unpack, parse ---------------------------------------
# Full mode trains on Flickr8k photos with (machine-translated) Hindi captions and
# evaluates on XM3600's human-written Hindi captions. Downloads resume and verify;
# archives are unpacked so that no member can escape its folder.

FLICKR8K_URLS = {
    "images": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
    "text": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
}
XM3600_URLS = {
    "captions": "https://google.github.io/crossmodal-3600/web-data/captions.zip",
    "images": "https://open-images-dataset.s3.amazonaws.com/crossmodal-3600/images.tgz",
}
# Text-to-image R@1/5/10 on XM3600 Hindi (CLIP_benchmark protocol), open_clip's multilingual table.
PUBLISHED_XM3600_HINDI = {
    "xlm-roberta-base-ViT-B-32": (16.8, 34.9, 44.5),
    "mSigLIP ViT-B-16": (17.3, 34.8, 43.5),
    "nllb-clip-large-siglip": (42.0, 67.2, 76.9),
}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest, size: int | None = None, sha256: str | None = None) -> Path:
    """Fetch `url` to `dest` with a progress bar, resuming a partial download; skip a finished one.

    Args:
        url: http(s) address (file:// works too).
        dest: the file to write; "<dest>.part" holds an unfinished download.
        size, sha256: expected size in bytes and checksum, verified when given.
    """
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.exists() and (size is None or dest.stat().st_size == size):
        if sha256 and _sha256(dest) != sha256:
            raise IOError(f"{dest} exists but its sha256 is not {sha256}: delete it and download again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        error.close()
        # 416 "range not satisfiable": complete only if the server's size ("bytes */N") is what we have
        if error.code != 416 or error.headers.get("Content-Range", "").rpartition("/")[2] != str(done):
            part.unlink(missing_ok=True)  # a stale part file bigger than the file: start over next time
            raise
        response = None
    if response is not None:
        with response:
            if getattr(response, "status", None) != 206:  # the server sent the whole file: start over
                done = 0
            remaining = int(response.headers.get("Content-Length") or 0)
            with open(part, "ab" if done else "wb") as f, tqdm(
                    total=done + remaining or None, initial=done, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        if remaining and part.stat().st_size != done + remaining:  # the connection dropped early
            raise IOError(f"download of {url} stopped at {part.stat().st_size} of {done + remaining} bytes; "
                          "run again to resume")
    got = part.stat().st_size
    if size is not None and got != size:
        raise IOError(f"download of {url} has {got} bytes, expected {size}; run again to resume")
    if sha256 and _sha256(part) != sha256:
        part.unlink()
        raise IOError(f"download of {url} does not match sha256 {sha256}; deleted, run again")
    os.replace(part, dest)
    return dest


def extract_archive(archive, dest) -> Path:
    """Unpack a .zip or .tar(.gz) into `dest`, refusing any member that would land outside it."""
    import tarfile
    import zipfile

    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not (dest / name).resolve().is_relative_to(dest):
                    raise ValueError(f"unsafe archive {archive}: member {name!r} would escape {dest}")
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            # "data" refuses absolute paths, "..", links out of dest and device files
            tf.extractall(dest, filter="data")
    return dest


def _fetch(url: str, folder) -> Path:
    """Download and unpack once; a marker file records that unpacking finished.

    With CLIP_HINDI_MIRROR set to a folder, the archive is read from the file of the same name there
    instead (a machine without internet, or a copy downloaded once for a class), through the same code.
    """
    folder = Path(folder)
    marker = folder / f".{Path(url).name}.done"
    if not marker.exists():
        mirror = os.environ.get("CLIP_HINDI_MIRROR", "").strip()
        if mirror:
            if not (Path(mirror) / Path(url).name).exists():
                raise FileNotFoundError(f"CLIP_HINDI_MIRROR={mirror} has no {Path(url).name} (the file behind {url})")
            url = (Path(mirror) / Path(url).name).resolve().as_uri()
        extract_archive(download(url, folder / "downloads" / Path(url).name), folder)
        marker.touch()
    return folder


def _image_name(name: str) -> str:
    """"1000_ab.jpg#2" or "1000_ab" -> "1000_ab.jpg"; other names pass through."""
    name = name.strip().split("#")[0]
    return name if "." in name else name + ".jpg"


def read_captions(source) -> pd.DataFrame:
    """Read a caption file (path or URL) into a table (image file name, caption), detecting its format.

    Formats, told apart by the first line:
      token: "1000268201_693b08cb0e.jpg#0<TAB>caption" (the official Flickr8k.token.txt);
      csv:   a header "image,caption"; a caption may hold commas (quoted or not);
      text:  "image_id caption", split at the first space.
    Names without an extension get ".jpg"; "#n" caption numbers are dropped.
    """
    import csv
    import io

    source = str(source)
    if source.startswith(("http://", "https://")):
        tag = hashlib.sha1(source.encode()).hexdigest()[:8]  # two URLs may end in the same file name
        source = download(source, Path.home() / ".cache" / "clip-hindi" / f"{tag}-{Path(source).name}")
    text = Path(source).read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{source}: no captions")
    first = lines[0]
    if "\t" in first and "#" in first.split("\t")[0]:
        pairs = [line.split("\t", 1) for line in lines]
    elif {"image", "caption"} <= {c.strip().lower() for c in next(csv.reader([first]))}:
        header, *rows = [row for row in csv.reader(io.StringIO(text)) if row]
        header = [c.strip().lower() for c in header]
        if header == ["image", "caption"]:  # unquoted commas split a caption into fields: join them back
            pairs = [(row[0], ",".join(row[1:])) for row in rows]
        else:  # more columns: take the two by name
            i, j = header.index("image"), header.index("caption")
            pairs = [(row[i], row[j]) if len(row) == len(header) else () for row in rows]
    else:
        pairs = [line.split(None, 1) for line in lines]
    bad = [i + 1 for i, pair in enumerate(pairs) if len(pair) != 2]
    if bad:
        raise ValueError(f"{source}: cannot split line(s) {bad[:5]} into image and caption")
    return pd.DataFrame(dict(image=[_image_name(im) for im, _ in pairs],
                             caption=[normalize_caption(c) for _, c in pairs]))


def load_flickr8k(root, captions) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Map a caption file onto the official Flickr8k train/dev/test lists: (train, val, test) tables.

    Prints how many images of each split have 0, 1, ... captions; captions of images that are
    in no split list (such as the broken key "2258277193_586949ec62.jpg.1") or missing on disk
    are dropped and counted.

    Args:
        root: folder holding Flicker8k_Dataset/ (sic) and Flickr_8k.{train,dev,test}Images.txt.
        captions: a caption file or URL in any format read_captions knows, or a table.
    """
    root = Path(root)
    image_dirs = [p for name in ("Flicker8k_Dataset", "Flickr8k_Dataset") for p in root.rglob(name)
                  if p.is_dir() and "__MACOSX" not in p.parts]  # macOS zips carry a shadow copy
    if not image_dirs:
        raise FileNotFoundError(f"no Flicker8k_Dataset/ folder under {root}: run download_flickr8k first")
    image_dir = max(image_dirs, key=lambda p: sum(1 for _ in p.glob("*.jpg")))
    table = captions if isinstance(captions, pd.DataFrame) else read_captions(captions)
    on_disk = {p.name for p in image_dir.iterdir()}
    splits, used = [], set()
    for split in ("train", "dev", "test"):
        lists = list(root.rglob(f"Flickr_8k.{split}Images.txt"))
        if not lists:
            raise FileNotFoundError(f"Flickr_8k.{split}Images.txt not found under {root}")
        names = [n.strip() for n in lists[0].read_text().splitlines() if n.strip()]
        used |= set(names)
        part = table[table["image"].isin(names) & table["image"].isin(on_disk)]
        counts = part["image"].value_counts().reindex(names, fill_value=0).value_counts().sort_index()
        print(f"{split}: {len(names)} images; images by number of captions: "
              + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        splits.append(part.assign(image=[str(image_dir / n) for n in part["image"]]).reset_index(drop=True))
    no_split = ~table["image"].isin(used)
    missing = table["image"].isin(used) & ~table["image"].isin(on_disk)
    if no_split.any() or missing.any():
        warnings.warn(f"dropped {no_split.sum()} captions of images in no split list "
                      f"(e.g. {table.loc[no_split, 'image'].head(2).tolist()}) and {missing.sum()} "
                      f"captions of images missing in {image_dir}", stacklevel=2)
    return tuple(splits)


def download_flickr8k(data_dir) -> Path:
    """Download and unpack the Flickr8k photos and split lists (about 1 GB) into data_dir."""
    for url in FLICKR8K_URLS.values():
        _fetch(url, data_dir)
    return Path(data_dir)


def prepare_full_data(data_dir, captions):
    """Flickr8k with Hindi captions as (train, val, test) tables, downloaded and cached as CSVs.

    Args:
        data_dir: where photos, lists and the CSVs go.
        captions: the Hindi caption file or URL (public copies are machine-translated; see README).
    """
    def make():
        if not captions:  # checked before the 1 GB download, not after it
            raise RuntimeError("Full mode needs Flickr8k Hindi captions: set CLIP_HINDI_CAPTIONS to a local file or "
                               "URL (CSV image,caption; Flickr8k.token.txt layout; or 'image_id caption' lines). "
                               "See the README.")
        return load_flickr8k(download_flickr8k(data_dir), captions)

    return _cached_splits(data_dir, make)


def prepare_data(cfg: Config, data_dir, captions=None):
    """(train, val, test) for cfg.mode: the synthetic set in quick mode, Flickr8k + Hindi captions in full mode.

    Full mode takes the caption file from `captions`, else from the CLIP_HINDI_CAPTIONS environment variable.
    """
    if cfg.mode != "full":
        return prepare_quick_data(data_dir)
    return prepare_full_data(data_dir, captions or os.environ.get("CLIP_HINDI_CAPTIONS", ""))


def load_xm3600(captions_jsonl, image_dir, language: str = "hi", all_captions: bool = False) -> pd.DataFrame:
    """XM3600 captions in one language as a table; by default only each image's first caption.

    The first caption per image (3,600 pairs) is the CLIP_benchmark protocol behind the
    published multilingual numbers; all_captions=True keeps every caption instead.

    Args:
        captions_jsonl: captions.jsonl, one JSON object per image ("image/key", language -> {"caption": [...]}).
        image_dir: folder of "<image/key>.jpg" files.
        language: the caption language code.
        all_captions: keep every caption instead of the first.
    """
    rows, no_caption = [], 0
    with open(captions_jsonl, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            captions = record.get(language, {}).get("caption", [])
            if not captions:
                no_caption += 1
                continue
            path = str(Path(image_dir) / f"{record['image/key']}.jpg")
            rows += [dict(image=path, caption=normalize_caption(c)) for c in captions[:None if all_captions else 1]]
    if no_caption:
        warnings.warn(f"{no_caption} XM3600 images have no {language!r} caption", stacklevel=2)
    return pd.DataFrame(rows, columns=["image", "caption"])


def download_xm3600(data_dir) -> tuple[Path, Path]:
    """Download and unpack XM3600 (captions and 3,600 images, about 800 MB); returns (captions.jsonl, image folder)."""
    data_dir = Path(data_dir)
    for url in XM3600_URLS.values():
        _fetch(url, data_dir)
    jsonl = next(data_dir.rglob("captions.jsonl"), None)
    image = next((p for p in data_dir.rglob("*.jpg") if "downloads" not in p.relative_to(data_dir).parts), None)
    if jsonl is None or image is None:
        raise FileNotFoundError(f"captions.jsonl or the .jpg images are missing under {data_dir} after unpacking")
    return jsonl, image.parent


# -- A labelled photo set for the linear probe ----------------------------------
# The published project fine-tuned on the Hub's cats-vs-dogs set and named its classes in Hindi.

CATS_VS_DOGS = "microsoft/cats_vs_dogs"  # Hub dataset: parquet files with columns image {bytes, path} and labels
CATS_VS_DOGS_HINDI = ("बिल्ली", "कुत्ता")  # its labels 0 (cat) and 1 (dog), as the published notebook names them
_PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def labelled_folder(folder) -> pd.DataFrame:
    """A folder of labelled photos, folder/<class name>/*.jpg, as a table (image, label)."""
    files = sorted(p for p in Path(folder).glob("*/*") if p.suffix.lower() in _PHOTO_SUFFIXES)
    return pd.DataFrame({"image": [str(p.resolve()) for p in files], "label": [p.parent.name for p in files]})


def download_cats_vs_dogs(folder, per_class: int = 200, seed: int = 0) -> Path:
    """Write `per_class` photos of each class of microsoft/cats_vs_dogs into folder/बिल्ली/ and folder/कुत्ता/.

    The parquet files come through huggingface_hub (once, into its cache; the first of the two shards
    holds both classes); unreadable images are skipped. A finished folder is reused.

    Args:
        folder: where the class folders go.
        per_class: photos per class (fewer if the set has fewer).
        seed: which photos.
    """
    import io

    from PIL import Image

    from .checkpoints import _hub_folder

    folder = Path(folder)
    marker = folder / f".cats_vs_dogs-{per_class}.done"
    if marker.exists():
        return folder
    files = []
    for pattern in ("*-00000-of-*.parquet", "*.parquet"):  # the first shard is enough; else everything
        snapshot = _hub_folder(CATS_VS_DOGS, repo_type="dataset", allow_patterns=[pattern, f"*/{pattern}"])
        files = sorted(p for p in snapshot.rglob(pattern))
        table = pd.concat([pd.read_parquet(p) for p in files]) if files else pd.DataFrame(columns=["labels"])
        if files and table["labels"].nunique() == len(CATS_VS_DOGS_HINDI):
            break
    if not files:
        raise FileNotFoundError(f"no parquet files in the Hub dataset {CATS_VS_DOGS}")
    for label, name in enumerate(CATS_VS_DOGS_HINDI):
        rows = table[table["labels"] == label]
        rows = rows.sample(min(per_class, len(rows)), random_state=seed)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(rows["image"]):
            data = image["bytes"] if isinstance(image, dict) else image
            try:
                with Image.open(io.BytesIO(data)) as decoded:
                    decoded.load()
            except Exception:  # a broken photo: skip it, the probe needs only readable ones
                continue
            (folder / name / f"{label}_{i:04d}.jpg").write_bytes(data)
    marker.touch()
    return folder


def split_labelled(df: pd.DataFrame, column: str = "label", test_frac: float = 0.5, seed: int = 0,
                   min_images: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a labelled table into (pool, test) per class; classes with too few images are named and dropped.

    Args:
        df: table with an image column and the label `column`.
        column: the label column.
        test_frac: share of each class that goes to test.
        seed: sampling seed.
        min_images: a class needs at least this many images (one for the pool, one for test).
    """
    counts = df[column].value_counts()
    too_few = counts[counts < min_images]
    if len(too_few):
        warnings.warn("dropped classes with fewer than {} images: {}".format(
            min_images, ", ".join(f"{name} ({n})" for name, n in too_few.items())), stacklevel=2)
        df = df[~df[column].isin(too_few.index)]
    if df[column].nunique() < 2:
        raise ValueError(f"a probe needs at least 2 classes with {min_images}+ images each; have "
                         f"{dict(counts)} in column {column!r}")
    test = df.groupby(column, group_keys=False).sample(frac=test_frac, random_state=seed)
    return df.drop(test.index), test
