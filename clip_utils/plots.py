"""Figures that shape Devanagari: the font, loss curves, retrieval grids and zero-shot bars."""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import torch

from .config import Config
from .data import _resolve, load_image


def use_devanagari_font() -> str | None:
    """Register Noto Sans Devanagari with matplotlib (Latin falls back to DejaVu Sans); returns its name."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) < (3, 11):
        warnings.warn(f"matplotlib {matplotlib.__version__} cannot shape Devanagari: install matplotlib>=3.11")
    candidates = []
    try:
        import fontpkg_noto_sans_devanagari as fontpkg  # pip package carrying the font file

        candidates += sorted(Path(fontpkg.ROOT).glob("files/*.ttf"))
    except ImportError:
        pass
    candidates += [Path(f) for f in font_manager.findSystemFonts() if "NotoSansDevanagari" in Path(f).name]
    if not candidates:
        warnings.warn("no Noto Sans Devanagari font found: pip install fontpkg-noto-sans-devanagari")
        return None
    font_manager.fontManager.addfont(str(candidates[0]))
    name = font_manager.FontProperties(fname=str(candidates[0])).get_name()
    plt.rcParams["font.family"] = [name, "DejaVu Sans"]
    return name


def _save(fig, path):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_history(history: pd.DataFrame, path=None, title: str = "प्रशिक्षण (training)"):
    """Train and validation loss per epoch beside each group's learning rate."""
    import matplotlib.pyplot as plt

    use_devanagari_font()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    ax_loss.plot(history["epoch"], history["val_loss"], "s-", label="validation loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=title)
    ax_loss.legend()
    for column in [c for c in history.columns if c.startswith("lr_")]:
        ax_lr.plot(history["epoch"], history[column], "o-", label=column.removeprefix("lr_"))
    ax_lr.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="learning rate per group")
    ax_lr.legend()
    fig.tight_layout()
    return _save(fig, path)


def show_retrieval(query: str, results: pd.DataFrame, cfg: Config, path=None, truth=None):
    """The query above a row of the top images with their scores (a correct image is framed green)."""
    import matplotlib.pyplot as plt

    use_devanagari_font()
    fig, axes = plt.subplots(1, len(results), figsize=(2.2 * len(results), 2.8), squeeze=False)
    for ax, (_, row) in zip(axes[0], results.iterrows()):
        ax.imshow(load_image(_resolve(row["image"], cfg)))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{row['score']:.2f}", fontsize=10)
        if truth is not None and row["image"] in set(truth):
            for spine in ax.spines.values():
                spine.set(color="green", linewidth=4)
    fig.suptitle(f"खोज (query): {query}", fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def show_zero_shot(image, class_names, probs, cfg: Config, path=None, top: int = 5):
    """An image beside horizontal bars of its most likely Hindi class names."""
    import matplotlib.pyplot as plt

    use_devanagari_font()
    probs = torch.as_tensor(probs).flatten()
    order = probs.argsort(descending=True)[:top].tolist()[::-1]
    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(7, 2.6), gridspec_kw=dict(width_ratios=[1, 1.6]))
    ax_img.imshow(load_image(_resolve(image, cfg)) if isinstance(image, (str, Path)) else image)
    ax_img.axis("off")
    ax_bar.barh([class_names[i] for i in order], probs[order].numpy(), color="tab:orange")
    ax_bar.set(xlim=(0, 1), xlabel="probability")
    ax_bar.tick_params(axis="y", labelsize=11)
    fig.tight_layout()
    return _save(fig, path)
