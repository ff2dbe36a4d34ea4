"""clip_utils: a Hindi CLIP, from data to zero-shot, in small rooms read in teaching order.

The lesson: config -> files (fingerprints, atomic writes) -> text -> tables (splits and their source) ->
synthetic (quick-mode scenes) -> datasets (Flickr8k, XM3600) -> pixels (arrays to RGB) ->
data (images, loader, decode-once cache) -> model -> losses -> loop (the one training loop) -> train (fit) ->
evaluate -> plots -> checkpoints -> distill (from an English CLIP; LiT).
The engine, apart in scale/: shards (streaming), coco35l (COCO-35L), index (search at scale),
translate (English->Hindi captions), downloads (files, archives, Hub files), launch (the command line's
arguments, process group and data).
The notebooks import everything from here (`import clip_utils as cu`); nothing is copied into them.

Two modes share every function; only the `Config` differs:
  quick: CPU, no network, synthetic Hindi scenes, small random-init encoders.
  full:  GPU, real photos, pretrained timm and Hugging Face encoders.
"""
from .checkpoints import (
    PUBLISHED_REPO,
    load_checkpoint,
    load_published_checkpoint,
    load_trained,
    model_card,
    push_to_hub,
    save_checkpoint,
)
from .config import Config
from .data import (
    cache_images,
    clean_table,
    image_transforms,
    load_image,
    make_loader,
    similar_batches,
)
from .datasets import (
    CATS_VS_DOGS,
    CATS_VS_DOGS_HINDI,
    FLICKR8K_URLS,
    PUBLISHED_XM3600_HINDI,
    XM3600_ALL_CAPTIONS,
    XM3600_FIRST_CAPTION,
    XM3600_URLS,
    download_cats_vs_dogs,
    download_flickr8k,
    download_xm3600,
    flickr8k_machine_captions,
    labelled_folder,
    load_flickr8k,
    load_xm3600,
    prepare_data,
    prepare_full_data,
    read_captions,
    split_labelled,
)
from .distill import clip_from_transformers, distill_text_tower, lit_config, student_clip
from .evaluate import (
    HINDI_TEMPLATES,
    choose_on_validation,
    embed_gallery,
    encode_images,
    encode_texts,
    recall_at_k,
    retrieval_metrics,
    search_images,
    top_k_scores,
    zero_shot_classify,
)
from .loop import train_loop
from .losses import clip_loss, soft_target_loss
from .model import CLIPModel, ImageEncoder, ProjectionHead, TextEncoder, build_model, build_text_tower
from .plots import plot_history, show_retrieval, show_zero_shot, use_devanagari_font
from .scale.coco35l import COCO35L_LANGUAGES, COCO35L_URLS, download_coco35l, load_coco35l, prepare_coco35l
from .scale.downloads import download, extract_archive, hub_file
from .scale.index import EXACT_UP_TO, build_index, index_kind, index_recall, load_index, save_index, search_index
from .scale.shards import read_index, stream_loader, write_shards
from .scale.translate import (
    DEFAULT_TRANSLATOR,
    read_english_captions,
    read_translations,
    translate_captions,
    translation_quality,
)
from .synthetic import HELD_OUT_PAIRS, make_synthetic_dataset, prepare_quick_data, synthetic_classes
from .tables import split_by_image, table_source
from .text import keeps_devanagari, normalize_caption, train_wordpiece_tokenizer
from .train import fit, make_optimizer, train_step

__all__ = [
    "Config",
    "normalize_caption", "train_wordpiece_tokenizer", "keeps_devanagari",
    "HELD_OUT_PAIRS", "make_synthetic_dataset", "synthetic_classes", "prepare_quick_data",
    "FLICKR8K_URLS", "XM3600_URLS", "PUBLISHED_XM3600_HINDI", "XM3600_FIRST_CAPTION",
    "XM3600_ALL_CAPTIONS", "download", "extract_archive",
    "read_captions", "load_flickr8k", "download_flickr8k", "prepare_full_data", "prepare_data",
    "load_xm3600", "download_xm3600", "hub_file", "flickr8k_machine_captions",
    "COCO35L_URLS", "COCO35L_LANGUAGES", "load_coco35l", "download_coco35l", "prepare_coco35l",
    "CATS_VS_DOGS", "CATS_VS_DOGS_HINDI", "labelled_folder", "download_cats_vs_dogs", "split_labelled",
    "DEFAULT_TRANSLATOR", "read_english_captions", "translate_captions", "read_translations", "translation_quality",
    "split_by_image", "table_source", "clean_table", "load_image", "image_transforms", "make_loader", "cache_images",
    "write_shards", "read_index", "stream_loader",
    "ImageEncoder", "TextEncoder", "ProjectionHead", "CLIPModel", "build_model", "build_text_tower",
    "clip_loss", "soft_target_loss",
    "make_optimizer", "train_step", "similar_batches", "fit", "train_loop",
    "encode_images", "encode_texts", "recall_at_k", "retrieval_metrics", "choose_on_validation", "embed_gallery",
    "top_k_scores", "search_images", "zero_shot_classify", "HINDI_TEMPLATES",
    "EXACT_UP_TO", "index_kind", "build_index", "search_index", "index_recall", "save_index", "load_index",
    "use_devanagari_font", "plot_history", "show_retrieval", "show_zero_shot",
    "save_checkpoint", "load_checkpoint", "load_published_checkpoint", "load_trained", "PUBLISHED_REPO",
    "model_card", "push_to_hub",
    "clip_from_transformers", "student_clip", "distill_text_tower", "lit_config",
]
