"""Query sets for ``pixquery eval retrieval``: queries written as users type them, each with every
relevant image, for collections that have no reference captions (the out-of-domain set,
``indexer/lab/ood_queries.tsv`` over ``indexer/sample_photos``).

Format: UTF-8 tab-separated lines ``query<TAB>relevant file names (space-separated)[<TAB>split]``;
a first line ``query<TAB>relevant...`` (after comments) is a header; ``#`` starts a comment line. ``split`` names a
part of the set (``tune``, ``test``) that is also reported on its own, so weights chosen on one
part can be checked on the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from retrieval.errors import InputError
from retrieval.images import IMAGE_EXTENSIONS

NAMED_SETS = {  # --queries NAME -> (queries file, image folder), both shipped in the indexer package
    "ood": ("lab/ood_queries.tsv", "sample_photos"),
}


@dataclass(frozen=True)
class QuerySet:
    texts: list[str]
    relevant: list[frozenset[str]]  # file names relevant to each query
    splits: list[str]  # "" when the file has no split column


def named_set(name: str) -> tuple[Path, Path] | None:
    """(queries file, image folder) of a shipped query set, or None when ``name`` is not one."""
    if name not in NAMED_SETS:
        return None
    root = Path(str(resources.files("indexer")))
    queries, images = NAMED_SETS[name]
    return root / queries, root / images


def read_queries(path: Path) -> QuerySet:
    if not path.is_file():
        raise InputError(f"query file {path} does not exist")
    texts, relevant, splits = [], [], []
    header = True
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if header and [p.strip().lower() for p in parts[:2]] == ["query", "relevant"]:
            header = False
            continue
        header = False
        if len(parts) < 2 or not parts[0].strip() or not parts[1].split():
            raise InputError(f"{path}:{lineno}: expected 'query<TAB>relevant file names[<TAB>split]'")
        texts.append(parts[0].strip())
        relevant.append(frozenset(parts[1].split()))
        splits.append(parts[2].strip() if len(parts) > 2 else "")
    if not texts:
        raise InputError(f"query file {path} has no queries")
    return QuerySet(texts, relevant, splits)


def image_files(folder: Path) -> list[str]:
    """The image files directly in ``folder`` (sorted names): the collection a query set is run over."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
