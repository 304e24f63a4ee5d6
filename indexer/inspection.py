"""Looking at an index without ranking it: its statistics, and its imported catalogue fields.

The Engine hands these out (``Engine.stats()``, ``Engine.catalogue``); they read the store only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from indexer.config import EngineConfig
from indexer.errors import InputError
from indexer.provenance import built_with, confidence_threshold
from indexer.storage.store import Store, safe_url


def stats(store: Store, config: EngineConfig) -> dict:
    """Counts, the models that made the index, its size on disk and its last run."""
    last = store.last_run()
    info = built_with(store)
    size = sum(p.stat().st_size for p in config.index_dir.rglob("*") if p.is_file())
    captioner, scorer = store.get_meta("captioner"), store.get_meta("scorer")
    tagger, confidence = store.get_meta("tagger"), store.get_meta("confidence")
    return {
        "index_dir": str(config.index_dir),
        "database": safe_url(config.db_url) if config.db_url else "sqlite",  # never a password
        "images": store.count_images(),
        "captioned": len(store.captioned_ids()),
        "skipped": len(store.skipped()),
        "encoder": info.to_dict() if info else None,
        "captioner": json.loads(captioner) if captioner else None,
        "scorer": json.loads(scorer) if scorer else None,
        "tags": {"tagger": json.loads(tagger) if tagger else None, **store.tag_counts()},
        "caption_confidence": {"model": json.loads(confidence) if confidence else None,
                               **store.confidence_counts(confidence_threshold(store))},
        "vector_index": vector_stats(store, config),
        "index_bytes": size,
        "last_run": None if last is None else {
            "root": last.root, "started_at": last.started_at.isoformat(timespec="seconds"),
            "finished_at": last.finished_at.isoformat(timespec="seconds") if last.finished_at else None,
            "summary": json.loads(last.summary) if last.summary else None,
        },
    }


def vector_stats(store: Store, config: EngineConfig) -> dict:
    """The configured search structure and, per searchable kind, the one its manifest records."""
    from indexer.storage.bundle import describe

    generation = int(store.get_meta("vector_generation") or 0)
    kinds = describe(config.vectors_dir, generation) if generation else {}
    return {"type": config.index_type, "generation": generation, **kinds}


class Catalogue:
    """An index's imported catalogue metadata (``pixquery meta``; indexer/catalogue/)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def import_csv(self, source: str | Path, key: str = "path", **options) -> dict:
        """Attach the columns of CSV ``source`` to indexed images, matched by ``key`` (path, file, sha256
        or hash); checked whole, then written in one transaction. Options and the report:
        :func:`indexer.catalogue.csv_import.import_csv`."""
        from indexer.catalogue.csv_import import import_csv

        return import_csv(self.store, Path(source), key, **options).to_dict()

    def fields(self) -> list[dict]:
        """[{name, kind, keyword, values}] of every imported catalogue field."""
        return self.store.catalogue_fields()

    def values(self, ids: Sequence[int]) -> dict[int, dict[str, object]]:
        """{id: {field: value}} of the catalogue values of ``ids`` (those that have some)."""
        return self.store.catalogue_values(ids)

    def choices(self, name: str, limit: int = 50) -> list | tuple:
        """Field ``name``'s distinct text values (most frequent first) or (min, max) of a number or date."""
        kinds = self.store.catalogue_kinds()
        if name not in kinds:
            raise InputError(f"no catalogue field {name!r}")
        return self.store.catalogue_choices(name, kinds[name], limit)

    def drop(self, name: str) -> int:
        """Forget field ``name`` and its values (returns how many values went)."""
        return self.store.drop_catalogue_field(name)
