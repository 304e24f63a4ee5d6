"""Reading image-caption data sets: a folder of images plus ``file_name<TAB>caption`` lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import InputError


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """``file_name<TAB>caption`` lines -> {file_name: [captions in file order]} (insertion ordered)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"caption file {path} does not exist")
    captions: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            name, sep, caption = line.partition("\t")
            if not sep or not name.strip() or not caption.strip():
                raise InputError(f"{path}:{lineno}: expected 'file_name<TAB>caption'")
            captions.setdefault(name.strip(), []).append(caption.strip())
    if not captions:
        raise InputError(f"caption file {path} has no captions")
    return captions


@dataclass(frozen=True)
class Split:
    """One split of a captioned image set: image paths in a fixed order and their captions."""

    name: str
    files: list[str]
    paths: list[Path]
    captions: list[list[str]]  # captions[i] belong to files[i]


def load_flickr8k(root: str | Path, split: str) -> Split:
    """A split of the Flickr8k layout used here: ``images/``, ``captions.tsv``, ``<split>.txt``."""
    root = Path(root)
    listing = root / f"{split}.txt"
    if not listing.is_file():
        raise InputError(f"{root} does not look like the Flickr8k folder: {listing.name} is missing")
    files = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    all_captions = read_captions(root / "captions.tsv")
    missing = [f for f in files if f not in all_captions]
    if missing:
        raise InputError(f"{len(missing)} images of {listing.name} have no caption (first: {missing[0]})")
    return Split(split, files, [root / "images" / f for f in files], [all_captions[f] for f in files])
