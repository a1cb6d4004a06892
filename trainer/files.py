"""Writes another process can trust: files flushed to disk before they are renamed into place.

The vLLM server (another container) reads adapters from the shared runs volume, and a restarted trainer resumes
from checkpoints there; both must see whole files or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` and the directories themselves, so another container reads complete files."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text_atomically(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a part, even if the process dies mid-write."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def write_directory_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(directory)` fills a temporary sibling of `path`, which is flushed and renamed to `path`: readers see the
    whole directory or none, and a failed write leaves nothing behind. An existing `path` is replaced."""
    if path.exists():
        shutil.rmtree(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
        fsync_tree(partial)
        os.replace(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
