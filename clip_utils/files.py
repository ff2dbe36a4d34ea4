"""Files that caches trust: a fingerprint of a list of files, and writes that land whole or not at all."""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path


def file_fingerprint(paths, *extra) -> str:
    """A sha256 hex digest of `extra` and of each file's path, size and modification time, in order.

    A cache named by it is rebuilt when a file is replaced under the same name, added, removed or
    reordered, or when anything in `extra` (an image size, a seed) changes. A missing file counts
    as size -1, so a table can be fingerprinted before its bad rows are dropped.
    """
    digest = hashlib.sha256(("\t".join(map(str, extra)) + "\n").encode())
    for path in paths:
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except FileNotFoundError:
            size, mtime = -1, 0
        digest.update(f"{path}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path` to write; renamed onto `path` only when the block ends without error.

    The file is flushed to disk (fsync) before the rename, and a rename within one folder is atomic, so a
    reader finds the old file or the whole new one, never a short one, even after a crash. An error inside
    the block deletes the temporary file and leaves `path` as it was. The temporary name keeps the suffix
    (np.save would otherwise append ".npy").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}.part{path.suffix}")
    try:
        yield partial
        descriptor = os.open(partial, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
