"""Find image files under a folder and hash their contents."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from retrieval.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute, resolved
    size: int
    mtime: float

    @property
    def file_type(self) -> str:
        return os.path.splitext(self.path)[1].lower().lstrip(".")


def discover(root: Path) -> list[FileEntry]:
    """All files with an image extension under ``root``, recursively, sorted by path.

    Hidden files and folders (names starting with ``.``) are skipped, as are symlinked folders
    (no cycles); symlinked files are followed.
    """
    found: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue  # vanished or dangling link: it is simply not there
            if os.path.isfile(full):
                found.append(FileEntry(os.path.abspath(full), st.st_size, st.st_mtime))
    found.sort(key=lambda e: e.path)
    return found


def hash_bytes(data: bytes) -> str:
    """Content hash used to recognise moved, renamed and duplicate files (BLAKE2b-256, hex)."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()
