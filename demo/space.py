"""Assemble a Hugging Face Space folder: the page, the package, the Space card and its requirements.

    python -m demo.space OUT [--gallery PHOTOS]
    huggingface-cli upload you/clip-hindi-demo OUT . --repo-type space   # publish it

A Space runs `app.py` from its root and reads the YAML block of its README.md; the repository's own
README is the project's, so the card lives in demo/README.md and becomes README.md here. The
requirements come from requirements.txt, less what only notebooks and tests use (Gradio itself is
installed by the Space from the card's sdk_version).
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SERVED = {"matplotlib", "fontpkg-noto-sans-devanagari", "ipywidgets", "ipykernel", "pytest", "nbmake", "ruff",
              "pyarrow", "webdataset"}  # notebooks, plots and tests only: the page never imports them
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def space_requirements(requirements=ROOT / "requirements.txt") -> str:
    """requirements.txt's pinned lines that serving needs, one per line."""
    keep = []
    for line in Path(requirements).read_text(encoding="utf-8").splitlines():
        spec = line.split("#")[0].strip()
        name = re.split(r"[=<>!~\[; ]", spec)[0].lower() if spec else ""
        if name and name not in NOT_SERVED:
            keep.append(spec)
    return "\n".join(keep) + "\n"


def assemble_space(dest, gallery=None) -> Path:
    """Write the Space into `dest` (created; must be empty): app.py, demo/, clip_utils/, README.md, requirements.txt.

    Args:
        dest: the Space folder to write.
        gallery: a folder of images copied to dest/gallery, which the page serves by default.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty: assemble the Space into a new folder")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "README.md")
    shutil.copytree(ROOT / "clip_utils", dest / "clip_utils", ignore=skip)
    shutil.copytree(ROOT / "demo", dest / "demo", ignore=skip)
    shutil.copy2(ROOT / "app.py", dest / "app.py")
    shutil.copy2(ROOT / "demo" / "README.md", dest / "README.md")
    (dest / "requirements.txt").write_text(space_requirements(), encoding="utf-8")
    if gallery:
        images = [p for p in sorted(Path(gallery).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise FileNotFoundError(f"--gallery {gallery}: no .jpg/.jpeg/.png/.webp/.bmp images in that folder")
        (dest / "gallery").mkdir()
        for path in images:  # flattened: names stay readable on the page
            shutil.copy2(path, dest / "gallery" / "_".join(path.relative_to(gallery).parts))
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Assemble a Hugging Face Space folder for the demo page")
    parser.add_argument("dest", help="a new, empty folder")
    parser.add_argument("--gallery", default="", help="a folder of images for the Space to search")
    args = parser.parse_args()
    print(f"Space written to {assemble_space(args.dest, args.gallery or None)}")
