"""Getting files from the internet safely: downloads that resume and verify, archives unpacked so that no
member escapes its folder, and files from Hugging Face dataset repositories."""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path


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
    if dest.is_dir():  # "exists" would pass a folder off as the finished download
        raise IsADirectoryError(f"download of {url}: {dest} is a folder; give the file to write, e.g. "
                                f"{dest / Path(url).name}")
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
    _check_archive(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if not (dest / name).resolve().is_relative_to(dest):
                        raise ValueError(f"unsafe archive {archive}: member {name!r} would escape {dest}")
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():  # links are refused outright: older "data" filters let some escape
                    if not (member.isfile() or member.isdir()):
                        raise ValueError(f"unsafe archive {archive}: member {member.name!r} is a "
                                         f"{'link' if member.issym() or member.islnk() else 'special file'}; "
                                         "only files and folders are unpacked")
                # "data" refuses absolute paths and ".." (a tarfile.FilterError) and odd permissions
                tf.extractall(dest, filter="data")
    except (tarfile.ReadError, tarfile.CompressionError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{archive} cannot be unpacked ({type(error).__name__}: {error}): it is cut short or "
                         "damaged; delete it and download again") from None
    return dest


def _check_archive(archive) -> None:
    """Refuse a file that is no archive, naming an HTML page (a login or error page saved in its place) as such."""
    import tarfile
    import zipfile

    with open(archive, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in head:
        raise ValueError(f"{archive} is an HTML (or XML) page, not an archive: the server sent an error or login page: "
                         "delete it and download again, or fetch it by hand")
    if not (zipfile.is_zipfile(archive) or tarfile.is_tarfile(archive)):
        raise ValueError(f"{archive} is not a .zip or .tar(.gz) archive (it starts with {head[:16]!r}): delete "
                         "it and download again")


def _mirrored(url: str) -> str:
    """`url`, or the file:// address of the file of the same name in CLIP_HINDI_MIRROR when that is set.

    A mirror folder serves a machine without internet, or a copy downloaded once for a class.
    """
    mirror = os.environ.get("CLIP_HINDI_MIRROR", "").strip()
    if not mirror:
        return url
    local = Path(mirror) / Path(url).name
    if not local.exists():
        raise FileNotFoundError(f"CLIP_HINDI_MIRROR={mirror} has no {local.name} (the file behind {url})")
    return local.resolve().as_uri()


def _fetch(url: str, folder) -> Path:
    """Download and unpack once; a marker file records that unpacking finished.

    With CLIP_HINDI_MIRROR set to a folder, the archive is read from the file of the same name there
    instead (see _mirrored), through the same code.
    """
    folder = Path(folder)
    marker = folder / f".{Path(url).name}.done"
    if not marker.exists():
        url = _mirrored(url)
        extract_archive(download(url, folder / "downloads" / Path(url).name), folder)
        marker.touch()
    return folder


def hub_file(uri: str, cache_dir=None) -> Path:
    """Fetch "hf://datasets/<owner>/<name>[@revision]/<file>" through huggingface_hub's cache; offline once cached.

    Args:
        uri: the file in a Hugging Face dataset repository.
        cache_dir: the Hub cache folder (default: HF_HUB_CACHE or ~/.cache/huggingface/hub).
    """
    from huggingface_hub import hf_hub_download

    parts = uri.removeprefix("hf://").split("/")
    if len(parts) < 4 or parts[0] != "datasets":
        raise ValueError(f"{uri!r}: write a Hub caption file as hf://datasets/<owner>/<name>/<file>")
    name, _, revision = parts[2].partition("@")
    return Path(hf_hub_download(f"{parts[1]}/{name}", "/".join(parts[3:]), repo_type="dataset",
                                revision=revision or None, cache_dir=cache_dir))
