"""Full-mode rehearsal fixture, built offline: a Hugging Face cache holding tiny models under the real names,
miniature Flickr8k / XM3600 archives in their real layouts, a small labelled set and a Hindi caption file.

    python tests/rehearsal.py /tmp/rehearsal        # builds it and prints the environment to export

With that environment, `CLIP_HINDI_MODE=full bash run_all.sh` runs every notebook through the same
from_pretrained, timm pretrained=True, hf_hub_download, download and extraction code a GPU user's run does.
To add a model, write a builder `(folder, cache) -> None` that saves its files into `folder` and add it to HUB.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_clip import save_tiny_clip  # tests/ is on sys.path, in pytest and as a script
from tiny_nllb import PAIRS, save_tiny_nllb

SUBJECTS = ["एक कुत्ता", "एक बिल्ली", "एक बच्चा", "एक आदमी", "एक लड़की", "दो कुत्ते"]
PLACES = ["घास पर दौड़ रहा है।", "पानी में खेल रहा है।", "सड़क पर साइकिल चला रहा है।", "बर्फ़ में कूद रहा है।",
          "समुद्र तट पर बैठा है।", "पहाड़ पर चढ़ रहा है।"]
SPLITS = {"train": 24, "dev": 8, "test": 10}  # Flickr8k images per official split list (test >= 8: notebook 03's grid)


# -- the Hugging Face cache ----------------------------------------------------

def hub_repo(cache, repo_id: str, repo_type: str = "model", revision: str | None = None) -> Path:
    """An empty snapshot folder in the hub cache layout: <type>s--owner--name/snapshots/<rev>/, refs/main -> rev."""
    base = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    revision = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def local_hub(cache):
    """A stand-in for huggingface_hub.HfApi (push_to_hub's `api`): an upload becomes a new snapshot in `cache`."""
    def upload_folder(folder_path, repo_id, commit_message="", repo_type="model", **_):
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(Path(folder_path).rglob("*")):
            digest.update(str(path.relative_to(folder_path)).encode() + (path.read_bytes() if path.is_file() else b""))
        snapshot = hub_repo(cache, repo_id, repo_type, digest.hexdigest())
        shutil.copytree(folder_path, snapshot, dirs_exist_ok=True)
        return types.SimpleNamespace(oid=digest.hexdigest(), commit_message=commit_message)

    return types.SimpleNamespace(create_repo=lambda repo_id, **_: repo_id, upload_folder=upload_folder)


def _vocab() -> list[str]:
    """Special tokens, every Devanagari character alone and as a continuation (so matras survive), a few words."""
    chars = [chr(c) for c in range(0x0900, 0x0980)]
    words = sorted({w.strip("।") for text in SUBJECTS + PLACES for w in text.split()})
    latin = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-()")
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *latin, *[f"##{c}" for c in chars + latin], *words]
    return list(dict.fromkeys(pieces))


def _hindi_bert(folder: Path, cache) -> None:
    """A tiny BertForMaskedLM and a BertTokenizer that keeps Devanagari (no lowercasing, no accent stripping)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(folder), do_lower_case=False, strip_accents=False)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _resnet50(folder: Path, cache) -> None:
    """resnet50-shaped weights (random, about 100 MB) as timm's Hub repo holds them: model.safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(architecture="resnet50", num_classes=1000)))


def _published(folder: Path, cache) -> None:
    """The published checkpoint's layout: one model.pt state dict (our key names, no logit_scale)."""
    import torch
    from transformers import AutoConfig, AutoModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import clip_utils as cu

    bert = next(Path(cache).glob("models--l3cube-pune--hindi-bert-v2/snapshots/*"))
    cfg = cu.Config.full(image_pretrained=False)
    torch.manual_seed(1)
    model = cu.CLIPModel(cfg, cu.ImageEncoder(cfg), cu.TextEncoder(cfg, AutoModel.from_config(
        AutoConfig.from_pretrained(bert))))
    torch.save({k: v for k, v in model.state_dict().items() if k != "logit_scale"}, folder / "model.pt")


def _jpeg(seed: int, size=(96, 64), orientation: int | None = None) -> bytes:
    """A small photo-like JPEG (smooth colour gradient plus noise); `orientation` writes an EXIF rotation tag."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, 3)
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, 3)
    pixels = np.clip(base + ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    image, out = Image.fromarray(pixels), io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, "JPEG", quality=85, exif=exif.tobytes())
    return out.getvalue()


def _cats_vs_dogs(folder: Path, cache) -> None:
    """microsoft/cats_vs_dogs in its parquet layout (image {bytes, path}, labels 0 cat / 1 dog), two shards."""
    import pandas as pd

    (folder / "data").mkdir()
    cats = [dict(image=dict(bytes=_jpeg(500 + i, (80, 60)), path=None), labels=0) for i in range(7)]
    dogs = [dict(image=dict(bytes=_jpeg(600 + i, (60, 80)), path=None), labels=1) for i in range(12)]
    broken = [dict(image=dict(bytes=b"not a jpeg", path=None), labels=1)]  # the real set dropped 1,738 of these
    pd.DataFrame(cats + dogs + broken).to_parquet(folder / "data" / "train-00000-of-00002.parquet")
    pd.DataFrame(dogs[:3]).to_parquet(folder / "data" / "train-00001-of-00002.parquet")
    (folder / "README.md").write_text("---\nlicense: unknown\n---\n# Cats Vs. Dogs (miniature)\n")


HUB = {  # repo id -> (repo type, builder); later builders may read earlier repos from the cache
    "l3cube-pune/hindi-bert-v2": ("model", _hindi_bert),
    "timm/resnet50.a1_in1k": ("model", _resnet50),
    "damerajee/clip-hindi": ("model", _published),
    "microsoft/cats_vs_dogs": ("dataset", _cats_vs_dogs),
    # the built-in translator of Flickr8k's English captions (used when no CLIP_HINDI_CAPTIONS is given)
    "facebook/nllb-200-distilled-600M": ("model", lambda folder, cache: save_tiny_nllb(folder)),
    # notebook 06's English teacher (and, in full mode, its LiT image tower)
    "openai/clip-vit-base-patch32": ("model", lambda folder, cache: save_tiny_clip(folder)),
}


# -- the archives --------------------------------------------------------------

def _flickr_name(i: int) -> str:
    return f"{1000268201 + 7919 * i}_{hashlib.sha1(str(i).encode()).hexdigest()[:10]}.jpg"


def _archives(mirror: Path) -> Path:
    """Flickr8k_Dataset.zip, Flickr8k_text.zip, captions.zip and images.tgz in their real layouts; returns captions."""
    mirror.mkdir(parents=True, exist_ok=True)
    names = {split: [_flickr_name(sum(list(SPLITS.values())[:k]) + i) for i in range(n)]
             for k, (split, n) in enumerate(SPLITS.items())}
    every = [name for split in names.values() for name in split]
    sizes = [(96, 64), (64, 96), (80, 80), (120, 60)]  # landscape, portrait, square, wide
    with zipfile.ZipFile(mirror / "Flickr8k_Dataset.zip", "w") as zf:
        for i, name in enumerate(every):
            zf.writestr(f"Flicker8k_Dataset/{name}", _jpeg(i, sizes[i % 4], orientation=6 if i % 5 == 0 else None))
            zf.writestr(f"__MACOSX/Flicker8k_Dataset/._{name}", b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble junk
    english = [f"{name}#{k}\t{PAIRS[(i + k) % len(PAIRS)][0]}" for i, name in enumerate(every) for k in range(5)]
    with zipfile.ZipFile(mirror / "Flickr8k_text.zip", "w") as zf:
        zf.writestr("Flickr8k.token.txt", "\n".join(english) + "\n")
        zf.writestr("Flickr8k.lemma.token.txt", "\n".join(english) + "\n")
        for split, key in (("train", "train"), ("dev", "dev"), ("test", "test")):
            zf.writestr(f"Flickr_8k.{key}Images.txt", "\n".join(names[split]) + "\n")
        zf.writestr("readme.txt", "Flickr8k text (miniature)\n")
        zf.writestr("__MACOSX/._Flickr8k.token.txt", b"\x00\x05\x16\x07" + bytes(60))
    captions = [f"{name}#{k}\t{SUBJECTS[(i + k) % 6]} {PLACES[(2 * i + k) % 6]}"
                for i, name in enumerate(every) for k in range(2)]
    captions.append(f"2258277193_586949ec62.jpg.1#0\t{SUBJECTS[0]} {PLACES[0]}")  # Flickr8k's broken key
    hindi = mirror.parent / "flickr8k_hindi_captions.txt"
    hindi.write_text("\n".join(captions) + "\n", encoding="utf-8")

    keys = [hashlib.sha1(f"xm{i}".encode()).hexdigest()[:16] for i in range(12)]
    records = [{"image/key": key, "image/locale": "hi",
                "hi": {"caption": [f"{SUBJECTS[i % 6]} {PLACES[(i + 1) % 6]}",
                                   f"{SUBJECTS[(i + 2) % 6]} {PLACES[i % 6]}"]},
                "en": {"caption": ["a photo"]}} for i, key in enumerate(keys)]
    records.append({"image/key": "ffffffffffffffff", "image/locale": "en", "en": {"caption": ["no Hindi here"]}})
    with zipfile.ZipFile(mirror / "captions.zip", "w") as zf:
        zf.writestr("captions.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    with tarfile.open(mirror / "images.tgz", "w:gz") as tf:
        for i, key in enumerate(keys + ["ffffffffffffffff"]):
            data = _jpeg(1000 + i, sizes[i % 4])
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hindi


def build(root) -> dict:
    """Build the fixture under `root` (reused if already built); returns the environment that points at it.

    It sets no CLIP_HINDI_CAPTIONS, so full mode translates the English captions itself, as it does for a user
    with public sources alone; root/flickr8k_hindi_captions.txt is a Hindi caption file to set it to.
    """
    root = Path(root).resolve()
    cache = root / "hf" / "hub"
    if not (root / ".built").exists():
        shutil.rmtree(root, ignore_errors=True)
        for repo_id, (repo_type, builder) in HUB.items():
            builder(hub_repo(cache, repo_id, repo_type), cache)
        _archives(root / "mirror")
        (root / ".built").touch()
    return dict(HF_HOME=str(root / "hf"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", CLIP_HINDI_MODE="full", CLIP_HINDI_MIRROR=str(root / "mirror"),
                # a tiny recipe (one epoch, 64 px instead of 224): the rehearsal checks the code paths, not the skill
                CLIP_HINDI_EPOCHS="1", CLIP_HINDI_BATCH_SIZE="8", CLIP_HINDI_IMAGE_SIZE="64",
                MPLBACKEND="Agg", TQDM_DISABLE="1")


def copy_repo(dest) -> Path:
    """The package, the notebooks and run_all.sh copied to `dest`, so a rehearsal writes no figures into the repo."""
    source, dest = Path(__file__).resolve().parents[1], Path(dest)
    for name in ("clip_utils", "notebooks"):
        shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    shutil.copy(source / "run_all.sh", dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/rehearsal.py FOLDER")
    for name, value in build(sys.argv[1]).items():
        print(f"export {name}={value}")
