"""Evaluation and retrieval: embeddings, recall@K, the gallery cache, search and zero-shot."""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import Config
from .data import _resolve, clean_table, image_transforms, load_image
from .files import atomic_write, file_fingerprint
from .model import CLIPModel, _check_image_size
from .pixels import _as_uint8_rgb, _pil_rgb
from .scale.index import build_index, exact_top_k, index_kind, load_index, save_index, search_index
from .text import normalize_caption


def _gallery(images, caller: str) -> list:
    """A gallery as a plain list: a pandas Series is taken in order, whatever its index; one image is refused."""
    if isinstance(images, pd.DataFrame):
        raise ValueError(f"{caller} takes a list of images, not a table: pass its column, e.g. df['image']")
    # (H, W[, C]) numbers: one image; a tensor's dtype has no kind and is always numeric
    one_array = getattr(images, "ndim", 1) in (2, 3) and getattr(images.dtype, "kind", "f") in "fiub"
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert") or one_array:
        raise ValueError(f"{caller} takes a list of images, not one image ({type(images).__name__}): "
                         f"wrap it in a list, [image]")
    return list(images)


def _image_pixels(image, cfg: Config, what: str) -> np.ndarray:
    """(H, W, 3) uint8 of a path (relative to cfg.image_dir), a PIL image or an array; a failure names the image."""
    if hasattr(image, "convert"):  # a PIL image
        return _pil_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        return _as_uint8_rgb(image, what)
    path = _resolve(image, cfg)
    try:
        return load_image(path, cfg.image_size)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist (image_dir={cfg.image_dir!r})") from None
    except Exception as error:  # truncated, or no image at all: the decoder's own message names no file
        raise ValueError(f"{what} {path} cannot be read ({type(error).__name__}: {error}); replace it, or drop "
                         "its rows with clean_table") from error


def _check_finite(embeds: torch.Tensor, start: int, caller: str, what: str) -> torch.Tensor:
    """Refuse NaN or inf embeddings: a model with broken weights must not rank anything."""
    bad = ~torch.isfinite(embeds).all(dim=1)
    if bad.any():
        raise ValueError(f"{caller}: the model gives non-finite (NaN or inf) embeddings, first for {what} "
                         f"{start + int(bad.nonzero()[0, 0])}; its weights are broken (a diverged run?): load "
                         "another checkpoint")
    return embeds


@torch.no_grad()
def encode_images(model: CLIPModel, images, cfg: Config, batch_size: int = 128) -> torch.Tensor:
    """Unit-length embeddings (N, D) of images given as paths, PIL images or RGB arrays.

    Each image gets cfg.image_geometry's evaluation view as uint8 pixels, and the image tower normalises
    them on its device: the pipeline training uses, without its augmentation.
    """
    images = _gallery(images, "encode_images")
    if len(images) == 0:
        raise ValueError("encode_images got no images: pass a non-empty list of paths, PIL images or arrays")
    _check_image_size(model, cfg)
    device = next(model.parameters()).device
    encoder = model.image_encoder
    transform = image_transforms(cfg, train=False, normalize=False, **encoder.crop)
    if model.training:  # eval() walks every module: skip it when there is nothing to switch
        model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        arrays = [_image_pixels(im, cfg, f"image {start + j}") for j, im in enumerate(images[start:start + batch_size])]
        pixels = np.stack([transform(image=a)["image"] for a in arrays])  # (b, H, W, 3) uint8
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)  # (b, 3, H, W)
        embeds = _check_finite(model.encode_image(pixels).float(), start, "encode_images", "image")
        out.append(F.normalize(embeds, dim=-1).cpu())
    return torch.cat(out)  # (N, D)


@torch.no_grad()
def encode_texts(model: CLIPModel, tokenizer, texts, cfg: Config, batch_size: int = 256) -> torch.Tensor:
    """Unit-length embeddings (M, D) of captions (normalised like the training captions)."""
    if isinstance(texts, str):
        raise ValueError(f"encode_texts takes a list of captions, not one string: use [{texts[:40]!r}]")
    if len(texts) == 0:
        raise ValueError("encode_texts got no texts: pass a non-empty list of captions")
    device = next(model.parameters()).device
    if model.training:
        model.eval()
    out = []
    raw, texts = list(texts), [normalize_caption(t) for t in texts]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:  # whitespace or invisible characters alone, None, NaN: an embedding of nothing would still rank
        raise ValueError(f"encode_texts: text {empty[0]} ({raw[empty[0]]!r}) is empty once whitespace and "
                         f"invisible characters are removed ({len(empty)} such); pass words to embed")
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], padding="longest", truncation=True,
                           max_length=cfg.max_length, return_tensors="pt").to(device)
        embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float()
        out.append(F.normalize(_check_finite(embeds, start, "encode_texts", "text"), dim=-1).cpu())
    return torch.cat(out)  # (M, D)


def recall_at_k(similarity: torch.Tensor, caption_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@K both ways and median ranks from a (captions, images) similarity matrix; ties count against.

    Image-to-text counts a hit when any of the image's captions is in the top K, as CLIP_benchmark (and so
    open_clip's multilingual table) does. A tie counts against the query: a correct item's rank is the
    number of wrong candidates scoring at least as high as it (the worst case of every tie-breaking), so a
    collapsed model whose scores are all equal gets R@1 = 0 and no tie can raise recall. Without ties this
    is the usual rank. NaN or infinite scores are a ValueError.

    Args:
        similarity: (M, N) scores, caption m against image n.
        caption_to_image: (M,) index of each caption's image.
        ks: the K values to report.
    """
    similarity = torch.as_tensor(similarity)
    if similarity.ndim != 2 or similarity.numel() == 0:
        raise ValueError(f"recall_at_k needs a non-empty (captions, images) similarity matrix, got shape "
                         f"{tuple(similarity.shape)}: is the table or gallery empty?")
    if not similarity.is_floating_point() or similarity.dtype in (torch.float16, torch.bfloat16):
        similarity = similarity.float()  # half precision widens exactly: no new ties; float64 stays float64
    caption_to_image = torch.tensor(np.asarray(caption_to_image), dtype=torch.long)
    n_captions, n_images = similarity.shape
    if caption_to_image.shape != (n_captions,):
        raise ValueError(f"recall_at_k: caption_to_image has shape {tuple(caption_to_image.shape)} but the "
                         f"similarity matrix has {n_captions} caption rows")
    outside = (caption_to_image < 0) | (caption_to_image >= n_images)
    if outside.any():
        first = int(outside.nonzero()[0, 0])
        raise ValueError(f"recall_at_k: caption {first} points at image {int(caption_to_image[first])}, outside "
                         f"the {n_images} image columns")
    bad_ks = [k for k in ks if not (isinstance(k, (int, np.integer)) and k >= 1)]
    if bad_ks:
        raise ValueError(f"recall_at_k: every k in ks must be an integer >= 1, got {bad_ks}")
    not_finite = ~torch.isfinite(similarity)
    if not_finite.any():  # NaN compares false with everything: it would rank a broken model first
        m, n = (int(i) for i in not_finite.nonzero()[0])
        n_nan = int(torch.isnan(similarity).sum())
        cause = {0: "infinite", int(not_finite.sum()): "NaN"}.get(n_nan, "NaN or infinite")
        raise ValueError(f"recall_at_k: {int(not_finite.sum())} of the {similarity.numel()} scores are {cause} "
                         f"(e.g. caption {m} against image {n}: {similarity[m, n].item()}); the model's weights or "
                         "embeddings are broken (check them with torch.isfinite), so no recall can be measured")
    correct = torch.zeros(n_captions, n_images, dtype=torch.bool)  # (M, N)
    correct[torch.arange(n_captions), caption_to_image] = True
    # Rank = how many wrong candidates score at least as high as the best correct one (0 = top): ties count against.
    t2i_best = similarity.masked_fill(~correct, -math.inf).max(1).values  # (M,)
    t2i_rank = ((similarity >= t2i_best[:, None]) & ~correct).sum(1)  # (M,)
    sim_t = similarity.T  # (N, M)
    i2t_best = sim_t.masked_fill(~correct.T, -math.inf).max(1).values  # (N,)
    i2t_rank = ((sim_t >= i2t_best[:, None]) & ~correct.T).sum(1)  # (N,)
    has_caption = correct.any(0)  # images without captions cannot be scored image-to-text
    i2t_rank = i2t_rank[has_caption]
    metrics = {}
    for k in ks:
        metrics[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
    for k in ks:
        metrics[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
    metrics["t2i_median_rank"] = t2i_rank.float().median().item() + 1
    metrics["i2t_median_rank"] = i2t_rank.float().median().item() + 1
    return metrics


def retrieval_metrics(model: CLIPModel, tokenizer, df: pd.DataFrame, cfg: Config, name: str = "evaluation") -> dict:
    """R@1/5/10 text-to-image and image-to-text plus median ranks over a caption table (`name` labels its errors)."""
    df = clean_table(df, cfg, name=name)
    images = list(pd.unique(df["image"]))
    caption_to_image = pd.Categorical(df["image"], categories=images).codes
    image_embeds = encode_images(model, images, cfg)  # (N, D)
    text_embeds = encode_texts(model, tokenizer, list(df["caption"]), cfg)  # (M, D)
    return recall_at_k(text_embeds @ image_embeds.T, caption_to_image)


def choose_on_validation(candidates: dict, val_df: pd.DataFrame, metric: str = "t2i_R@1") -> tuple[str, pd.DataFrame]:
    """Pick among model variants on the validation table, never on test: (the best name, every variant's recall).

    Args:
        candidates: {name: (model, tokenizer, cfg)}, e.g. the published checkpoint's two head variants.
        val_df: the validation caption table (Flickr8k's dev split in full mode).
        metric: the retrieval_metrics key that decides; the first candidate wins a tie.
    """
    if not candidates:
        raise ValueError("choose_on_validation got no candidates: pass {name: (model, tokenizer, cfg)}")
    table = pd.DataFrame({name: retrieval_metrics(model, tokenizer, val_df, cfg, name="validation")
                          for name, (model, tokenizer, cfg) in candidates.items()}).T
    if metric not in table.columns:
        raise ValueError(f"choose_on_validation: metric {metric!r} is not one of {list(table.columns)}")
    return str(table[metric].idxmax()), table


def _image_fingerprint(model: CLIPModel) -> str:
    """A hash of everything that shapes an image embedding: the image tower and its head, not the text side."""
    digest = hashlib.sha1()
    image_side = {**model.image_encoder.state_dict(prefix="image_encoder."),
                  **model.image_projection.state_dict(prefix="image_projection.")}
    for name, tensor in image_side.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embed_gallery(model: CLIPModel, images, cfg: Config, cache_dir=None, dtype=torch.float16,
                  in_memory: bool = True, index: str | None = None):
    """Gallery embeddings (N, D), computed once and cached on disk for later searches; optionally a search index.

    The cache file is named by a hash of the image-side weights, the preprocessing and the file list
    (paths, sizes, modification times), so a retrained model or a changed gallery computes afresh. float16
    halves memory and search time; the ranking barely changes.

    Args:
        model, cfg: a trained model and its Config.
        images: image paths.
        cache_dir: folder for the cache (None: no cache).
        dtype: storage type of the embeddings.
        in_memory: False returns a read-only memory map instead of a tensor, for galleries
            larger than memory: top_k_scores then reads it from disk chunk by chunk.
        index: None, or a build_index kind ("auto", "exact", "ivf"): then (embeddings, index) is returned,
            the index saved beside the cache under the same name, so a changed model or gallery rebuilds it.
    """
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"embed_gallery stores float16 or float32, not {dtype}")
    if cache_dir is None:
        embeds = encode_images(model, images, cfg).to(dtype)
        return embeds if index is None else (embeds, build_index(embeds, index))
    encoder = model.image_encoder
    files = file_fingerprint([_resolve(image, cfg) for image in images], cfg.image_size, cfg.image_geometry,
                             encoder.mean, encoder.std, encoder.crop_pct, encoder.interpolation)
    name = f"gallery-{_image_fingerprint(model)[:12]}-{files[:12]}-{str(dtype)[6:]}.npy"
    path = Path(cache_dir) / name
    if not path.exists():
        embeds = encode_images(model, images, cfg).to(dtype).numpy()
        with atomic_write(path) as partial:  # a crash mid-write never leaves a truncated cache behind
            np.save(partial, embeds)
    embeds = np.load(path, mmap_mode=None if in_memory else "r")
    embeds = torch.from_numpy(embeds) if in_memory else embeds
    if index is None:
        return embeds
    index_path = path.with_name(f"{path.stem}-{index_kind(len(embeds), index)}.faiss")
    if index_path.exists() and index_path.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        return embeds, load_index(index_path, n_images=len(embeds), dim=embeds.shape[1])
    built = build_index(embeds, index)  # none yet, or older than the embeddings it would serve
    save_index(built, index_path)
    return embeds, built


def top_k_scores(image_embeds, query_embed: torch.Tensor, k: int, chunk_size: int = 1 << 16):
    """(scores, indices) of the k gallery rows most similar to one query: the exact scan, chunk by chunk (exact_top_k).

    Args:
        image_embeds: (N, D) tensor or numpy array (a memory map is read chunk by chunk).
        query_embed: (D,) unit vector.
        k: how many results.
        chunk_size: rows per chunk, scored in float32; bounds the temporary memory.
    """
    _check_k(k)
    if len(image_embeds) and (image_embeds.ndim != 2 or image_embeds.shape[1] != query_embed.shape[-1]):
        raise ValueError(f"the gallery embeddings have shape {tuple(image_embeds.shape)} but the query has dimension "
                         f"{query_embed.shape[-1]}: embed the gallery with this model (encode_images)")
    return exact_top_k(image_embeds, query_embed, k, chunk_size)  # float32 scores; an empty gallery finds nothing


def _check_k(k) -> None:
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"k={k!r}: the number of results must be an integer >= 1")


def search_images(query: str, model: CLIPModel, tokenizer, images, cfg: Config, k: int = 5,
                  image_embeds=None, index=None) -> pd.DataFrame:
    """Top-k images for a Hindi query, as a table of image and cosine score.

    Args:
        query: free Hindi text, e.g. "घास पर कुत्ता".
        model, tokenizer: a trained pair.
        images: the gallery (paths, PIL images or arrays).
        cfg: the model's Config.
        k: how many results.
        image_embeds: precomputed gallery embeddings (encode_images or embed_gallery), to search many times cheaply.
        index: a build_index (or embed_gallery) index over the same gallery, searched instead of scanning
            image_embeds: the way to search hundreds of thousands of images in milliseconds.
    """
    _check_k(k)
    if not isinstance(query, str):  # a list would be embedded as the text "['…', '…']"
        raise ValueError(f"search_images takes one query string, not {type(query).__name__} {query!r:.80}; "
                         "for several queries call it once per query")
    if not normalize_caption(query):
        raise ValueError(f"search_images: the query {query!r} is empty once whitespace and invisible characters "
                         "are removed; type the words to search for")
    if images is None or len(images) == 0:
        raise ValueError("search_images got an empty gallery: pass the images to search (a list of paths, "
                         "PIL images or arrays)")
    images = _gallery(images, "search_images")
    if image_embeds is not None and len(image_embeds) != len(images):
        raise ValueError(f"search_images: image_embeds has {len(image_embeds)} rows but the gallery has "
                         f"{len(images)} images; embed the same list you search")
    if index is not None and index.ntotal != len(images):
        raise ValueError(f"the index holds {index.ntotal} images but the gallery has {len(images)}: "
                         "build the index from this gallery's embeddings (build_index or embed_gallery)")
    if image_embeds is None and index is None:
        images, image_embeds = _embed_readable(model, images, cfg)
    with torch.inference_mode():  # no autograd bookkeeping at all: a few hundred microseconds per query
        query_embed = encode_texts(model, tokenizer, [query], cfg)[0]  # (D,)
        scores, indices = (top_k_scores(image_embeds, query_embed, k) if index is None
                           else search_index(index, query_embed, k))
    return pd.DataFrame(dict(image=[images[i] for i in indices.tolist()], score=scores.tolist()))


def _embed_readable(model: CLIPModel, images: list, cfg: Config) -> tuple[list, torch.Tensor]:
    """(gallery, embeddings); with on_bad_input="skip", unreadable images are left out with a counted warning."""
    try:
        return images, encode_images(model, images, cfg)
    except (ValueError, FileNotFoundError):
        bad = set()
        if cfg.on_bad_input == "skip":
            for i, image in enumerate(images):
                try:
                    _image_pixels(image, cfg, "image")
                except (ValueError, FileNotFoundError):
                    bad.add(i)
        if not bad or len(bad) == len(images):  # another problem, or nothing left to search: the error says which
            raise
    examples = [str(images[i]) for i in sorted(bad)[:3]]
    warnings.warn(f"search_images skipped {len(bad)} of {len(images)} gallery images that cannot be read, e.g. "
                  f"{', '.join(examples)}", stacklevel=3)
    images = [image for i, image in enumerate(images) if i not in bad]
    return images, encode_images(model, images, cfg)


HINDI_TEMPLATES = ["{}", "एक {} की तस्वीर", "{} का चित्र", "इस चित्र में {} है"]


def zero_shot_classify(model: CLIPModel, tokenizer, images, class_names, cfg: Config,
                       templates=HINDI_TEMPLATES, image_embeds=None) -> torch.Tensor:
    """Class probabilities (N, C) from Hindi prompts: each class averages its prompts' embeddings.

    Args:
        model, tokenizer: a trained pair.
        images: paths, PIL images or arrays (ignored when image_embeds is given).
        class_names: Hindi names, one per class, filled into `templates`; or a dict
            {name: [its own prompts]} when prompts must agree with the noun's gender.
        cfg: the model's Config.
        templates: prompts with one "{}" for the class name; more templates, steadier classes.
        image_embeds: optional precomputed encode_images output.
    """
    if isinstance(class_names, str):
        raise ValueError(f"zero_shot_classify takes a list of class names, not one string: use [{class_names!r}]")
    if len(class_names) == 0:
        raise ValueError("zero_shot_classify got no classes: pass at least one class name (two to compare)")
    empty = [name for name in class_names if not normalize_caption(name)]
    if empty:
        raise ValueError(f"zero_shot_classify: class name {empty[0]!r} is empty once whitespace and invisible "
                         "characters are removed; name every class")
    if not isinstance(class_names, dict):
        repeated = sorted(name for name, n in Counter(class_names).items() if n > 1)
        if repeated:  # a dict keeps one of each: the columns would no longer line up with the names given
            raise ValueError(f"zero_shot_classify: class names {repeated} appear more than once")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"zero_shot_classify: every template needs one '{{}}' for the class name, got "
                             f"{[t for t in templates if '{}' not in t] or templates!r}")
        class_names = {name: [t.format(name) for t in templates] for name in class_names}
    no_prompts = [name for name, prompts in class_names.items() if isinstance(prompts, str) or len(prompts) == 0]
    if no_prompts:
        raise ValueError(f"zero_shot_classify: classes {no_prompts} need a non-empty list of prompts")
    if image_embeds is None:
        image_embeds = encode_images(model, images, cfg)  # (N, D)
    class_embeds = torch.stack([encode_texts(model, tokenizer, prompts, cfg).mean(0)
                                for prompts in class_names.values()])  # (C, D)
    if image_embeds.ndim != 2 or image_embeds.shape[1] != class_embeds.shape[1]:
        raise ValueError(f"zero_shot_classify: image_embeds have shape {tuple(image_embeds.shape)} but the model's "
                         f"embeddings have dimension {class_embeds.shape[1]}: embed the images with this model")
    class_embeds = F.normalize(class_embeds, dim=-1)  # averaging shrinks the vectors: renormalise
    scale = model.logit_scale.exp().detach().cpu()
    return (scale * image_embeds.float() @ class_embeds.T).softmax(-1)  # (N, C); float16 galleries too
