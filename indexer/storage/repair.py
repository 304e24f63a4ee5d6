"""Make the database and the vectors agree.

Checkpoints commit vectors and rows together (``bundle.py``), so on an index written by this version
they always agree; an index converted from an older version, or changed by hand, may not.
:func:`reconcile` runs when an index opens for writing; :func:`repair` is ``pixquery doctor --repair``
(what ``indexer/storage/doctor.py`` found: unreadable vectors, rows without vectors, orphans, a stale
keyword index, files that are gone, leftovers of an interrupted checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from indexer.storage.bundle import GENERATION_KEY, VectorBundle
from indexer.storage.store import Store, WriteBatch

if TYPE_CHECKING:
    from indexer.storage.doctor import Findings

log = logging.getLogger(__name__)


@dataclass
class Repairs:
    stray_vectors: int = 0  # image vectors without a row
    rows_without_vectors: int = 0  # rows deleted (their files are indexed again on the next run)
    stray_caption_vectors: int = 0  # caption vectors of rows without a caption
    stray_memories: int = 0  # scorer memories of rows that are gone

    def __bool__(self) -> bool:
        return any((self.stray_vectors, self.rows_without_vectors, self.stray_caption_vectors, self.stray_memories))


def reconcile(store: Store, vectors: VectorBundle) -> Repairs:
    """Remove vectors without rows and rows without an image vector, and commit that as one checkpoint."""
    vec_ids = set(vectors.ids().tolist())
    row_ids = store.image_ids()
    orphans = np.array(sorted(vec_ids - row_ids), dtype=np.int64)
    missing = sorted(row_ids - vec_ids)
    cap_orphans = np.array(sorted(set(vectors.captions.ids().tolist()) - store.captioned_ids()), dtype=np.int64)
    mem_orphans = np.zeros(0, dtype=np.int64)
    if vectors.memories is not None:
        mem_orphans = np.array(sorted(set(vectors.memories.ids().tolist()) - (row_ids - set(missing))), np.int64)
    repairs = Repairs(len(orphans), len(missing), len(cap_orphans), len(mem_orphans))
    if not repairs:
        return repairs
    vectors.remove(orphans)
    vectors.captions.delete(cap_orphans)
    if vectors.memories is not None:
        vectors.memories.delete(mem_orphans)
    vectors.commit(store, WriteBatch(deletes=missing))
    log.warning("repaired index: %d stray vectors, %d rows without vectors, %d stray caption vectors, "
                "%d stray memories", repairs.stray_vectors, repairs.rows_without_vectors,
                repairs.stray_caption_vectors, repairs.stray_memories)
    return repairs


def repair(store: Store, vectors: VectorBundle, findings: "Findings",
           embed_texts: Callable[[list[str]], np.ndarray] | None = None) -> tuple[list[str], list[str]]:
    """Fix what :func:`indexer.storage.doctor.diagnose` found, in one checkpoint (the caller holds the
    write lock; ``vectors`` are the ones it read). Returns (what was fixed, what could not be, and why).

    Rows that cannot be made whole leave the index (their files are indexed again by the next run over
    their folder); nothing is ever done to an image file. ``embed_texts``: the index's text encoder, to
    embed captions that lost their vector (without it those captions are left for ``recaption``).
    """
    f = findings
    fixed: list[str] = []
    not_fixed: list[str] = []
    if f.database_problems:
        not_fixed.append("the database is damaged (" + "; ".join(f.database_problems[:2]) + "): rebuild the "
                         "index with pixquery index FOLDER --rebuild (your photos are not touched)")
    rows = {r.id: r for r in store.all_images()}
    batch = WriteBatch()
    drop = sorted(set(f.changed_since_fallback) | set(f.rows_without_vectors) | set(f.other_encoder)
                  | set(f.missing_files))
    if f.vectors_problem is not None:
        fixed.append(f"vectors: went back to generation {f.fallback}" if f.fallback else
                     "vectors: none could be read; started again from none")
    for what, ids_ in (("rows written after that generation", f.changed_since_fallback),
                       ("rows without an image vector", f.rows_without_vectors),
                       ("rows embedded by another encoder", f.other_encoder),
                       ("rows of files gone from their folders", f.missing_files)):
        if ids_:
            fixed.append(f"removed {len(ids_)} {what} (indexed again by the next run over their folders)")
    vectors.remove(np.asarray(drop + f.stray_vectors, dtype=np.int64))
    batch.deletes.extend(drop)
    if f.stray_vectors:
        fixed.append(f"removed {len(f.stray_vectors)} image vectors without a row")
    vectors.captions.delete(np.asarray(f.stray_caption_vectors + f.empty_captions, dtype=np.int64))
    if f.stray_caption_vectors:
        fixed.append(f"removed {len(f.stray_caption_vectors)} caption vectors without a caption")
    for row_id in f.empty_captions:
        if row_id in rows and row_id not in drop:
            row = rows[row_id]
            row.caption = row.captioner = row.captioned_at = None
            batch.rows.append(row)
    if f.empty_captions:
        fixed.append(f"cleared {len(f.empty_captions)} empty captions")
    if vectors.memories is not None and f.stray_memories:
        vectors.memories.delete(np.asarray(f.stray_memories, dtype=np.int64))
        fixed.append(f"removed {len(f.stray_memories)} scorer memories without a row")
    missing = [i for i in f.missing_caption_vectors if i in rows and i not in drop]
    if missing and embed_texts is not None:
        vecs = embed_texts([rows[i].caption for i in missing])
        vectors.captions.put(np.asarray(missing, dtype=np.int64), vecs)
        fixed.append(f"embedded {len(missing)} captions that had no vector")
    elif missing:
        not_fixed.append(f"{len(missing)} captions have no vector and the encoder could not be loaded to embed "
                         f"them: run pixquery recaption")
    if f.indexed_skips:
        batch.unskip.extend(f.indexed_skips)
        fixed.append(f"removed {len(f.indexed_skips)} skip records of indexed files")
    if f.next_id is not None:
        batch.meta["next_id"] = str(f.next_id)
        fixed.append(f"the next id is now {f.next_id}")
    if f.missing_folders:
        not_fixed.append(f"{len(f.missing_folders)} indexed files are under folders that are gone (an unmounted "
                         f"drive?): kept; run pixquery index FOLDER on their root once it is back, or to drop them")
    vectors.commit(store, batch)
    if int(store.get_meta(GENERATION_KEY) or 0) != vectors.generation:  # went back, and nothing else changed
        store.set_meta({GENERATION_KEY: str(vectors.generation)})
    if f.stray_files or f.vectors_problem is not None:
        removed = vectors.collect_garbage()
        if f.stray_files:
            fixed.append(f"deleted {removed} vector files that no manifest named")
    if f.keywords_problem and store.keywords is not None:
        store.keywords.rebuild()
        fixed.append("rebuilt the keyword index from the captions")
    return fixed, not_fixed
