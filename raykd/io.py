"""Atomic, durable writes: a reader sees the old file (or folder) or the whole new one, never a part
of it, and a file's new content is on disk (fsynced, as is the rename) before the call returns."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh path beside `path` to write a file or folder to; it replaces `path` when the block
    ends without an error and is removed otherwise. (A folder can only replace a missing or empty one.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the final rename stays on one file system; unique per writer.
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        if staging.is_file():
            _fsync(staging)
        os.replace(staging, path)
        fsync_folder(path.parent)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as staging:
        staging.write_text(text)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable."""
    _fsync(folder)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
