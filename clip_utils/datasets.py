"""Real data for full mode: downloads that resume and verify, safe archive extraction,
Flickr8k and XM3600."""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import warnings
from pathlib import Path

import pandas as pd

from .config import Config
from .scale.downloads import _fetch, _sha256, download, hub_file
from .scale.translate import DEFAULT_TRANSLATOR, translate_captions
from .synthetic import prepare_quick_data
from .tables import _cached_splits, _check_columns
from .text import normalize_caption

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
# XM3600 scored two ways. CLIP_benchmark (behind open_clip's multilingual table) keeps the first caption of each
# image: 3,600 pairs, one correct caption per image. Google's mSigLIP and MTEB's XM3600 numbers keep every
# caption, and image->text counts any of an image's captions, which is easier: the two do not compare.
XM3600_FIRST_CAPTION = "first caption per image (CLIP_benchmark)"
XM3600_ALL_CAPTIONS = "all captions (image→text: any of the image's captions)"
# Published XM3600 Hindi recall in percent, exactly as open_clip's docs/openclip_multilingual_retrieval_results.csv
# gives it (columns "crossmodal3600 image_retrieval_recall@K hi" = text->image, "text_retrieval" = image->text),
# read at open_clip commit 89fb801; every row names the model and its pretrained tag (variant). All are
# first-caption numbers. No all-captions row is listed: Google's per-language numbers could not be checked here.
PUBLISHED_XM3600_HINDI = {
    "xlm-roberta-base-ViT-B-32 (laion5b_s13b_b90k)": {
        "t2i_R@1": 16.78, "t2i_R@5": 34.89, "t2i_R@10": 44.47, "i2t_R@1": 22.25, "i2t_R@5": 43.75, "i2t_R@10": 53.83,
        "protocol": XM3600_FIRST_CAPTION},
    "mSigLIP: ViT-B-16-SigLIP-i18n-256 (webli)": {
        "t2i_R@1": 17.33, "t2i_R@5": 34.75, "t2i_R@10": 43.50, "i2t_R@1": 24.53, "i2t_R@5": 45.08, "i2t_R@10": 54.44,
        "protocol": XM3600_FIRST_CAPTION},
    "nllb-clip-large-siglip (v1)": {
        "t2i_R@1": 35.11, "t2i_R@5": 60.31, "t2i_R@10": 70.19, "i2t_R@1": 36.00, "i2t_R@5": 61.89, "i2t_R@10": 71.25,
        "protocol": XM3600_FIRST_CAPTION},
    "nllb-clip-large-siglip (mrl)": {
        "t2i_R@1": 42.00, "t2i_R@5": 67.17, "t2i_R@10": 76.92, "i2t_R@1": 43.11, "i2t_R@5": 69.25, "i2t_R@10": 78.64,
        "protocol": XM3600_FIRST_CAPTION},
}


def _image_name(name: str) -> str:
    """"1000_ab.jpg#2" or "1000_ab" -> "1000_ab.jpg"; other names pass through."""
    name = name.strip().split("#")[0]
    return name if "." in name else name + ".jpg"


# Header names of the image and caption columns in the layouts people download
# (Flickr8k on Kaggle: "image,caption"; Flickr30k on Kaggle: "image_name| comment_number| comment").
_IMAGE_COLUMNS = ("image", "image_name")
_CAPTION_COLUMNS = ("caption", "comment")
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: same first bytes
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
_NOT_IN_IMAGE_NAMES = set(",;|\"'{}[]<>=")  # a first field holding one of these is not an "image_id caption" line


def _read_text(path) -> str:
    """A caption file's text: UTF-8, or UTF-8/16/32 with a byte-order mark; any other encoding is an error."""
    data = Path(path).read_bytes()
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)  # the utf-8-sig, utf-16 and utf-32 codecs drop the byte-order mark
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{path} is not {encoding.upper()} text (undecodable byte {data[error.start]:#04x} on "
                         f"line {line}); re-save it as UTF-8 (a spreadsheet's 'CSV UTF-8' format)") from None
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL in every other place
        raise ValueError(f"{path} holds NUL characters, as UTF-16 without a byte-order mark does; "
                         "re-save it as UTF-8")
    return text


def _header(first: str):
    """(delimiter, lower-case column names) when the first line names an image and a caption column, else None."""
    import csv

    for delimiter in (",", "|", "\t", None):  # None: columns separated by spaces
        fields = next(csv.reader([first])) if delimiter == "," else first.split(delimiter)
        names = [name.strip().strip('"').lower() for name in fields]
        if delimiter is None and len(names) != 2:  # "image caption" only: a caption may hold both words
            continue
        if set(names) & set(_IMAGE_COLUMNS) and set(names) & set(_CAPTION_COLUMNS):
            return delimiter, names
    return None


def _header_rows(text: str, delimiter, names: list[str]) -> list[tuple[int, tuple]]:
    """(line number, (image, caption)) for each row below the header; () where a row has too few fields."""
    import csv
    import io

    i = next(k for k, name in enumerate(names) if name in _IMAGE_COLUMNS)
    j = next(k for k, name in enumerate(names) if name in _CAPTION_COLUMNS)
    last = j == len(names) - 1  # a last caption column may hold the delimiter itself: it keeps the rest of the row
    if delimiter == ",":
        reader = csv.reader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader if any(field.strip() for field in row)]
    else:
        rows = [(number, line.split(delimiter, len(names) - 1 if last else -1))
                for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    pairs = []
    for number, row in rows[1:]:
        if len(row) < len(names) or (len(row) > len(names) and not last):
            pairs.append((number, ()))
        else:
            caption = (delimiter or " ").join(row[j:]) if last else row[j]
            pairs.append((number, (row[i].strip(), caption.strip())))
    return pairs


def read_captions(source) -> pd.DataFrame:
    """Read a caption file (path or URL) into a table (image file name, caption), detecting its layout.

    Layouts, told apart by the first line:
      header: the first line names the columns, separated by commas (CSV, quoting allowed), "|" or tabs;
        the image column is "image" or "image_name", the caption column "caption" or "comment" (Kaggle's
        Flickr8k captions.txt "image,caption"; Flickr30k results.csv "image_name| comment_number| comment").
        An unquoted delimiter inside the last column stays part of the caption.
      token: "1000268201_693b08cb0e.jpg#0<TAB>caption" (the official Flickr8k.token.txt);
      text:  "image_id caption", split at the first space or tab.
    Names without an extension get ".jpg"; "#n" caption numbers are dropped. The file must be UTF-8
    (a byte-order mark, also UTF-16/32, is understood). Any other layout, an empty or header-only file and
    a line that does not split into image and caption are ValueErrors naming the file.
    """
    source = str(source)
    if source.startswith(("http://", "https://")):
        tag = hashlib.sha1(source.encode()).hexdigest()[:8]  # two URLs may end in the same file name
        source = str(download(source, Path.home() / ".cache" / "clip-hindi" / f"{tag}-{Path(source).name}"))
    text = _read_text(source)
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{source} is empty: it has no caption lines")
    first = lines[0][1]
    header = _header(first)
    if header:
        pairs = _header_rows(text, *header)
        if not pairs:
            raise ValueError(f"{source} has a header ({first.strip()[:120]!r}) but no caption rows")
    elif "\t" in first and "#" in first.split("\t")[0]:
        pairs = [(number, tuple(line.split("\t", 1))) for number, line in lines]
    elif len(first.split(None, 1)) == 2 and not set(first.split(None, 1)[0]) & _NOT_IN_IMAGE_NAMES:
        pairs = [(number, tuple(line.split(None, 1))) for number, line in lines]
    else:
        raise ValueError(
            f"{source}: unknown caption layout; its first line is {first.strip()[:120]!r}. Known layouts: a header "
            "naming the columns ('image,caption'; Flickr30k's 'image_name| comment_number| comment'), "
            "Flickr8k.token.txt lines ('name.jpg#0<TAB>caption') or 'image_id caption' lines")
    bad = [(number, pair) for number, pair in pairs if len(pair) != 2 or not pair[0].strip()]
    if bad:
        number = bad[0][0]
        raise ValueError(f"{source}: cannot split line(s) {[n for n, _ in bad[:5]]} into image and caption; "
                         f"line {number} is {text.splitlines()[number - 1].strip()[:120]!r}")
    return pd.DataFrame(dict(image=[_image_name(im) for _, (im, _) in pairs],
                             caption=[normalize_caption(c) for _, (_, c) in pairs]))


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


def flickr8k_machine_captions(root, data_dir, translator: str = DEFAULT_TRANSLATOR) -> pd.DataFrame:
    """Hindi captions for Flickr8k made here: its English Flickr8k.token.txt machine-translated by `translator`.

    The translation (image, number, english, caption, truncated) is cached as
    data_dir/flickr8k_hindi_machine.csv and resumes if stopped; see translate_captions.
    """
    tokens = [p for p in Path(root).rglob("Flickr8k.token.txt") if "__MACOSX" not in p.parts]
    if not tokens:
        raise FileNotFoundError(f"Flickr8k.token.txt not found under {root}: it ships in Flickr8k_text.zip "
                                f"({FLICKR8K_URLS['text']})")
    return translate_captions(tokens[0], Path(data_dir) / "flickr8k_hindi_machine.csv", model_name=translator)


def prepare_full_data(data_dir, captions="", translator: str = DEFAULT_TRANSLATOR):
    """Flickr8k with Hindi captions as (train, val, test) tables, downloaded and cached as CSVs.

    Caption sources, in order: `captions` (a local file, an http(s) URL or hf://datasets/<owner>/<name>/<file>);
    without one, Flickr8k's own English captions machine-translated by `translator` (flickr8k_machine_captions),
    whose tables keep the English source in an "english" column. The CSVs remember their source: another
    file, an edited file or another translator builds them afresh (table_source says which they hold).

    Args:
        data_dir: where photos, lists, the translation and the CSVs go.
        captions: the Hindi caption file, URL or Hub file; "" translates Flickr8k's English captions.
        translator: the English->Hindi model used when no caption file is given.
    """
    def make():
        source = hub_file(captions) if str(captions).startswith("hf://") else captions  # before the 1 GB download
        root = download_flickr8k(data_dir)
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        table = read_captions(source) if source else flickr8k_machine_captions(root, data_dir, translator)
        return load_flickr8k(root, table)

    return _cached_splits(data_dir, make, _caption_source(captions, translator))


def _caption_source(captions, translator: str) -> dict:
    """Where prepare_full_data's captions come from, as _cached_splits keeps it: tables from another source rebuild.

    A local file is known by its path, size and SHA-256 (an edited file is a new source); a URL or Hub file by
    its address; no file by the translator that makes the captions from Flickr8k's English.
    """
    captions = str(captions or "")
    if not captions:
        return dict(captions="translation", translator=translator, english="Flickr8k.token.txt",
                    what=f"Flickr8k's English captions machine-translated by {translator}")
    if captions.startswith(("http://", "https://", "hf://")):
        return dict(captions=captions, what=f"the caption file {captions}")
    path = Path(captions).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"caption file {captions} not found (CAPTIONS / CLIP_HINDI_CAPTIONS): give a "
                                "local file, an http(s) URL or hf://datasets/<owner>/<name>/<file>")
    digest, size = _sha256(path), path.stat().st_size
    return dict(captions=str(path), bytes=size, sha256=digest,
                what=f"the caption file {path} ({size:,} bytes, sha256 {digest[:12]})")


def prepare_data(cfg: Config, data_dir, captions=None):
    """(train, val, test) for cfg.mode: the synthetic set in quick mode, Flickr8k + Hindi captions in full mode.

    Full mode takes the caption file from `captions`, else from the CLIP_HINDI_CAPTIONS environment variable,
    else translates Flickr8k's English captions with cfg.translator.
    """
    if cfg.mode != "full":
        return prepare_quick_data(data_dir)
    return prepare_full_data(data_dir, captions or os.environ.get("CLIP_HINDI_CAPTIONS", ""), cfg.translator)


def load_xm3600(captions_jsonl, image_dir, language: str = "hi", all_captions: bool = False) -> pd.DataFrame:
    """XM3600 captions in one language as a table; by default only each image's first caption.

    The first caption per image (3,600 pairs) is the CLIP_benchmark protocol behind open_clip's
    multilingual numbers (XM3600_FIRST_CAPTION); all_captions=True keeps every caption instead, as
    Google's and MTEB's numbers do (XM3600_ALL_CAPTIONS).

    Args:
        captions_jsonl: captions.jsonl, one JSON object per image ("image/key", language -> {"caption": [...]}).
        image_dir: folder of "<image/key>.jpg" files.
        language: the caption language code.
        all_captions: keep every caption instead of the first.
    """
    rows, no_caption = [], 0
    with open(captions_jsonl, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                captions = record.get(language, {}).get("caption", [])
                key = record["image/key"]
            except (ValueError, KeyError, AttributeError) as error:  # a torn download, or another file
                raise ValueError(f"{captions_jsonl} line {number} is not an XM3600 caption record ({error!r}): "
                                 f"{line.strip()[:80]!r}; download captions.jsonl again") from None
            if not captions:
                no_caption += 1
                continue
            path = str(Path(image_dir) / f"{key}.jpg")
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
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no folder {folder} (resolved: {Path(folder).resolve()}): a labelled folder holds "
                                "one subfolder of photos per class")
    files = sorted(p for p in Path(folder).glob("*/*") if p.suffix.lower() in _PHOTO_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no photos ({', '.join(sorted(_PHOTO_SUFFIXES))}) in class subfolders: "
                         "put them in folder/<class name>/")
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
    _check_columns(df, ("image", column), "split_labelled's table")
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
