"""The demo page: Hindi text-to-image search and zero-shot classification in the browser, on Gradio.

One trained model (what `load_trained` finds, or a folder / Hub id you name) serves one gallery
(a folder of images, else the test split of the mode's data) whose embeddings are computed once by
`embed_gallery` and cached on disk with their search index. Runs as `python app.py` (locally, in a
Hugging Face Space) or from a notebook through `launch(...)` (Colab: a public share link).
Bad input (an empty query, a file that is not an image, a huge image, no class names) gets a message
in the page, never a stack trace; the server keeps serving.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image, UnidentifiedImageError

import clip_utils as cu

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD_MB = 20  # a phone photo is 2-8 MB; anything far larger is a mistake or an attack on the server
MAX_PIXELS = 40_000_000  # 40 megapixels: bigger images are refused before decoding (decompression bombs)
MAX_RESULTS = 24  # results per query: a page of thumbnails, not a dump of the gallery
QUICK_CLASSES = list(cu.synthetic_classes("colour"))  # the eight colours: what the quick model knows best
FULL_CLASSES = ["कुत्ता", "बिल्ली", "घोड़ा", "बच्चा", "साइकिल"]  # notebook 03's full-mode classes
EXAMPLES = {"quick": ["एक बड़ा लाल त्रिभुज", "एक छोटा नीला तारा", "दो पीले गोले"],
            "full": ["घास पर कुत्ता", "पानी में खेलते बच्चे", "सड़क पर साइकिल चलाता आदमी"]}
log = logging.getLogger("clip_hindi_demo")


def parse_classes(text) -> list[str]:
    """Class names from the page's box: one per line or comma-separated, NFC-normalised, repeats dropped."""
    names = [cu.normalize_caption(part) for part in re.split(r"[,\n،;]+", str(text or ""))]
    return list(dict.fromkeys(name for name in names if name))


def read_upload(path, max_mb: float = MAX_UPLOAD_MB, max_pixels: int = MAX_PIXELS):
    """The upload as an RGB array (H, W, 3), at most 1024 px a side, or ValueError with a sentence for the page."""
    if not path:
        raise ValueError("Upload an image (JPEG, PNG or WebP) to classify it.")
    path = Path(path)
    size_mb = path.stat().st_size / 2**20
    if size_mb > max_mb:
        raise ValueError(f"`{path.name}` is {size_mb:.1f} MB; the demo takes images up to {max_mb:g} MB: "
                         "upload a smaller copy.")
    try:
        with Image.open(path) as image:  # reads the header only: the size is known before any pixel is decoded
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        if isinstance(error, Image.DecompressionBombError):
            raise ValueError(f"`{path.name}` has too many pixels; the demo takes up to "
                             f"{max_pixels / 1e6:g} megapixels: upload a smaller copy.") from None
        raise ValueError(f"`{path.name}` is not an image the demo can read: upload a JPEG, PNG or WebP "
                         "file.") from None
    if width * height > max_pixels:
        raise ValueError(f"`{path.name}` is {width} × {height} pixels ({width * height / 1e6:.0f} megapixels); "
                         f"the demo takes up to {max_pixels / 1e6:g} megapixels: upload a smaller copy.")
    try:
        return cu.load_image(path, max_side=512)  # at most 1024 px: the towers see 224 px, the preview less
    except (OSError, SyntaxError, ValueError):  # a valid header over broken or truncated pixel data
        raise ValueError(f"`{path.name}` could not be decoded (a damaged or truncated file?): "
                         "upload another image.") from None


def _guarded(task: str, empty):
    """Run a page handler; expected problems come back as their message, anything else as a short note."""
    def wrap(handler):
        def run(*args):
            try:
                return handler(*args)
            except ValueError as error:
                return (*empty, f"⚠️ {error}")
            except Exception as error:  # noqa: BLE001  a bug must not take the page down: log it, tell the user
                log.exception("%s failed", task)
                return (*empty, f"⚠️ {task} failed on the server ({type(error).__name__}); the server log has "
                                "the details. Try another input.")
        return run
    return wrap


def build_demo(model, tokenizer, cfg: cu.Config, gallery, classes, source: str = "", gallery_name: str = "",
               cache_dir=None, k: int = 8) -> gr.Blocks:
    """The page as gr.Blocks: embeds `gallery` once (cached in cache_dir with its index), then serves both tasks.

    Args:
        model, tokenizer, cfg: a trained model, its tokenizer and Config (load_trained's first three).
        gallery: image paths to search.
        classes: the Hindi class names the zero-shot box starts with (editable in the page).
        source: which model this is, shown on the page (load_trained's fourth value).
        gallery_name: where the gallery comes from, shown on the page.
        cache_dir: folder for the gallery embeddings and index (None: computed in memory each start).
        k: results per query at start (the page's slider goes up to MAX_RESULTS).
    """
    gallery = [str(path) for path in gallery]
    if not gallery:
        raise ValueError("build_demo got an empty gallery: pass the image paths to search")
    embeds, index = cu.embed_gallery(model, gallery, cfg, cache_dir=cache_dir, index="auto")
    about = (f"**Model:** {source or 'a model passed in'} ({cfg.mode} mode) · **Gallery:** {len(gallery):,} images"
             f"{' from ' + gallery_name if gallery_name else ''} · embeddings {len(embeds):,} × {embeds.shape[1]}, "
             f"{'cached in `' + str(cache_dir) + '`' if cache_dir else 'in memory'}")

    @_guarded("The search", empty=([],))
    def search(query, top):
        query = cu.normalize_caption(query or "")
        if not query:
            raise ValueError("Type a description in Hindi first, e.g. `एक बड़ा लाल त्रिभुज`.")
        if not isinstance(top, (int, float)) or not 1 <= top <= MAX_RESULTS:
            raise ValueError(f"Ask for 1 to {MAX_RESULTS} results, not {top!r}.")
        hits = cu.search_images(query, model, tokenizer, gallery, cfg, k=int(top), index=index)
        items = [(image, f"{rank}. {Path(image).name} · {score:.3f}")
                 for rank, (image, score) in enumerate(zip(hits["image"], hits["score"]), start=1)]
        return items, f"Top {len(items)} of {len(gallery):,} images for **{query}**."

    @_guarded("The classification", empty=(None, None))
    def classify(upload, class_text):
        names = parse_classes(class_text)
        if not names:
            raise ValueError("Write at least one Hindi class name (two or more to compare), one per line or "
                             "separated by commas.")
        pixels = read_upload(upload)  # (H, W, 3)
        probs = cu.zero_shot_classify(model, tokenizer, [pixels], names, cfg, templates=cu.HINDI_TEMPLATES)[0]
        ranked = pd.Series(probs.tolist(), index=names).sort_values(ascending=False)
        note = " Add a second class to compare." if len(names) == 1 else ""
        return (pixels, ranked.to_dict(),
                f"**{ranked.index[0]}** ({ranked.iloc[0]:.0%}) among {len(names)} classes, each scored with "
                f"{len(cu.HINDI_TEMPLATES)} prompts (`{'`, `'.join(cu.HINDI_TEMPLATES)}`).{note}")

    with gr.Blocks(title="clip-hindi: Hindi CLIP demo", analytics_enabled=False) as demo:
        gr.Markdown("# clip-hindi · हिंदी में चित्र खोजें\nSearch pictures with a Hindi sentence, or let Hindi "
                    "class names classify a picture zero-shot.")
        gr.Markdown(about, elem_id="about")
        with gr.Tab("खोज · text → image"):
            with gr.Row():
                query = gr.Textbox(label="Hindi query (खोज)", placeholder=EXAMPLES.get(cfg.mode, [""])[0],
                                   elem_id="query", scale=4)
                top = gr.Slider(1, MAX_RESULTS, value=k, step=1, label="results", scale=1)
            search_button = gr.Button("खोजें · Search", variant="primary", elem_id="search-button")
            gr.Examples([[q] for q in EXAMPLES.get(cfg.mode, [])], inputs=[query])
            search_status = gr.Markdown(elem_id="search-status")
            results = gr.Gallery(label="results", columns=4, height="auto", elem_id="results")
        with gr.Tab("वर्गीकरण · zero-shot"):
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="an image (JPEG, PNG, WebP)", type="filepath", elem_id="upload")
                    class_box = gr.Textbox(value="\n".join(classes), lines=5, elem_id="classes",
                                           label="Hindi class names, one per line (editable)")
                    classify_button = gr.Button("वर्गीकृत करें · Classify", variant="primary",
                                                elem_id="classify-button")
                with gr.Column():
                    classify_status = gr.Markdown(elem_id="classify-status")
                    scores = gr.Label(num_top_classes=5, label="zero-shot", elem_id="scores")
                    preview = gr.Image(label="your image", interactive=False, height=220)
        gr.on([query.submit, search_button.click], search, [query, top], [results, search_status], api_name="search")
        gr.on([upload.upload, classify_button.click], classify, [upload, class_box],
              [preview, scores, classify_status], api_name="classify")
    return demo


def allowed_folders(gallery) -> list[str]:
    """The folders the gallery lives in: the only files the page may serve besides its own."""
    return sorted({str(Path(path).resolve().parent) for path in gallery})


def launch(model, tokenizer, cfg: cu.Config, gallery, classes=None, source: str = "", gallery_name: str = "",
           cache_dir=None, share: bool | None = None, **launch_kwargs):
    """Build the page and serve it (from a notebook: share=True prints a public link, as Colab needs).

    Args:
        model, tokenizer, cfg, source: what load_trained returned.
        gallery: image paths to search; classes: zero-shot class names (default: the mode's).
        gallery_name, cache_dir: see build_demo.
        share: Gradio's public link (None: only in Colab).
        launch_kwargs: passed to gr.Blocks.launch (server_port, prevent_thread_lock, ...).
    """
    classes = classes or (QUICK_CLASSES if cfg.mode == "quick" else FULL_CLASSES)
    demo = build_demo(model, tokenizer, cfg, gallery, classes, source, gallery_name, cache_dir)
    launch_kwargs.setdefault("max_file_size", f"{MAX_UPLOAD_MB}mb")
    demo.launch(share=share, allowed_paths=allowed_folders(gallery), **launch_kwargs)
    return demo


def load_gallery(cfg: cu.Config, folder="") -> tuple[list[str], str]:
    """(image paths, description): every image under `folder`, else the test split of the mode's data."""
    if folder:
        suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
        images = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)
        if not images:
            raise SystemExit(f"--gallery {folder}: no .jpg/.jpeg/.png/.webp/.bmp images in that folder")
        return images, f"`{folder}`"
    data = ROOT / "data" / cfg.mode
    if cfg.mode == "full" and not (data / "test.csv").exists():
        raise SystemExit(f"full mode needs a gallery: --gallery FOLDER (any folder of photos), or run notebook 01 "
                         f"first so that {data / 'test.csv'} exists")
    # Tables that exist are served as they are: prepare_data would rebuild (even retranslate) tables built
    # from a caption file the page was not told about.
    test = cu.tables.read_splits(data)[2] if (data / "test.csv").exists() else cu.prepare_data(cfg, data)[2]
    return list(pd.unique(test["image"])), f"the {cfg.mode}-mode test split (`{data}`)"


def load_model(cfg: cu.Config, checkpoint: str = "", train: bool = False):
    """load_trained's (model, tokenizer, cfg, source); in quick mode with nothing trained, train only if asked."""
    found = cu.load_trained(cfg, checkpoint)
    if found is None and train:
        log.warning("no checkpoint in %s: training the quick recipe (about 2-3 minutes)", Path(cfg.out_dir) / "best")
        train_df, val_df, _ = cu.prepare_quick_data(ROOT / "data" / "quick")
        model, tokenizer = cu.build_model(cfg, captions=train_df["caption"])
        cu.fit(model, tokenizer, train_df, val_df, cfg)
        found = cu.load_trained(cfg)
    if found is None:
        raise SystemExit(f"No trained model: {Path(cfg.out_dir) / 'best'} does not exist. Run notebook 02, pass "
                         "--checkpoint FOLDER_OR_HUB_ID (or set CLIP_HINDI_CHECKPOINT), or add --train to train "
                         "the quick recipe now (about 2-3 minutes on 2 CPU cores).")
    return found


def main(argv=None) -> None:
    """`python app.py [--checkpoint C] [--gallery DIR] [--port P] [--share] [--train]`: serve the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="", help="run folder or Hub id (default: as load_trained finds)")
    parser.add_argument("--gallery", default=os.environ.get("CLIP_HINDI_GALLERY", ""),
                        help="folder of images to search (default: gallery/ beside app.py, as in a Space, "
                             "else the mode's test split)")
    parser.add_argument("--classes", default="", help="zero-shot class names, comma-separated")
    parser.add_argument("--cache", default="", help="embedding cache folder (default: <run folder>/gallery_cache)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; a Space sets it)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="print a public gradio.live link")
    parser.add_argument("--train", action="store_true", help="quick mode with no run yet: train one first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = cu.Config.from_env()
    cfg.out_dir = str(Path(os.environ.get("CLIP_HINDI_RUNS") or ROOT / "runs") / Path(cfg.out_dir).name)
    model, tokenizer, model_cfg, source = load_model(cfg, args.checkpoint, args.train)
    beside = ROOT / "gallery"  # where demo.space puts a Space's photos
    gallery, gallery_name = load_gallery(model_cfg, args.gallery or (beside if beside.is_dir() else ""))
    cache = args.cache or Path(cfg.out_dir) / "gallery_cache"
    launch(model, tokenizer, model_cfg, gallery, parse_classes(args.classes), source, gallery_name, cache,
           share=args.share or None, server_name=args.host, server_port=args.port)
