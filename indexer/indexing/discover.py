"""Find image files under a folder and hash their contents.

Whatever the folder holds, discovery never fails on one entry: a name that cannot be stored, a
broken or looping symbolic link, a symbolic link to a folder, something that is not a regular file
or a file too large to read becomes a :class:`FileEntry` with a ``problem`` (the reason it is
skipped, recorded like a file that cannot be decoded), and a file that vanishes while the folder is
listed is simply not there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from retrieval.images import IMAGE_EXTENSIONS

MAX_FILE_BYTES = 1 << 30  # a larger "image" is not read (it would be held in memory whole): skipped


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute (symbolic links are not resolved); a name that is not UTF-8 is shown escaped
    size: int
    mtime: float
    problem: str | None = None  # known before reading: why it cannot be indexed (a skip reason)

    @property
    def file_type(self) -> str:
        return os.path.splitext(self.path)[1].lower().lstrip(".")


def storable_name(path: str) -> str:
    """``path`` as text the index can store: bytes that are not UTF-8 (kept by Python as surrogates)
    shown as ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _link_problem(full: str, exc: OSError) -> str | None:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (it points back at itself)"
    if isinstance(exc, FileNotFoundError) and os.path.islink(full):
        try:
            target = os.readlink(full)
        except OSError:
            target = "?"
        return f"broken symbolic link (its target {storable_name(target)} does not exist)"
    return None


def entry_for(full: str) -> FileEntry | None:
    """The entry of one file found in a listing (None when it vanished in the meantime)."""
    path = os.path.abspath(full)
    try:
        path.encode("utf-8")
        bad_name = False
    except UnicodeEncodeError:
        bad_name = True
    try:
        st = os.stat(path)
    except OSError as exc:
        problem = _link_problem(path, exc)
        if problem is None:
            if isinstance(exc, FileNotFoundError):
                return None  # gone since the folder was listed
            problem = f"cannot read file ({type(exc).__name__}: {exc.strerror or exc})"
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return FileEntry(storable_name(path), 0, st.st_mtime, problem)
    if bad_name:
        return FileEntry(storable_name(path), st.st_size, st.st_mtime,
                         "file name is not valid UTF-8 (rename the file to index it)")
    if not stat.S_ISREG(st.st_mode):
        return FileEntry(path, 0, st.st_mtime, "not a regular file (a pipe, socket or device)")
    if st.st_size > MAX_FILE_BYTES:
        return FileEntry(path, st.st_size, st.st_mtime,
                         f"file too large to index ({st.st_size / 2**20:,.0f} MiB; the limit is "
                         f"{MAX_FILE_BYTES / 2**20:,.0f} MiB)")
    return FileEntry(path, st.st_size, st.st_mtime)


def discover(root: Path) -> list[FileEntry]:
    """All files with an image extension under ``root``, recursively, sorted by path.

    Hidden files and folders (names starting with ``.``) are left out. Symbolic links to files are
    followed; symbolic links to folders are not (no cycles, nothing outside the folder by surprise):
    each is an entry with a problem, so the run says why its images are not indexed. A folder that
    cannot be listed, or vanishes while it is listed, is passed over.
    """
    found: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        linked = {d for d in dirnames if not d.startswith(".") and os.path.islink(os.path.join(dirpath, d))}
        for d in sorted(linked):
            full = os.path.abspath(os.path.join(dirpath, d))
            try:
                mtime = os.lstat(full).st_mtime
            except OSError:
                continue
            found.append(FileEntry(storable_name(full), 0, mtime,
                                   "symbolic link to a folder (not followed; index its target folder itself)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in linked)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            entry = entry_for(os.path.join(dirpath, name))
            if entry is not None:
                found.append(entry)
    found.sort(key=lambda e: e.path)
    return found


def hash_bytes(data: bytes) -> str:
    """Content hash used to recognise moved, renamed and duplicate files (BLAKE2b-256, hex)."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()
